"""NOT YET PASSING, so not collected by pytest (the file name does not match test_*.py): run it with
`uv run pytest -s tests/docker/deploy_smoke_wip.py`. It stops at the training DAG run (see the README's
Deployment section); rename it to test_deploy_smoke.py once it passes so CI runs it.

The deployed loop, end to end, on the compose stack started with podman (`scripts/deploy.sh`, `make deploy`).

Simulated traffic into the containerised Kafka -> samples on the samples topic -> the training DAG
triggered through the containerised Airflow's REST API -> champion promoted -> both serving
instances answer with it -> replica-a's container stopped: serving-a fails over to replica-b with
no request failing beyond its retry budget -> replica-a started again (empty: it keeps no data): its
replicator refills it and serving-a returns to it -> the stack stops, nothing of it left.

Each step asserts what it reached, so a failure names the first step that did not happen. The
figures (time to healthy, failover and return times, requests and retries during the outage) are
printed (`-s`) and written to reports/deploy-smoke.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from core.settings import PROJECT_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DEPLOY = PROJECT_ROOT / "scripts" / "deploy.sh"
PROJECT = "recsys"
CONTAINERS_CONF = PROJECT_ROOT / "docker" / "podman" / "containers.conf"
SERVING = {"serving-a": "http://127.0.0.1:8000", "serving-b": "http://127.0.0.1:8001"}
AIRFLOW = "http://127.0.0.1:8080"
DAG = "recsys_training"
# a client's retry budget: a request may fail this many times (connection error or 5xx) and still
# count as served; one failing beyond it fails the test
RETRY_BUDGET = 2
REQUEST_TIMEOUT_S = 10.0
UP_TIMEOUT_S = 1500  # a cold start builds the images first (minutes); a warm one is bounded by deploy.sh's wait


def podman(*args: str, timeout: float = 120) -> str:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    done = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"podman {' '.join(args)} failed: {done.stderr[-2000:]}"
    return done.stdout


def container(service: str) -> str:
    return f"{PROJECT}_{service}_1"


def project_containers() -> list[str]:
    out = podman("ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}", "--format", "{{.Names}}")
    return out.split()


def in_container(service: str, *command: str, timeout: float = 300) -> str:
    """A command in one of the stack's running containers (its environment: the deployment's settings)."""
    return podman("exec", container(service), *command, timeout=timeout)


def wait_for(what: str, check, timeout: float, every: float = 2.0):  # noqa: ANN001, ANN201 - any predicate
    """Poll ``check()`` until it returns a truthy value; fail naming ``what`` (and the last value) after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, AssertionError, json.JSONDecodeError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"{what}: not reached in {timeout:.0f} s (last: {last!r})")


