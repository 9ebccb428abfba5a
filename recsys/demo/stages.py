"""The stages of the demo: services, the training DAG, the champion, and serving queried with the
simulator's users (the closed-loop phases are ``loop``, the freshness probes ``probes``).

Each stage imports the rooms it drives inside its body, so importing the demo stays cheap.
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.settings import PROJECT_ROOT, Settings
from recsys.demo.config import TRAINING_DAG, DemoConfig, DemoError, Report, console, step
from recsys.demo.report import quantiles

if TYPE_CHECKING:
    from traffic.simulator import World


def recsys_command(*args: str) -> list[str]:
    """The command line of ``recsys ARGS`` with this interpreter."""
    return [sys.executable, "-m", "recsys.cli", *args]


def _run(cmd: list[str], what: str, timeout: float) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT)
    if done.returncode != 0:
        raise DemoError(f"{what} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


class Background(threading.Thread):
    """A start-up stage run beside the others; ``result()`` re-raises its failure."""

    def __init__(self, name: str, target: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None
        self.value: Any = None
        self.start()

    def run(self) -> None:
        try:
            self.value = self._target_fn()
        except BaseException as exc:  # noqa: BLE001 (re-raised by result())
            self.error = exc

    def result(self, timeout: float) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise DemoError(f"{self.name} did not finish within {timeout:.0f}s")
        if self.error is not None:
            raise DemoError(f"{self.name} failed: {self.error}") from self.error
        return self.value


@dataclass(frozen=True)
class Startup:
    """The start-ups still running in the background when ``start_services`` returns."""

    serving: Background  # MLflow (when a server is wanted), then serving
    airflow: Background


def start_services(s: Settings, config: DemoConfig, report: Report) -> Startup:
    """Kafka, Redis and the parameter service now; MLflow + serving and Airflow in the background; the stream worker."""
    from core.kafka import ensure_topics
    from local_services import airflow as airflow_local
    from local_services import kafka as local_kafka
    from local_services import prometheus as local_prometheus
    from local_services import services

    step(
        f"Kafka on 127.0.0.1:{s.local.kafka_port}, Redis on 127.0.0.1:{s.local.redis_port} "
        f"(logs under {s.local.run_dir}/logs)"
    )
    local_kafka.start_configured_kafka(s)
    asyncio.run(ensure_topics(s.kafka.bootstrap, s.kafka.all_topics()))
    services.start_redis(s.local.run_dir, s.local.redis_port, timeout=s.local.service_start_timeout_s)

    step(f"parameter service: training copy {s.ps.shards}, inference replicas {s.ps.replicas} + replicators")
    _run(recsys_command("ps", "up"), "recsys ps up", 180)

    def mlflow_then_serving() -> None:
        if config.mlflow_server:
            # basic auth when RECSYS_MLFLOW_USERNAME / _PASSWORD are set (README "Deploying safely")
            auth = services.MlflowAuth.from_settings(s.mlflow)
            services.start_mlflow(s.local.run_dir, config.mlflow_port, timeout=config.stage_timeout_s, auth=auth)
        port = s.serving.port
        services.start_command(
            s.local.run_dir,
            "serving",
            recsys_command("serve", "--port", str(port)),
            port=port,
            marker=f"serve --port {port}",
            cwd=PROJECT_ROOT,
            timeout=config.stage_timeout_s,
            ready=lambda: services.http_ok(f"http://127.0.0.1:{port}/healthz"),
        )

    def airflow() -> str:
        return airflow_local.up(s).password

    step("starting MLflow, serving and Airflow in the background; the stream worker now")
    report.urls = {
        "airflow_ui": airflow_local.base_url(s),
        "mlflow_ui": s.mlflow.tracking_uri if config.mlflow_server else f"(no server) {s.mlflow.tracking_uri}",
        "airflow_login": f"admin, password in {airflow_local.layout(s).passwords_file}",
        "serving_docs": f"http://127.0.0.1:{s.serving.port}/docs",
    }
    startup = Startup(
        serving=Background("MLflow + serving start", mlflow_then_serving),
        airflow=Background("recsys airflow up", airflow),
    )
    # Faust retitles its process ("[Faust:Worker] -running- <app id> ... <data dir>"), so the command
    # line is not a marker that outlives start-up; the data dir is, and `services down` finds it by it
    services.start_command(
        s.local.run_dir,
        "stream-worker",
        recsys_command("stream", "worker"),
        marker=str(s.stream_data_dir),
        cwd=PROJECT_ROOT,
    )
    step("Prometheus scraping every component, and the loop dashboard")
    report.urls["loop_dashboard"] = local_prometheus.up(s)
    report.urls["feast_ui"] = feast_ui_command(s)
    return startup


def feast_ui_command(s: Settings) -> str:
    """The command that opens Feast's own UI on the demo's feature registry (its assets are in the wheel:
    it works offline)."""
    return (
        f"RECSYS_FEAST_DATA_DIR={shlex.quote(str(s.feast.data_dir))} uv run feast -c "
        f"{shlex.quote(str(s.feast.repo_path))} ui --host 127.0.0.1 --port {s.feast.ui_port}"
    )


def run_training_dag(
    s: Settings, config: DemoConfig, startup: Startup, on_success: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Trigger the training DAG through Airflow's REST API, wait for its run to end; its state and task states.

    ``on_success(task_id)`` is called once per task, when its success is first seen (polled every
    3 s). A refused challenger skips promote, publish and reload (the run still succeeds); any
    failed task fails the demo.
    """
    conf = {"epochs": config.epochs, "ranks": config.ranks, "min_new_samples": 1}
    return run_dag(s, config, startup, TRAINING_DAG, conf, on_success)


