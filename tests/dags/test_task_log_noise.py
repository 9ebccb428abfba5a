"""Library deprecation warnings stay out of task logs: `quiet_libraries` as the DAGs' on_execute_callback.

Airflow parses DAG files inside ``warnings.catch_warnings`` (the filters a DAG file sets at import
are gone when its tasks run), so the filter must act in the task's process before its body: this
runs a real `airflow dags test` of a DAG whose task warns, with and without the callback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import PROJECT_ROOT

pytestmark = [pytest.mark.slow]

DAG = """
import warnings
from datetime import datetime

from airflow.sdk import dag, task

from training.lifecycle import quiet_libraries


@dag(dag_id="noise", start_date=datetime(2026, 1, 1), schedule=None, default_args={DEFAULT_ARGS})
def noise():
    @task
    def emit() -> None:
        warnings.warn("NOISY-FUTURE", FutureWarning)
        warnings.warn("NOISY-DEPRECATION", DeprecationWarning)
        warnings.warn("KEPT-USER", UserWarning)

    emit()


noise()
"""


def _task_output(tmp_path: Path, default_args: str) -> str:
    dags = tmp_path / "dags"
    dags.mkdir(parents=True)
    (dags / "noise.py").write_text(DAG.replace("DEFAULT_ARGS", default_args))
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "home"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=env, capture_output=True, check=True, timeout=300)
    done = subprocess.run([*airflow, "dags", "test", "noise"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def test_deprecation_warnings_are_filtered_where_the_task_runs(tmp_path: Path) -> None:
    quiet = _task_output(tmp_path / "quiet", '"on_execute_callback": quiet_libraries')
    assert "KEPT-USER" in quiet, quiet[-4000:]  # other warnings still show
    assert "NOISY-FUTURE" not in quiet and "NOISY-DEPRECATION" not in quiet, quiet[-4000:]
    # without the callback the same task's log has the noise: the filter is what removes it
    loud = _task_output(tmp_path / "loud", "")
    assert "NOISY-FUTURE" in loud and "KEPT-USER" in loud, loud[-4000:]