def read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@dataclass
class Stack:
    secrets: dict[str, str]
    up_s: float
    figures: dict[str, object] = field(default_factory=dict)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    secrets_file = tmp_path_factory.mktemp("deploy") / "secrets.env"  # fresh secrets for this run
    env = {**os.environ, "RECSYS_DEPLOY_SECRETS": str(secrets_file)}
    assert not project_containers(), "a recsys compose stack is already running here (`make deploy-down`)"
    started = time.monotonic()
    up = subprocess.run([str(DEPLOY), "up"], env=env, capture_output=True, text=True, timeout=UP_TIMEOUT_S)
    up_s = time.monotonic() - started
    try:
        assert up.returncode == 0, f"`deploy.sh up` failed after {up_s:.0f} s:\n{up.stderr[-4000:]}"
        yield Stack(secrets=read_env_file(secrets_file), up_s=up_s)
    finally:
        down = subprocess.run([str(DEPLOY), "down"], env=env, capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr[-2000:]
        assert not project_containers(), "containers of the stack left after `deploy.sh down`"


def airflow_client() -> httpx.Client:
    """A client of the containerised Airflow's REST API, with a JWT from its simple auth manager."""
    generated = "/data/airflow/simple_auth_manager_passwords.json.generated"
    password = json.loads(in_container("airflow-api-server", "cat", generated))["admin"]
    token = httpx.post(f"{AIRFLOW}/auth/token", json={"username": "admin", "password": password}, timeout=30)
    assert token.status_code in (200, 201), token.text
    return httpx.Client(
        base_url=f"{AIRFLOW}/api/v2",
        headers={"Authorization": f"Bearer {token.json()['access_token']}"},
        timeout=30,
    )


def readiness(serving: str) -> dict:
    return httpx.get(f"{SERVING[serving]}/readyz", timeout=REQUEST_TIMEOUT_S).json()


class Traffic(threading.Thread):
    """Recommendation requests to one serving instance, each retried up to RETRY_BUDGET times."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.requests = self.retries = self.failed = self.degraded = 0
        self.slowest_s = 0.0
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                self.requests += 1
                started = time.monotonic()
                for attempt in range(RETRY_BUDGET + 1):
                    try:
                        answer = client.post("/v1/recommend", json={"user_id": f"u{n % 100}", "k": 5})
                        if answer.status_code < 500:
                            assert answer.status_code == 200, answer.text
                            self.degraded += bool(answer.json()["degraded"])
                            break
                        error = f"{answer.status_code} {answer.text[:200]}"
                    except httpx.HTTPError as exc:
                        error = f"{type(exc).__name__}: {exc}"
                    if attempt == RETRY_BUDGET:
                        self.failed += 1
                        self.errors.append(error)
                    else:
                        self.retries += 1
                        time.sleep(0.2)
                self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                time.sleep(0.05)

    def summary(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "failed_beyond_budget": self.failed,
            "degraded_answers": self.degraded,
            "slowest_request_s": round(self.slowest_s, 3),
        }


def test_the_deployed_loop_trains_promotes_serves_and_fails_over_across_datacenters(stack: Stack) -> None:
    figures = stack.figures
    figures["up_to_healthy_s"] = round(stack.up_s, 1)

    # 1. simulated traffic into the containerised Kafka; the stream worker turns it into samples
    in_container(
        "stream-worker",
        "recsys", "simulate", "--users", "300", "--items", "200", "--requests", "1500", "--seed", "20",
    )  # fmt: skip
    count = [
        "python",
        "-c",
        "import json; from core.settings import Settings; from training.lifecycle.job import count_new_samples; "
        "print(json.dumps(count_new_samples(Settings())))",
    ]
    samples = wait_for(
        "samples on the samples topic",
        lambda: (found := json.loads(in_container("stream-worker", *count)))["new"] >= 1000 and found,
        timeout=180,
        every=5,
    )
    figures["samples"] = samples["new"]

    # 2. the training DAG, triggered through the containerised Airflow's REST API
    with airflow_client() as airflow:
        wait_for("the DAG parsed by the dag-processor", lambda: airflow.get(f"/dags/{DAG}").status_code == 200, 180)
        unpaused = airflow.patch(f"/dags/{DAG}", json={"is_paused": False})
        assert unpaused.status_code == 200, unpaused.text
        triggered = airflow.post(
            f"/dags/{DAG}/dagRuns", json={"logical_date": None, "conf": {"epochs": 1, "min_new_samples": 1}}
        )
        assert triggered.status_code == 200, triggered.text
        run_id = triggered.json()["dag_run_id"]
        started = time.monotonic()
        state = wait_for(
            "the training run finished",
            lambda: (s := airflow.get(f"/dags/{DAG}/dagRuns/{run_id}").json()["state"]) in ("success", "failed") and s,
            timeout=600,
            every=5,
        )
        figures["training_run_s"] = round(time.monotonic() - started, 1)
        instances = airflow.get(f"/dags/{DAG}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
        tasks = {t["task_id"]: t["state"] for t in instances}
        assert state == "success", f"training run {run_id}: {state}, tasks {tasks}"
        # 3. the champion promoted, published to both replicas, serving told to reload
        for task in ("check_new_samples", "train", "evaluate", "gate", "promote", "publish", "reload_serving"):
            if tasks.get(task) != "success":
                # a task skipped by the short circuit before it never ran: the logs that say why
                logs = {
                    t["task_id"]: airflow.get(
                        f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/{t['task_id']}/logs/{t['try_number']}",
                        params={"full_content": True},
                    ).text[-3000:]
                    for t in instances
                    if t["try_number"] >= 1
                }
                raise AssertionError(f"{task}: {tasks.get(task)} (tasks {tasks}); the logs:\n{logs}")
        xcom = airflow.get(f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/promote/xcomEntries/return_value")
        assert xcom.status_code == 200, xcom.text
        promoted = xcom.json()["value"]
        promoted = json.loads(promoted) if isinstance(promoted, str) else promoted
    champion = str(promoted["champion"])
    figures["champion"] = champion

    # 4. both serving instances answer with the champion, each from its own datacenter's replica
    for name, own_replica in (("serving-a", 0), ("serving-b", 1)):
        ready = wait_for(
            f"{name} ready with the champion",
            lambda name=name: (r := readiness(name))["ready"] and r["model_version"] == champion and r,
            timeout=120,
        )
        assert ready["replica_in_use"] == own_replica, f"{name} reads replica {ready['replica_in_use']}"
        answer = httpx.post(f"{SERVING[name]}/v1/recommend", json={"user_id": "u1", "k": 5}, timeout=30)
        assert answer.status_code == 200 and answer.json()["model_version"] == champion, answer.text
        assert len(answer.json()["items"]) == 5

    # 5. replica-a's datacenter goes away: serving-a moves to replica-b, no request fails beyond its budget
    traffic = Traffic(SERVING["serving-a"])
    traffic.start()
    time.sleep(3)
    stopped = time.monotonic()
    podman("stop", "-t", "1", container("redis-replica-a"))
    wait_for("serving-a reading replica-b", lambda: readiness("serving-a")["replica_in_use"] == 1, 60, every=0.2)
    figures["failover_s"] = round(time.monotonic() - stopped, 2)
    time.sleep(5)
    during_outage = traffic.summary()
    assert readiness("serving-a")["ready"], "serving-a not ready on replica-b alone"

    # 6. replica-a back (empty): its replicator refills it, serving-a returns to its own datacenter
    restarted = time.monotonic()
    podman("start", container("redis-replica-a"))
    wait_for(
        "serving-a back on replica-a, caught up",
        lambda: (r := readiness("serving-a"))["replica_in_use"] == 0 and r["replicas_healthy"] == [True, True],
        timeout=180,
        every=0.5,
    )
    figures["return_s"] = round(time.monotonic() - restarted, 2)
    time.sleep(3)
    traffic.stop.set()
    traffic.join(timeout=30)
    figures["traffic_during_outage"] = during_outage
    figures["traffic_total"] = traffic.summary()
    assert traffic.failed == 0, f"{traffic.failed} requests failed beyond the retry budget: {traffic.errors[:5]}"
    assert traffic.requests > 20, traffic.summary()
    answer = httpx.post(f"{SERVING['serving-a']}/v1/recommend", json={"user_id": "u2", "k": 5}, timeout=30)
    assert answer.status_code == 200 and answer.json()["model_version"] == champion, answer.text

    print("\ndeploy smoke figures:", json.dumps(figures, indent=2))
    reports = PROJECT_ROOT / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "deploy-smoke.json").write_text(json.dumps(figures, indent=2) + "\n")
