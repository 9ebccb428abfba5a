"""Browser test: Airflow started by `recsys airflow up`; headless Debian chromium (driven by
playwright-core) logs in to the UI, opens the training DAG, triggers it from the UI and sees
the run finish successfully. The screenshot of the run's page goes to docs/ for the README."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from core.procs import free_port
from core.settings import PROJECT_ROOT
from tests.browser.harness import DOCS, require_browser, run_script

# a loaded machine slows the UI and the DAG run: the browser waits up to 7 min for the run
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1200)]


def _recsys(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def airflow_up(kafka_bootstrap: str, tmp_path: Path):  # noqa: ANN201
    """`recsys airflow up` in a private run directory; `recsys airflow down` afterwards."""
    from core.kafka import ensure_topics

    tag = uuid.uuid4().hex[:8]
    topic = f"samples.{tag}"
    asyncio.run(ensure_topics(kafka_bootstrap, {topic: 2}))
    env = {
        **os.environ,
        "RECSYS_RUN_DIR": str(tmp_path / "run"),
        "RECSYS_AIRFLOW_PORT": str(free_port()),
        "RECSYS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "RECSYS_TOPIC_SAMPLES": topic,
        "RECSYS_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "RECSYS_TRAIN_EXPERIMENT": f"browser-{tag}",
        # manual only, so the scheduler does not start a run of its own beside the one we trigger
        "RECSYS_AIRFLOW_TRAINING_SCHEDULE": "",
        "RECSYS_AIRFLOW_FEATURES_SCHEDULE": "",
    }
    started = _recsys("airflow", "up", env=env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        url = re.search(r"Airflow UI: (http://127\.0\.0\.1:\d+)", started.stdout).group(1)
        password = re.search(r"generated admin password \(shown once\): (\S+)", started.stdout).group(1)
        yield {"url": url, "user": "admin", "password": password, "env": env}
    finally:
        stopped = _recsys("airflow", "down", env=env)
        print(stopped.stdout + stopped.stderr)


def _wait_for_dag(url: str, token: str, dag_id: str, timeout: float = 120) -> None:
    """The dag-processor has parsed the DAG file (the UI can only trigger a known DAG)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/api/v2/dags/{dag_id}", headers={"Authorization": f"Bearer {token}"})
        if response.status_code == 200:
            return
        time.sleep(1)
    raise AssertionError(f"{dag_id} not parsed after {timeout}s")


def test_trigger_training_dag_from_the_ui(airflow_up: dict) -> None:
    require_browser()
    url = airflow_up["url"]
    token = httpx.post(f"{url}/auth/token", json={"username": "admin", "password": airflow_up["password"]}).json()[
        "access_token"
    ]
    _wait_for_dag(url, token, "recsys_training")

    DOCS.mkdir(exist_ok=True)
    screenshot = DOCS / "airflow-dag-run.png"
    env = {
        **os.environ,
        "AIRFLOW_URL": url,
        "AIRFLOW_USER": "admin",
        "AIRFLOW_PASSWORD": airflow_up["password"],
        "DAG_ID": "recsys_training",
        "SCREENSHOT": str(screenshot),
        "TIMEOUT_S": "420",
    }
    done = run_script("trigger_dag.mjs", env, timeout=600)
    print(done.stderr)
    print(f"screenshot: {screenshot}")
    result = done.result
    assert done.returncode == 0 and result.get("state") == "success", (result, done.stderr[-3000:])
    assert screenshot.stat().st_size > 10_000

    # the REST API agrees: the run the UI triggered is a manual run by admin and succeeded
    run = httpx.get(
        f"{url}/api/v2/dags/recsys_training/dagRuns/{result['run_id']}", headers={"Authorization": f"Bearer {token}"}
    ).json()
    assert run["state"] == "success" and run["run_type"] == "manual", run
    tasks = httpx.get(
        f"{url}/api/v2/dags/recsys_training/dagRuns/{result['run_id']}/taskInstances",
        headers={"Authorization": f"Bearer {token}"},
    ).json()["task_instances"]
    states = {t["task_id"]: t["state"] for t in tasks}
    print(f"task states: {states}")
    # the samples topic is empty: the run ends cleanly after the check, everything after it skipped
    assert states == {
        "check_new_samples": "success",
        **{t: "skipped" for t in ("train", "evaluate", "gate", "promote", "publish", "reload_serving")},
    }, states
