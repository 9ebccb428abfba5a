"""Training DAG: new samples? -> train (torchrun) -> evaluate -> gate -> promote -> publish -> reload serving.

Thin on purpose: every task is one call of the model lifecycle library (``training.lifecycle``,
imported inside the tasks like everything heavy), so parsing this file costs a settings read.
One active run at a time; a run with no new samples skips cleanly, and a challenger the gate
refuses, or cannot judge because its evaluation set is not evaluable (one class, too few
clicks), leaves the champion alone (promote/publish/reload skip; its staged rows are dropped, so
no served score changes) and its window is trained on again by the next run. Every task returns
JSON-safe values (no NaN: Airflow cannot store it).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Param, dag, get_current_context, task

from core.settings import Settings  # pydantic only: cheap
from training.lifecycle import quiet_libraries  # stdlib only: cheap

_defaults = Settings()
log = logging.getLogger(__name__)  # task logs, in order with Airflow's own lines (print() came after them)

_eval_clicks = round(_defaults.gate.min_new_samples * _defaults.train.eval_fraction * 0.1)  # at a 10% click rate
DOC = f"""
### recsys_training: the batch loop's model lifecycle

Each run: **check_new_samples** (skip unless `min_new_samples` arrived on the samples topic since
the last job) → **train** (`recsys train` under torchrun on the new window; rows staged, model
registered as a challenger) → **evaluate** (challenger and champion on the challenger's evaluation
set, or "not evaluable" and why) → **gate** (promote unless the challenger is worse than the
champion by more than `tolerance`) → **promote** (staged rows into the parameter service, then the
`champion` alias) → **publish** (every inference replica applied those rows) → **reload_serving**.
A skipped check or a refused gate ends the run successfully and changes nothing that is served.

| parameter | default | what it does |
|---|---|---|
| `ranks` | {_defaults.train.ranks} | torchrun ranks of the training job (`RECSYS_TRAIN_RANKS`) |
| `epochs` | {_defaults.train.epochs} | passes over the window's training samples (`RECSYS_TRAIN_EPOCHS`) |
| `min_new_samples` | {_defaults.gate.min_new_samples} | new samples to train (`RECSYS_GATE_MIN_NEW_SAMPLES`, below) |
| `tolerance` | {_defaults.gate.tolerance} | AUC a challenger may lose and still win (`RECSYS_GATE_TOLERANCE`) |

Why `min_new_samples` is {_defaults.gate.min_new_samples}: a window worth a run is one whose evaluation
share can be judged. At a 10% click rate its newest {_defaults.train.eval_fraction:g}
(`RECSYS_TRAIN_EVAL_FRACTION`) holds ~{_eval_clicks} clicks, and the gate compares AUCs only from
{_defaults.gate.min_eval_positives} clicks and {_defaults.gate.min_eval_negatives} non-clicks on
(`RECSYS_GATE_MIN_EVAL_POSITIVES` / `_NEGATIVES`); a smaller window is trained, found not evaluable and
refused, its samples carried into the next run.

What each task log leads with: **check_new_samples** the new samples and their offsets, and
whether the run trains; **train** the summary (samples, epochs, loss, AUC against the oracle AUC
where a truth file is set, rows staged) and the link to its MLflow run, which is named after
this DAG run and tagged `airflow_dag_id`, `airflow_run_id` and `airflow_url` (back to this run);
**evaluate** both AUCs on one evaluation set, or why there are none; **gate** its decision and why.

