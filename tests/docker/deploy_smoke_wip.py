"""NOT YET PASSING END TO END, so not collected by pytest (the file name does not match test_*.py): run it
with `uv run pytest -s tests/docker/deploy_smoke_wip.py`. Rename it to test_deploy_smoke.py once it passes
(and point bench/deploy.py's TEST at it) so CI runs it. Where it stands: README "Deployment (docker)".

The deployed loop, end to end, on the compose stack started with podman (`scripts/deploy.sh`, `make deploy`).

Simulated traffic into the containerised Kafka -> samples on the samples topic -> the training DAG
triggered through the containerised Airflow's REST API -> champion promoted -> both serving
instances answer with it -> replica-a's container stopped: serving-a fails over to replica-b with
no request failing beyond its retry budget -> replica-a started again (empty: it keeps no data): its
replicator refills it and serving-a returns to it -> the stack stops, nothing of it left.

The stack is a project of its own (``recsys-smoke-…``: its own containers, network and volumes),
publishing its ports on 127.0.0.1 at free ports, so it runs beside other tests and a running
`make deploy`. The images are built first (`scripts/build-images.sh`: tools, base image and
images when missing; podman's layer cache otherwise, so the image holds this checkout's code).

Each step asserts what it reached, so a failure names the first step that did not happen. The
figures (build, image sizes, time to healthy, failover and return, requests and retries during the
outage) are printed (`-s`) and written to reports/deploy-smoke.json; `uv run python -m bench deploy`
runs this test and prints them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.procs import free_port
from core.settings import PROJECT_ROOT

# the images built on a fresh machine (~7 min) + the stack up (~3-4 min) + the loop (~3 min), loaded
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3000)]

DEPLOY = PROJECT_ROOT / "scripts" / "deploy.sh"
BUILD = PROJECT_ROOT / "scripts" / "build-images.sh"
CONTAINERS_CONF = PROJECT_ROOT / "docker" / "podman" / "containers.conf"
REPORT = PROJECT_ROOT / "reports" / "deploy-smoke.json"
IMAGES = (
    "localhost/recsys:latest",
    "localhost/recsys-kafka:latest",
    "localhost/recsys-redis:latest",
    "localhost/recsys-postgres:latest",
)
# the published ports docker/compose.yaml makes configurable; each gets a free one
PORTS = ("KAFKA", "REDIS_TRAIN", "REDIS_REPLICA_A", "REDIS_REPLICA_B", "REDIS_FEATURES", "POSTGRES", "MLFLOW")
PORTS += ("AIRFLOW", "SERVING_A", "SERVING_B", "METRICS")
DAG = "recsys_training"
# a client's retry budget: a request may fail this many times (connection error or 5xx) and still
# count as served; one failing beyond it fails the test
RETRY_BUDGET = 2
# the samples the traffic below gives once drained: ~1,000 clicks and ~5,000 negatives (of 10,000 impressions,
# those whose attribution window closed); 3,000 make an evaluable window (2,000: core.settings GateSettings)
MIN_SAMPLES = 3000
REQUEST_TIMEOUT_S = 10.0
BUILD_TIMEOUT_S = 1800  # a fresh machine: tools, debootstrap, ~6 GB of wheels into the app image
# deploy.sh's wait for each of its three stages; the last (a dozen Python services starting on 2 cores) took
# ~10 min at load average 30-40
STAGE_TIMEOUT_S = 900
UP_TIMEOUT_S = 1500


def podman(*args: str, timeout: float = 120) -> str:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    done = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"podman {' '.join(args)} failed: {done.stderr[-2000:]}"
    return done.stdout


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 2.0) -> Any:
    """Poll ``check()`` until it returns a truthy value; fail naming ``what`` (and the last value) after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, AssertionError, json.JSONDecodeError, KeyError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"{what}: not reached in {timeout:.0f} s (last: {last!r})")


def read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


