"""DAG integrity: both DAG files import without errors, have the expected tasks and edges, no
cycles, stay thin (no torch/feast/mlflow at parse time) and import in under 2 s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import PROJECT_ROOT

DAGS = PROJECT_ROOT / "dags"
HEAVY = ("torch", "torchrec", "feast", "mlflow", "pandas", "faust", "fbgemm_gpu")


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    home = tmp_path_factory.mktemp("airflow-home")
    os.environ.setdefault("AIRFLOW_HOME", str(home))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_dag_files_import_without_errors(dagbag) -> None:  # noqa: ANN001
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {"recsys_training", "recsys_features"}


def _edges(dag) -> set[tuple[str, str]]:  # noqa: ANN001
    return {(up, t.task_id) for t in dag.tasks for up in t.upstream_task_ids}


def test_training_dag_structure(dagbag) -> None:  # noqa: ANN001
    dag = dagbag.dags["recsys_training"]
    assert set(dag.task_ids) == {
        "check_new_samples",
        "train",
        "evaluate",
        "gate",
        "promote",
        "publish",
        "reload_serving",
    }
    assert {
        ("check_new_samples", "train"),
        ("train", "evaluate"),
        ("evaluate", "gate"),
        ("gate", "promote"),
        ("promote", "publish"),
        ("publish", "reload_serving"),
    } <= _edges(dag)
    assert dag.max_active_runs == 1
    assert not dag.catchup
    assert {"ranks", "epochs", "min_new_samples", "tolerance"} <= set(dag.params.keys())
    # the short circuits skip everything after them, so a skipped check or a refused gate ends the run cleanly
    assert dag.get_task("check_new_samples").ignore_downstream_trigger_rules
    assert dag.get_task("gate").ignore_downstream_trigger_rules
    assert all(t.retries >= 1 for t in dag.tasks)


def test_features_dag_structure(dagbag) -> None:  # noqa: ANN001
    dag = dagbag.dags["recsys_features"]
    assert set(dag.task_ids) == {"materialize", "compact_offline"}
    assert ("materialize", "compact_offline") in _edges(dag)
    assert dag.max_active_runs == 1


def test_dags_say_what_they_do_and_who_owns_them(dagbag) -> None:  # noqa: ANN001
    from core.settings import Settings

    owner = Settings().airflow.dag_owner
    for dag_id in ("recsys_training", "recsys_features"):
        dag = dagbag.dags[dag_id]
        assert dag.doc_md and f"### {dag_id}" in dag.doc_md
        assert {t.owner for t in dag.tasks} == {owner} and owner != "airflow"
    training_doc = dagbag.dags["recsys_training"].doc_md
    # every parameter of the trigger form is explained, with its default and its setting
    for name in dagbag.dags["recsys_training"].params:
        assert f"| `{name}` |" in training_doc
    assert "RECSYS_AIRFLOW_TRAINING_SCHEDULE" in training_doc


def test_no_cycles(dagbag) -> None:  # noqa: ANN001
    for dag_id in dagbag.dag_ids:
        dagbag.dags[dag_id].check_cycle()  # raises on a cycle


def test_cycle_checker_detects_a_cycle() -> None:
    """The check above can fail: a DAG with a cycle is rejected."""
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG

    with DAG("cyclic", schedule=None) as dag:
        a, b = EmptyOperator(task_id="a"), EmptyOperator(task_id="b")
        a >> b
        b >> a
    with pytest.raises(Exception, match="[Cc]ycle"):
        dag.check_cycle()


@pytest.mark.parametrize("dag_file", ["recsys_training", "recsys_features"])
def test_dag_file_is_thin(dag_file: str, tmp_path: Path) -> None:
    """Parse cost: the DAG module itself loads no heavy library (Airflow is loaded already in the
    dag-processor). The CPU time is printed, not asserted: timing belongs in benchmarks."""
    code = (
        "import sys, time, json, airflow.sdk\n"
        f"sys.path.insert(0, {str(DAGS)!r})\n"
        "t = time.process_time()\n"
        f"import {dag_file}\n"
        "elapsed = time.process_time() - t\n"
        f"print(json.dumps({{'s': elapsed, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{dag_file}: imported in {result['s']:.3f} CPU s")
    assert result["heavy"] == [], f"{dag_file} imports {result['heavy']} at parse time"