Schedule: `RECSYS_AIRFLOW_TRAINING_SCHEDULE` (`{_defaults.airflow.training_schedule or ""}` here; empty means
manual runs only, which is what `recsys demo` sets so that it triggers each round itself). Only one
run at a time. The README's "Orchestration (Airflow)" and "Training" sections say more.
"""


@dag(
    dag_id="recsys_training",
    description="train on new samples, evaluate, gate, promote (MLflow alias champion), publish, reload serving",
    schedule=_defaults.airflow.training_schedule or None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 1,
        "retry_delay": timedelta(seconds=30),
        "owner": _defaults.airflow.dag_owner,
        "on_execute_callback": quiet_libraries,  # in the task's process: deprecation noise stays out of its log
    },
    doc_md=DOC,
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
        """Skip the run unless at least ``min_new_samples`` arrived since the last committed job."""
        from training.lifecycle.job import count_new_samples

        found = count_new_samples(Settings())
        needed = int(get_current_context()["params"]["min_new_samples"])
        log.info(
            "%s: %d new samples on %s, %d needed (min_new_samples); offsets %s -> %s",
            "training" if found["new"] >= needed else "skipping this run",
            found["new"],
            found["topic"],
            needed,
            found["start"],
            found["end"],
        )
        return found["new"] >= needed

    @task
    def train() -> dict[str, Any]:
        """`recsys train` once per DAG run; returns the new model version and its parameter version."""
        from airflow.sdk.exceptions import AirflowSkipException

        from training.lifecycle.job import train_once, trained_model
        from training.outcome import JobStatus
        from training.tracking import TAG_AIRFLOW_DAG_ID, TAG_AIRFLOW_RUN_ID, TAG_AIRFLOW_URL

        ctx = get_current_context()
        dag_id, run_id = ctx["dag"].dag_id, ctx["run_id"]
        outcome = train_once(
            f"{dag_id}__{run_id}",
            int(ctx["params"]["ranks"]),
            int(ctx["params"]["epochs"]),
            Settings().local.run_dir / "airflow" / "train-outcomes",
            run_name=run_id,  # the MLflow run is named after the DAG run that made it
            tags={TAG_AIRFLOW_DAG_ID: dag_id, TAG_AIRFLOW_RUN_ID: run_id, TAG_AIRFLOW_URL: ctx["ti"].log_url},
        )
        if outcome.status is not JobStatus.TRAINED:
            raise AirflowSkipException(f"nothing trained: {outcome.message or outcome.status}")
        log.info("MLflow run: %s", outcome.run_url or f"{outcome.run_id} (no MLflow UI: set RECSYS_MLFLOW_UI_URL)")
        return trained_model(outcome)

    @task
    def evaluate(trained: dict[str, Any]) -> dict[str, Any]:
        """The champion's and the challenger's AUC on the challenger's evaluation set (or why there are none)."""
        from training.lifecycle import evaluation

        found = evaluation.evaluate(Settings(), trained["model_version"])
        log.info("%s", evaluation.summary(found))
        return found

    @task.short_circuit
    def gate(evaluation: dict[str, Any]) -> dict[str, Any] | bool:
        """The gate's decision; a refused or not evaluable challenger skips everything after it."""
        from training.lifecycle.gate import gate_challenger

        tolerance = float(get_current_context()["params"]["tolerance"])
        decision = gate_challenger(Settings(), evaluation["model_version"], tolerance)  # logs its decision and why
        return decision.as_dict() if decision.promote else False

    @task
    def promote(decision: dict[str, Any]) -> dict[str, Any]:
        """The challenger's staged rows into the parameter service, then the registry alias ``champion``."""
        from training.lifecycle.gate import Decision, promote_challenger

        return promote_challenger(Settings(), Decision(**decision))

    @task
    def publish(promoted: dict[str, Any]) -> dict[str, Any]:
        """Wait until every inference replica applied the parameter version holding the champion's rows."""
        from training.lifecycle.publish import wait_for_replicas

        s = Settings()
        return wait_for_replicas(s, int(promoted["ps_version"]), s.gate.publish_timeout_s)

    @task
    def reload_serving(promoted: dict[str, Any], published: dict[str, Any]) -> dict[str, Any]:
        """Ask every serving replica to load the new champion now."""
        from training.lifecycle import publish as publication

        return publication.reload_serving(Settings(), promoted["champion"])

    # TaskFlow hands XComArgs to the tasks (resolved at run time); Airflow's Task typing does not say so
    trained = train()
    check_new_samples() >> trained
    promoted = promote(gate(evaluate(trained)))  # type: ignore[arg-type]
    reload_serving(promoted, publish(promoted))  # type: ignore[arg-type]


recsys_training()