@dataclass
class Stack:
    """A running compose project: its name, the environment it was started with, its URLs and figures."""

    project: str
    env: dict[str, str]
    figures: dict[str, Any] = field(default_factory=dict)

    def port(self, name: str) -> int:
        return int(self.env[f"RECSYS_DEPLOY_{name}_PORT"])

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port(name)}"

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def exec(self, service: str, *command: str, timeout: float = 300) -> str:
        """A command in one of the stack's running containers (its environment: the deployment's settings)."""
        return podman("exec", self.container(service), *command, timeout=timeout)


def project_containers(project: str) -> list[str]:
    label = f"label=io.podman.compose.project={project}"
    return podman("ps", "-a", "--filter", label, "--format", "{{.Names}}").split()


def project_volumes(project: str) -> list[str]:
    return [v for v in podman("volume", "ls", "--format", "{{.Name}}").split() if v.startswith(f"{project}_")]


@pytest.fixture(scope="module")
def images() -> dict[str, Any]:
    """The stack's images, built when missing (tools and base image too) or rebuilt from the layer cache.

    Rebuilding rather than taking any image that exists keeps the test honest: the image holds this
    checkout's code (an unchanged checkout costs seconds, every layer cached).
    """
    present = shutil.which("podman") is not None and all(
        subprocess.run(["podman", "image", "exists", image], capture_output=True).returncode == 0 for image in IMAGES
    )
    started = time.monotonic()
    built = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    build_s = time.monotonic() - started
    assert built.returncode == 0, f"scripts/build-images.sh failed after {build_s:.0f} s:\n{built.stderr[-4000:]}"
    sizes = {image: round(int(podman("image", "inspect", "--format", "{{.Size}}", image)) / 1e6) for image in IMAGES}
    return {"images_present_before": present, "build_s": round(build_s, 1), "image_sizes_mb": sizes}


