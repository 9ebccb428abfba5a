"""Training DAG: new samples? -> train (torchrun) -> evaluate -> gate -> promote -> publish -> reload serving.

Thin on purpose: the tasks call ``recsys train`` and the small idempotent functions of
``recsys_ops`` (imported inside the tasks, like everything heavy), so parsing this file
costs a settings read. One active run at a time; a run with no new samples skips cleanly,
and a challenger the gate refuses leaves the champion alone (promote/publish/reload skip).
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Param, dag, get_current_context, task

sys.path.insert(0, str(Path(__file__).resolve().parent))  # recsys_ops, in task processes too

from core.settings import Settings  # noqa: E402  (pydantic only: cheap)

_defaults = Settings()


@dag(
    dag_id="recsys_training",
    description="train on new samples, evaluate, gate, promote (MLflow alias champion), publish, reload serving",
    schedule=_defaults.airflow.training_schedule or None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
    params={
        "ranks": Param(
            _defaults.train.ranks,
            type="integer",
            minimum=1,
            maximum=512,
            description="torchrun ranks of `recsys train`",
        ),
        "epochs": Param(
            _defaults.train.epochs,
            type="integer",
            minimum=1,
            maximum=1000,
            description="passes over the window's training samples",
        ),
        "min_new_samples": Param(
            _defaults.gate.min_new_samples,
            type="integer",
            minimum=1,
            description="skip the run when fewer new samples arrived since the last job",
        ),
        "tolerance": Param(
            _defaults.gate.tolerance,
            type="number",
            minimum=0,
            maximum=1,
            description="promote unless the challenger's AUC is worse than the champion's by more",
        ),
    },
    tags=["recsys", "training"],
    render_template_as_native_obj=True,
)
def recsys_training() -> None:
    @task.short_circuit
    def check_new_samples() -> bool:
        from recsys_ops import training

        params = get_current_context()["params"]
        found = training.count_new_samples(Settings())
        print(f"new samples on {found['topic']}: {found['new']} (offsets {found['start']} -> {found['end']})")
        return found["new"] >= int(params["min_new_samples"])

    @task
    def train() -> dict:
        from airflow.exceptions import AirflowSkipException
        from recsys_ops import training

        ctx = get_current_context()
        s = Settings()
        outcome = training.train(
            s,
            f"{ctx['dag'].dag_id}__{ctx['run_id']}",
            int(ctx["params"]["ranks"]),
            int(ctx["params"]["epochs"]),
            s.local.run_dir / "airflow" / "train-outcomes",
        )
        if outcome.get("status") != "trained":
            raise AirflowSkipException(f"nothing trained: {outcome.get('message', outcome.get('status'))}")
        return {k: outcome[k] for k in ("run_id", "model_name", "model_version", "ps_version") if k in outcome}

    @task
    def evaluate(trained: dict) -> dict:
        from recsys_ops import training

        return training.evaluate(Settings(), trained["model_version"])

    @task.short_circuit
    def gate(evaluation: dict) -> dict | bool:
        from recsys_ops import training

        decision = training.gate_decision(
            Settings(), evaluation["model_version"], float(get_current_context()["params"]["tolerance"])
        )
        print(f"gate: {decision['reason']}")
        return decision if decision["promote"] else False

    @task
    def promote(decision: dict) -> dict:
        from recsys_ops import training

        return training.promote(Settings(), decision)

    @task
    def publish(trained: dict, promoted: dict) -> dict:
        from recsys_ops import training

        s = Settings()
        return training.wait_for_replicas(s, int(trained["ps_version"]), s.gate.publish_timeout_s)

    @task
    def reload_serving(promoted: dict, published: dict) -> dict:
        from recsys_ops import training

        return training.reload_serving(Settings(), promoted["champion"])

    trained = train()
    check_new_samples() >> trained
    promoted = promote(gate(evaluate(trained)))
    reload_serving(promoted, publish(trained, promoted))


recsys_training()