def run_dag(
    s: Settings,
    config: DemoConfig,
    startup: Startup,
    dag_id: str,
    conf: dict[str, Any],
    on_success: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Trigger ``dag_id`` through Airflow's REST API with ``conf``, wait for its run to end (see run_training_dag)."""
    import httpx

    from local_services import airflow as airflow_local

    startup.airflow.result(config.stage_timeout_s)
    startup.serving.result(config.stage_timeout_s)
    base = airflow_local.base_url(s)
    headers = {"Authorization": f"Bearer {airflow_local.api_token(s)}"}
    step(f"triggering {dag_id} through Airflow's REST API ({base}/api/v2)")
    with httpx.Client(base_url=f"{base}/api/v2", headers=headers, timeout=30.0) as api:
        deadline = time.monotonic() + config.stage_timeout_s
        while api.get(f"/dags/{dag_id}").status_code != 200:  # the dag-processor parses it first
            if time.monotonic() > deadline:
                raise DemoError(f"Airflow never listed {dag_id}")
            time.sleep(2.0)
        api.patch(f"/dags/{dag_id}", json={"is_paused": False})
        response = api.post(
            f"/dags/{dag_id}/dagRuns",
            json={"logical_date": None, "conf": conf},
        )
        if response.status_code >= 300:
            raise DemoError(f"trigger failed: {response.status_code} {response.text[:500]}")
        run_id = response.json()["dag_run_id"]
        started = time.monotonic()
        state = "queued"
        succeeded: set[str] = set()
        tasks: list[dict[str, Any]] = []
        while state not in ("success", "failed"):
            if time.monotonic() > deadline:
                raise DemoError(f"DAG run {run_id} still {state} after {config.stage_timeout_s:.0f}s")
            time.sleep(3.0)
            state = api.get(f"/dags/{dag_id}/dagRuns/{run_id}").json().get("state", "?")
            tasks = api.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json().get("task_instances", [])
            for task in tasks:
                if task["state"] == "success" and task["task_id"] not in succeeded:
                    succeeded.add(task["task_id"])
                    if on_success is not None:
                        on_success(task["task_id"])
        tasks = api.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json().get("task_instances", [])
    dag = {
        "run_id": run_id,
        "state": state,
        "seconds": round(time.monotonic() - started, 1),
        "tasks": {t["task_id"]: t["state"] for t in tasks},
    }
    console.print(dag)
    if state != "success" or "failed" in dag["tasks"].values():
        raise DemoError(
            f"DAG run {dag_id} {run_id} {state}: {dag['tasks']} (task logs under {s.local.run_dir}/airflow/logs)"
        )
    return dag


def champion(s: Settings, report: Report) -> tuple[Any, str]:
    """The registry's champion after the DAG run and its training figures; (MLflow client, version)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=s.mlflow.tracking_uri)
    try:
        mv = client.get_model_version_by_alias(s.train.model_name, "champion")
    except Exception as exc:  # noqa: BLE001 (MlflowException: no alias)
        raise DemoError(f"no champion of {s.train.model_name} after the DAG run: {exc}") from exc
    if mv.run_id is None:
        raise DemoError(f"champion {s.train.model_name} v{mv.version} has no training run")
    run = client.get_run(mv.run_id)
    history = client.get_metric_history(mv.run_id, "loss")
    report.model.update(
        {
            "name": s.train.model_name,
            "champion_version": mv.version,
            "run_id": mv.run_id,
            "eval_auc": run.data.metrics.get("eval_auc"),
            "eval_logloss": run.data.metrics.get("eval_logloss"),
            "train_samples": run.data.metrics.get("train_samples"),
            "eval_samples": run.data.metrics.get("eval_samples"),
            "gate": mv.tags.get("recsys_gate"),
            "ps_version": mv.tags.get("ps_version"),
            "loss_history": [(h.step, h.value) for h in sorted(history, key=lambda h: h.step)],
        }
    )
    return client, str(mv.version)


def served_version(base: str) -> str | None:
    """The model version serving reports on /readyz, None while it does not answer."""
    import httpx

    try:
        body = httpx.get(f"{base}/readyz", timeout=2.0).json()
    except (httpx.HTTPError, ValueError):
        return None
    return body.get("model_version")


def wait_served(base: str, expected: str, timeout: float) -> float:
    """Seconds until serving at ``base`` reports model version ``expected`` (DemoError after ``timeout``)."""
    started = time.perf_counter()
    while served_version(base) != expected:
        if time.perf_counter() - started > timeout:
            raise DemoError(
                f"serving at {base} did not load {expected} within {timeout:.0f}s (serves {served_version(base)})"
            )
        time.sleep(0.01)
    return time.perf_counter() - started


def query_serving(
    s: Settings, config: DemoConfig, world: World, version: str, report: Report, settled: bool = False
) -> None:
    """Latency and expected CTR of served top 10s; ``settled``: again after the freshness probes.

    Both are kept: they once differed (serving kept the initial rows of tables created after it
    started until the next push; fixed in serving.params), and the two figures show it stays fixed.
    """
    import httpx
    import numpy as np

    base = f"http://127.0.0.1:{s.serving.port}"
    expected = f"{s.serving.model_name}/{version}"
    step(f"serving at {base}: waiting for {expected}, then {config.query_users} recommendation requests")
    wait_served(base, expected, config.stage_timeout_s)
    n_users, n_items = len(world.user_ids), len(world.item_ids)
    rng = np.random.default_rng(config.seed + 7)
    # users ask for recommendations as often as they visit: sample them by the simulator's activity
    users = rng.choice(n_users, min(config.query_users, n_users), replace=False, p=world.user_activity)
    latencies: list[float] = []
    served: list[float] = []
    rand: list[float] = []
    best: list[float] = []
    wins = 0
    versions: set[str] = set()
    flags: Counter[str] = Counter(degraded=0, cold_start=0)
    reasons: Counter[str] = Counter()
    with httpx.Client(base_url=base, timeout=30.0) as http:
        for user in users.tolist():
            sent = time.perf_counter()
            r = http.post(
                "/v1/recommend",
                json={"user_id": world.user_ids[user], "k": 10, "candidate_item_ids": list(world.item_ids)},
            )
            latencies.append(time.perf_counter() - sent)
            if r.status_code != 200:
                raise DemoError(f"/v1/recommend answered {r.status_code}: {r.text[:300]}")
            body = r.json()
            versions.add(body["model_version"])
            flags["degraded"] += bool(body.get("degraded"))
            flags["cold_start"] += bool(body.get("cold_start"))
            reasons.update(body.get("degraded_reasons") or [])
            index = {item: j for j, item in enumerate(world.item_ids)}
            chosen = np.array([index[i["item_id"]] for i in body["items"]])
            truth = world.click_probability(user, np.arange(n_items), np.zeros(n_items))
            served.append(float(truth[chosen].mean()))
            rand.append(float(truth.mean()))
            best.append(float(np.sort(truth)[-len(chosen) :].mean()))
            wins += served[-1] > rand[-1]
    measured = {
        "url": base,
        "requests": len(latencies),
        "latency": quantiles(latencies),
        "model_versions": sorted(versions),
        "expected_ctr_top10": {
            "served": float(np.mean(served)),
            "random": float(np.mean(rand)),
            "oracle": float(np.mean(best)),
        },
        "served_beats_random_share": wins / len(latencies),
        "degraded_answers": flags["degraded"],
        "cold_start_answers": flags["cold_start"],
        "degraded_reasons": dict(reasons),
    }
    if settled:
        report.serving["settled"] = {
            k: measured[k]
            for k in (
                "requests",
                "latency",
                "model_versions",
                "expected_ctr_top10",
                "served_beats_random_share",
                "degraded_answers",
                "cold_start_answers",
            )
        }
        console.print({"settled": report.serving["settled"]})
    else:
        report.serving = measured
        console.print(report.serving)


def stop_everything(s: Settings) -> None:
    """Stop Airflow, then every service of the run directory, consumers before what they consume."""
    from local_services import airflow as airflow_local
    from local_services import services

    airflow_local.down(s)
    entries = services.status(s.local.run_dir)
    order = [
        "prometheus",
        "loop-exporter",
        "serving",
        "stream-worker",
        "ps-replicator",
        "mlflow",
        "ps-",
        "redis",
        "kafka",
    ]

    def rank(name: str) -> int:
        return next((i for i, prefix in enumerate(order) if name.startswith(prefix)), len(order))

    for entry in sorted(entries, key=lambda e: rank(e.name)):
        services.stop(s.local.run_dir, entry.name)