@pytest.fixture(scope="module")
def stack(images: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    project = f"recsys-smoke-{secrets.token_hex(3)}"
    env = {
        **os.environ,
        "RECSYS_DEPLOY_PROJECT": project,
        "RECSYS_DEPLOY_SECRETS": str(tmp_path_factory.mktemp("deploy") / "secrets.env"),  # fresh secrets
        "RECSYS_DEPLOY_BUILD": "0",
        "RECSYS_DEPLOY_TIMEOUT": str(STAGE_TIMEOUT_S),  # built by the images fixture: time to healthy without the build
        "RECSYS_DEPLOY_HOST_IP": "127.0.0.1",
        "RECSYS_DEPLOY_TRAINING_SCHEDULE": "",  # manual runs only: no scheduled run beside the triggered one
        **{f"RECSYS_DEPLOY_{name}_PORT": str(free_port()) for name in PORTS},
    }
    load_before = load()
    started = time.monotonic()
    up = subprocess.run([str(DEPLOY), "up"], env=env, capture_output=True, text=True, timeout=UP_TIMEOUT_S)
    up_s = time.monotonic() - started
    try:
        assert up.returncode == 0, f"`deploy.sh up` failed after {up_s:.0f} s:\n{up.stderr[-4000:]}"
        stages = [line.split("] ", 1)[-1] for line in up.stderr.splitlines() if "healthy" in line]
        yield Stack(
            project,
            env,
            {**images, "up_to_healthy_s": round(up_s, 1), "stages": stages, "load_at_up": [load_before, load()]},
        )
    finally:
        down = subprocess.run([str(DEPLOY), "down"], env=env, capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr[-2000:]
        assert not project_containers(project), f"containers of {project} left after `deploy.sh down`"
        assert not project_volumes(project), f"volumes of {project} left after `deploy.sh down`"


def airflow_client(stack: Stack) -> httpx.Client:
    """A client of the containerised Airflow's REST API, with a JWT from its simple auth manager."""
    generated = "/data/airflow/simple_auth_manager_passwords.json.generated"
    password = json.loads(stack.exec("airflow-api-server", "cat", generated))["admin"]
    url = stack.url("AIRFLOW")
    token = httpx.post(f"{url}/auth/token", json={"username": "admin", "password": password}, timeout=30)
    assert token.status_code in (200, 201), token.text
    return httpx.Client(
        base_url=f"{url}/api/v2", headers={"Authorization": f"Bearer {token.json()['access_token']}"}, timeout=30
    )


def task_logs(stack: Stack, run_id: str) -> str:
    """The run's task logs, read where LocalExecutor wrote them (the scheduler's container), last lines each."""
    script = (
        f"find /data/airflow/logs -path '*run_id={run_id}*' -name '*.log' | sort | "
        'while read -r f; do echo "== $f"; tail -c 3000 "$f"; done'
    )
    try:
        return stack.exec("airflow-scheduler", "sh", "-c", script, timeout=60)
    except AssertionError as exc:
        return f"(task logs not readable: {exc})"


def readiness(stack: Stack, serving: str) -> dict[str, Any]:
    return httpx.get(f"{stack.url(serving)}/readyz", timeout=REQUEST_TIMEOUT_S).json()


@dataclass
class Request:
    started: float  # time.monotonic()
    latency_s: float
    attempts: int
    served: bool


class Traffic(threading.Thread):
    """Recommendation requests to one serving instance, each retried up to RETRY_BUDGET times."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.log: list[Request] = []
        self.degraded = 0
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                started = time.monotonic()
                served = False
                for attempt in range(1, RETRY_BUDGET + 2):
                    try:
                        answer = client.post("/v1/recommend", json={"user_id": f"u{n % 100}", "k": 5})
                        if answer.status_code < 500:
                            served = answer.status_code == 200
                            if served:
                                self.degraded += bool(answer.json()["degraded"])
                            else:
                                self.errors.append(f"{answer.status_code} {answer.text[:200]}")
                            break
                        error = f"{answer.status_code} {answer.text[:200]}"
                    except httpx.HTTPError as exc:
                        error = f"{type(exc).__name__}: {exc}"
                    if attempt == RETRY_BUDGET + 1:
                        self.errors.append(error)
                    else:
                        time.sleep(0.2)
                self.log.append(Request(started, time.monotonic() - started, attempt, served))
                time.sleep(0.05)

    def summary(self, since: float = 0.0, until: float = float("inf")) -> dict[str, Any]:
        window = [r for r in self.log if since <= r.started <= until]
        return {
            "requests": len(window),
            "retried": sum(r.attempts > 1 for r in window),
            "failed_beyond_budget": sum(not r.served for r in window),
            "slowest_request_s": round(max((r.latency_s for r in window), default=0.0), 3),
        }


def test_the_deployed_loop_trains_promotes_serves_and_fails_over_across_datacenters(stack: Stack) -> None:
    figures = stack.figures
    loop_started = time.monotonic()

    # 1. simulated traffic into the containerised Kafka; the stream worker turns it into samples. Its event
    # time spans the ~21 minutes before now: a negative is emitted when the watermark passes an impression's
    # attribution window (10 min of event time), so traffic of a few seconds would give clicks only and an
    # empty evaluation set (the gate refuses such a challenger)
    stack.exec(
        "stream-worker",
        "recsys", "simulate", "--users", "300", "--items", "200", "--requests", "1000", "--seed", "20",
        "--requests-per-second", "0.8",
    )  # fmt: skip
    count = [
        "python",
        "-c",
        "import json; from core.settings import Settings; from training.lifecycle.job import count_new_samples; "
        "print(json.dumps(count_new_samples(Settings())))",
    ]
    counted: list[int] = []

    def enough() -> dict[str, Any] | bool:
        """The count once enough samples arrived. Not "until it stops growing": the worker's watermark follows
        the wall clock while traffic is idle, so windows keep closing (negatives) for 10 minutes after it."""
        found = json.loads(stack.exec("stream-worker", *count))
        counted.append(found["new"])
        return found["new"] >= MIN_SAMPLES and found

    try:
        samples = wait_for("samples on the samples topic", enough, timeout=600, every=5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; counted {counted}") from None
    figures["samples"] = samples["new"]

    # 2. the training DAG, triggered through the containerised Airflow's REST API
    with airflow_client(stack) as airflow:
        wait_for("the DAG parsed by the dag-processor", lambda: airflow.get(f"/dags/{DAG}").status_code == 200, 180)
        unpaused = airflow.patch(f"/dags/{DAG}", json={"is_paused": False})
        assert unpaused.status_code == 200, unpaused.text
        # the few samples of a smoke test: below the default min_new_samples (a production window's size)
        conf = {"epochs": 1, "min_new_samples": 1}
        triggered = airflow.post(f"/dags/{DAG}/dagRuns", json={"logical_date": None, "conf": conf})
        assert triggered.status_code == 200, triggered.text
        run_id = triggered.json()["dag_run_id"]
        assert triggered.json()["conf"] == conf, triggered.json()
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
        # 3. the champion promoted, published to both replicas, serving told to reload
        for task in ("check_new_samples", "train", "evaluate", "gate", "promote", "publish", "reload_serving"):
            assert tasks.get(task) == "success", (
                f"training run {run_id}: {state}; {task}: {tasks.get(task)} (tasks {tasks}); the logs:\n"
                + task_logs(stack, run_id)
            )
        xcom = airflow.get(f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/promote/xcomEntries/return_value")
        assert xcom.status_code == 200, xcom.text
        promoted = xcom.json()["value"]
        promoted = json.loads(promoted) if isinstance(promoted, str) else promoted
    champion = str(promoted["champion"])
    figures["champion"] = champion

    # 4. both serving instances answer with the champion, each from its own datacenter's replica
    # (RECSYS_PS_REPLICAS lists its own first: index 0 for both)
    for name in ("SERVING_A", "SERVING_B"):
        ready = wait_for(
            f"{name} ready with the champion",
            lambda name=name: (r := readiness(stack, name))["ready"] and r["model_version"] == champion and r,
            timeout=120,
        )
        assert ready["replica_in_use"] == 0, f"{name} reads its replica {ready['replica_in_use']}, not its own"
        answer = httpx.post(f"{stack.url(name)}/v1/recommend", json={"user_id": "u1", "k": 5}, timeout=30)
        assert answer.status_code == 200 and answer.json()["model_version"] == champion, answer.text
        assert len(answer.json()["items"]) == 5

    # 5. replica-a's datacenter goes away: serving-a moves to replica-b, no request fails beyond its budget
    traffic = Traffic(stack.url("SERVING_A"))
    traffic.start()
    time.sleep(3)
    stopped = time.monotonic()
    podman("stop", "-t", "1", stack.container("redis-replica-a"))
    wait_for("serving-a reading replica-b", lambda: readiness(stack, "SERVING_A")["replica_in_use"] == 1, 60, every=0.2)
    figures["failover_s"] = round(time.monotonic() - stopped, 2)
    time.sleep(5)
    outage_seen = time.monotonic()
    assert readiness(stack, "SERVING_A")["ready"], "serving-a not ready on replica-b alone"

    # 6. replica-a back (empty): its replicator refills it, serving-a returns to its own datacenter
    restarted = time.monotonic()
    podman("start", stack.container("redis-replica-a"))
    wait_for(
        "serving-a back on replica-a, caught up",
        lambda: (r := readiness(stack, "SERVING_A"))["replica_in_use"] == 0 and r["replicas_healthy"] == [True, True],
        timeout=180,
        every=0.5,
    )
    figures["return_s"] = round(time.monotonic() - restarted, 2)
    time.sleep(3)
    traffic.stop.set()
    traffic.join(timeout=30)
    figures["traffic_during_outage"] = traffic.summary(stopped, outage_seen)
    figures["traffic_during_return"] = traffic.summary(restarted)
    figures["traffic_total"] = {**traffic.summary(), "degraded_answers": traffic.degraded}
    total = figures["traffic_total"]
    assert total["failed_beyond_budget"] == 0, f"requests failed beyond the retry budget: {traffic.errors[:5]}"
    assert figures["traffic_during_outage"]["requests"] > 10, figures
    answer = httpx.post(f"{stack.url('SERVING_A')}/v1/recommend", json={"user_id": "u2", "k": 5}, timeout=30)
    assert answer.status_code == 200 and answer.json()["model_version"] == champion, answer.text

    figures["loop_s"] = round(time.monotonic() - loop_started, 1)
    figures["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    figures["load_at_end"] = load()
    print("\ndeploy smoke figures:", json.dumps(figures, indent=2))
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(figures, indent=2) + "\n")
