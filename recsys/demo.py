"""`recsys demo`: the whole loop on one machine, measured, and a report of it.

Services (Kafka, Redis, parameter service with two inference replicas, MLflow, Airflow, the
stream worker, serving) -> simulated traffic -> the training DAG through the running Airflow ->
champion served -> recommendations queried -> freshness probes -> Markdown + PNG report.

Like ``recsys/cli.py`` this module orchestrates the rooms, so it imports them, always inside
functions: importing it (``recsys --help``) stays cheap.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from core.settings import PROJECT_ROOT, Settings

console = Console(stderr=True)
TRAINING_DAG = "recsys_training"
PROBE_TABLE = "demo_freshness_probe"
# freshness chains, in report order: key -> label
CHAINS = {
    "event_to_feature_online": "event → feature online",
    "click_to_sample": "click → sample",
    "push_to_replica_applied": "push → replica applied (all replicas)",
    "champion_to_serving_reload": "champion change → serving reload",
}


class DemoError(RuntimeError):
    """A stage of the demo failed; the message says which and why."""


@dataclass
class DemoConfig:
    users: int = 500
    items: int = 300
    requests: int = 4000
    seed: int = 1
    bad_fraction: float = 0.01
    rate: float = 0.0
    epochs: int = 4
    ranks: int = 1
    probes: int = 20
    query_users: int = 100
    mlflow_server: bool = True
    mlflow_port: int = 5000
    stop: bool = False
    stage_timeout_s: float = 600.0
    report_dir: Path | None = None


@dataclass
class Report:
    started: str
    config: dict[str, Any]
    urls: dict[str, str] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    dag: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    serving: dict[str, Any] = field(default_factory=dict)
    freshness: dict[str, dict[str, Any]] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- configuration


def demo_overrides(env: Mapping[str, str], run_dir: Path, mlflow_port: int | None) -> dict[str, str]:
    """RECSYS_* values the demo needs, for every variable the caller did not set itself.

    Two inference replicas stand for two datacenters; the attribution window is short so the
    negatives of a few minutes of traffic close during the demo; Airflow runs the training DAG
    only when triggered; serving polls the champion alias every second.
    """
    base = Settings()
    rp = base.local.redis_port
    token_file = run_dir / "demo" / "serving_admin_token"
    if token_file.exists():
        token = token_file.read_text().strip()
    else:
        token = secrets.token_urlsafe(24)
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text(token)
        token_file.chmod(0o600)
    tracking = f"http://127.0.0.1:{mlflow_port}" if mlflow_port else f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}"
    wanted = {
        "RUN_DIR": str(run_dir),
        "KAFKA_BOOTSTRAP": f"127.0.0.1:{base.local.kafka_port}",
        "REDIS_URL": f"redis://127.0.0.1:{rp}/0",
        "PS_SHARDS": json.dumps([f"redis://127.0.0.1:{rp + 1}/0"]),
        "PS_REPLICAS": json.dumps([f"redis://127.0.0.1:{rp + 2}/0", f"redis://127.0.0.1:{rp + 3}/0"]),
        "FEAST_ONLINE_STORE": "redis",
        "FEAST_DATA_DIR": str(run_dir / "feast"),
        "MLFLOW_TRACKING_URI": tracking,
        "SERVING_ADMIN_TOKEN": token,
        "SERVING_RELOAD_POLL_S": "1",
        "AIRFLOW_TRAINING_SCHEDULE": "",
        "AIRFLOW_FEATURES_SCHEDULE": "",
        "STREAM_ATTRIBUTION_WINDOW_S": "30",
        "PUBLISH_TIMEOUT_S": "180",
    }
    return {f"RECSYS_{k}": v for k, v in wanted.items() if f"RECSYS_{k}" not in env}


def _recsys_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "recsys.cli", *args]


def _run(cmd: list[str], what: str, timeout: float) -> str:
    import subprocess

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT)
    if done.returncode != 0:
        raise DemoError(f"{what} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def _step(message: str) -> None:
    console.print(f"\n[bold blue]==> {message}[/bold blue]")


class _Background(threading.Thread):
    """A start-up stage run beside the others; ``result()`` re-raises its failure."""

    def __init__(self, name: str, target: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn, self.error, self.value = target, None, None
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


def quantiles(values: list[float]) -> dict[str, Any]:
    """n, median and p99 (nearest rank on the sorted values) in seconds."""
    import numpy as np

    if not values:
        return {"n": 0, "median_s": None, "p99_s": None}
    arr = np.sort(np.asarray(values, dtype=float))
    return {
        "n": len(values),
        "median_s": float(np.median(arr)),
        "p99_s": float(arr[min(len(arr) - 1, int(np.ceil(0.99 * len(arr))) - 1)]),
        "max_s": float(arr[-1]),
    }


# --------------------------------------------------------------------------- stages


def start_services(s: Settings, config: DemoConfig, report: Report) -> None:
    from core.kafka import ensure_topics
    from local_services import airflow as airflow_local
    from local_services import kafka as local_kafka
    from local_services import services

    _step(
        f"Kafka on 127.0.0.1:{s.local.kafka_port}, Redis on 127.0.0.1:{s.local.redis_port} (logs under {s.local.run_dir}/logs)"
    )
    local_kafka.start_kafka(
        s.local.run_dir,
        s.local.cache_dir,
        s.local.kafka_version,
        s.local.kafka_port,
        s.local.kafka_controller_port,
        partitions=s.kafka.topic_partitions,
        timeout=s.local.service_start_timeout_s,
    )
    asyncio.run(
        ensure_topics(
            s.kafka.bootstrap,
            {
                t: s.kafka.topic_partitions
                for t in (s.kafka.topic_events, s.kafka.topic_samples, s.kafka.topic_deadletter, s.kafka.topic_late)
            },
        )
    )
    services.start_redis(s.local.run_dir, s.local.redis_port, timeout=s.local.service_start_timeout_s)

    _step(f"parameter service: training copy {s.ps.shards}, inference replicas {s.ps.replicas} + replicators")
    _run(_recsys_cmd("ps", "up"), "recsys ps up", 180)

    def mlflow_then_serving() -> None:
        if config.mlflow_server:
            services.start_mlflow(s.local.run_dir, config.mlflow_port, timeout=config.stage_timeout_s)
        port = s.serving.port
        services.start_command(
            s.local.run_dir,
            "serving",
            _recsys_cmd("serve", "--port", str(port)),
            port=port,
            marker=f"serve --port {port}",
            cwd=PROJECT_ROOT,
            timeout=config.stage_timeout_s,
            ready=lambda: services.http_ok(f"http://127.0.0.1:{port}/healthz"),
        )

    def airflow() -> str:
        return airflow_local.up(s).password

    _step("starting MLflow, serving and Airflow in the background; the stream worker now")
    report.urls = {
        "airflow_ui": airflow_local.base_url(s),
        "mlflow_ui": s.mlflow.tracking_uri if config.mlflow_server else f"(no server) {s.mlflow.tracking_uri}",
        "airflow_login": f"admin, password in {airflow_local.layout(s).passwords_file}",
        "serving_docs": f"http://127.0.0.1:{s.serving.port}/docs",
    }
    _BACKGROUND["serving"] = _Background("MLflow + serving start", mlflow_then_serving)
    _BACKGROUND["airflow"] = _Background("recsys airflow up", airflow)
    # Faust retitles its process ("[Faust:Worker] -running- <app id> ... <data dir>"), so the command
    # line is not a marker that outlives start-up; the data dir is, and `services down` finds it by it
    services.start_command(
        s.local.run_dir,
        "stream-worker",
        _recsys_cmd("stream", "worker"),
        marker=str(s.stream_data_dir),
        cwd=PROJECT_ROOT,
    )


_BACKGROUND: dict[str, _Background] = {}


async def _topic_total(bootstrap: str, topic: str) -> int:
    from core.kafka import end_offsets

    return sum((await end_offsets(bootstrap, topic)).values())


def simulate_and_stream(s: Settings, config: DemoConfig, report: Report) -> Any:
    from core.kafka import publish
    from traffic.simulator import SimConfig, Simulation

    totals = {
        t: asyncio.run(_topic_total(s.kafka.bootstrap, t))
        for t in (s.kafka.topic_events, s.kafka.topic_samples, s.kafka.topic_deadletter, s.kafka.topic_late)
    }
    sim_config = SimConfig(
        users=config.users,
        items=config.items,
        requests=config.requests,
        seed=config.seed,
        bad_fraction=config.bad_fraction,
    )
    sim = Simulation(sim_config)
    _step(
        f"simulating {config.requests} requests of {config.users} users over {config.items} items into Kafka "
        f"({config.bad_fraction:.0%} malformed records injected)"
    )
    result = asyncio.run(
        publish(
            sim.records(), s.kafka.bootstrap, s.kafka.topic_events, rate=config.rate, show_progress=sys.stderr.isatty()
        )
    )
    impressions, bad = len(sim.truth), sum(sim.stats.bad.values())
    report.counts.update(
        {
            "events_published": result.records,
            "events_by_type": dict(sim.stats.events),
            "bad_injected": bad,
            "bad_by_kind": dict(sim.stats.bad),
            "impressions": impressions,
            "clicks": int(sum(t.clicked for t in sim.truth)),
            "publish_seconds": round(result.seconds, 2),
        }
    )
    report.model["oracle_auc"] = sim.oracle_auc()

    _step(f"waiting for the stream worker: {impressions} samples and {bad} dead letters expected")
    deadline = time.monotonic() + config.stage_timeout_s
    seen: dict[str, int] = {}
    while True:
        seen = {t: asyncio.run(_topic_total(s.kafka.bootstrap, t)) - totals[t] for t in totals}
        if seen[s.kafka.topic_samples] >= impressions and seen[s.kafka.topic_deadletter] >= bad:
            break
        if time.monotonic() > deadline:
            raise DemoError(
                f"stream worker did not catch up in {config.stage_timeout_s:.0f}s: {seen} "
                f"(see {s.local.run_dir}/logs/stream-worker.log)"
            )
        time.sleep(2.0)
    report.counts.update(
        {
            "events_in": seen[s.kafka.topic_events],
            "deadlettered": seen[s.kafka.topic_deadletter],
            "samples": seen[s.kafka.topic_samples],
            "late_clicks": seen[s.kafka.topic_late],
        }
    )
    console.print(report.counts)
    return sim


def run_training_dag(s: Settings, config: DemoConfig, report: Report) -> None:
    import httpx

    from local_services import airflow as airflow_local

    _BACKGROUND["airflow"].result(config.stage_timeout_s)
    _BACKGROUND["serving"].result(config.stage_timeout_s)
    base = airflow_local.base_url(s)
    headers = {"Authorization": f"Bearer {airflow_local.api_token(s)}"}
    _step(f"triggering {TRAINING_DAG} through Airflow's REST API ({base}/api/v2)")
    with httpx.Client(base_url=f"{base}/api/v2", headers=headers, timeout=30.0) as api:
        deadline = time.monotonic() + config.stage_timeout_s
        while api.get(f"/dags/{TRAINING_DAG}").status_code != 200:  # the dag-processor parses it first
            if time.monotonic() > deadline:
                raise DemoError(f"Airflow never listed {TRAINING_DAG}")
            time.sleep(2.0)
        api.patch(f"/dags/{TRAINING_DAG}", json={"is_paused": False})
        response = api.post(
            f"/dags/{TRAINING_DAG}/dagRuns",
            json={"logical_date": None, "conf": {"epochs": config.epochs, "ranks": config.ranks, "min_new_samples": 1}},
        )
        if response.status_code >= 300:
            raise DemoError(f"trigger failed: {response.status_code} {response.text[:500]}")
        run_id = response.json()["dag_run_id"]
        started = time.monotonic()
        state = "queued"
        while state not in ("success", "failed"):
            if time.monotonic() > deadline:
                raise DemoError(f"DAG run {run_id} still {state} after {config.stage_timeout_s:.0f}s")
            time.sleep(3.0)
            state = api.get(f"/dags/{TRAINING_DAG}/dagRuns/{run_id}").json().get("state", "?")
        tasks = api.get(f"/dags/{TRAINING_DAG}/dagRuns/{run_id}/taskInstances").json().get("task_instances", [])
    report.dag = {
        "run_id": run_id,
        "state": state,
        "seconds": round(time.monotonic() - started, 1),
        "tasks": {t["task_id"]: t["state"] for t in tasks},
    }
    console.print(report.dag)
    if state != "success":
        raise DemoError(
            f"training DAG run {run_id} {state}: {report.dag['tasks']} (task logs under {s.local.run_dir}/airflow/logs)"
        )


def champion(s: Settings, report: Report) -> tuple[Any, str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=s.mlflow.tracking_uri)
    try:
        mv = client.get_model_version_by_alias(s.train.model_name, "champion")
    except Exception as exc:  # noqa: BLE001 (MlflowException: no alias)
        raise DemoError(f"no champion of {s.train.model_name} after the DAG run: {exc}") from exc
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


def _served_version(base: str) -> str | None:
    import httpx

    try:
        body = httpx.get(f"{base}/readyz", timeout=2.0).json()
    except (httpx.HTTPError, ValueError):
        return None
    return body.get("model_version")


def _wait_served(base: str, expected: str, timeout: float) -> float:
    started = time.perf_counter()
    while _served_version(base) != expected:
        if time.perf_counter() - started > timeout:
            raise DemoError(
                f"serving at {base} did not load {expected} within {timeout:.0f}s (serves {_served_version(base)})"
            )
        time.sleep(0.01)
    return time.perf_counter() - started


def query_serving(
    s: Settings, config: DemoConfig, sim: Any, version: str, report: Report, settled: bool = False
) -> None:
    """Latency and expected CTR of served top 10s; ``settled``: again after the freshness probes.

    Both are kept: they once differed (serving kept the initial rows of tables created after it
    started until the next push; fixed in serving.params), and the two figures show it stays fixed.
    """
    import httpx
    import numpy as np

    base = f"http://127.0.0.1:{s.serving.port}"
    expected = f"{s.serving.model_name}/{version}"
    _step(f"serving at {base}: waiting for {expected}, then {config.query_users} recommendation requests")
    _wait_served(base, expected, config.stage_timeout_s)
    world, n_items = sim.world, sim.config.items
    rng = np.random.default_rng(config.seed + 7)
    # users ask for recommendations as often as they visit: sample them by the simulator's activity
    users = rng.choice(
        sim.config.users, min(config.query_users, sim.config.users), replace=False, p=world.user_activity
    )
    from collections import Counter

    latencies, served, rand, best, wins, versions = [], [], [], [], 0, set()
    flags, reasons = Counter(degraded=0, cold_start=0), Counter()
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


# --------------------------------------------------------------------------- freshness probes


async def _probe_features_and_samples(s: Settings, probes: int, timeout: float) -> tuple[list[float], list[float]]:
    """Profile events until the online store shows them; impression+click pairs until their samples appear."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from core.kafka import end_offsets, start_producer
    from feature_repo.contract import Sample, sample_id
    from feature_repo.spec import encode_user
    from feature_repo.store import open_store, read_online

    store = await asyncio.to_thread(open_store, s.feast.data_dir, s.feast.online_store, s.feast_redis_url, False)
    producer = await start_producer(s.kafka.bootstrap)
    tag = uuid.uuid4().hex[:8]
    feature_times, sample_times = [], []
    try:
        for i in range(probes):
            user = f"demo-probe-{tag}-{i}"
            profile = {
                "schema_version": 1,
                "event_type": "user_profile",
                "event_id": f"{user}-profile",
                "timestamp": time.time(),
                "user_id": user,
                "gender": "F",
                "age": 20 + i % 50,
                "occupation": "writer",
                "zip_code": f"{10000 + i}",
            }
            expected = encode_user(user, profile).sparse
            sent = time.perf_counter()
            await producer.send_and_wait(s.kafka.topic_events, json.dumps(profile).encode(), key=user.encode())
            while True:
                got = (await asyncio.to_thread(read_online, store, "user", [user]))[user]
                if got is not None and got.sparse == expected:
                    feature_times.append(time.perf_counter() - sent)
                    break
                if time.perf_counter() - sent > timeout:
                    raise DemoError(f"profile of {user} never reached the online store within {timeout:.0f}s")
                await asyncio.sleep(0.01)

        ends = await end_offsets(s.kafka.bootstrap, s.kafka.topic_samples)
        consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(s.kafka.topic_samples, p) for p in ends]
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, ends[tp.partition])
            for i in range(probes):
                user, item, request = f"demo-probe-{tag}-{i}", f"demo-probe-item-{i}", f"demo-probe-{tag}-r{i}"
                wanted = sample_id(request, item)
                now = time.time()
                common = {
                    "schema_version": 1,
                    "timestamp": now,
                    "request_id": request,
                    "user_id": user,
                    "item_id": item,
                }
                impression = {**common, "event_type": "impression", "event_id": f"{request}-imp", "position": 0}
                click = {**common, "event_type": "click", "event_id": f"{request}-click"}
                await producer.send_and_wait(s.kafka.topic_events, json.dumps(impression).encode(), key=user.encode())
                sent = time.perf_counter()
                await producer.send_and_wait(s.kafka.topic_events, json.dumps(click).encode(), key=user.encode())
                found = False
                while not found:
                    batches = await consumer.getmany(timeout_ms=50)
                    for records in batches.values():
                        for record in records:
                            try:
                                if Sample.from_json(record.value).sample_id == wanted:
                                    found = True
                            except ValueError:
                                continue
                    if time.perf_counter() - sent > timeout:
                        raise DemoError(f"the sample of click {request} never appeared within {timeout:.0f}s")
                sample_times.append(time.perf_counter() - sent)
        finally:
            await consumer.stop()
    finally:
        await producer.stop()
    return feature_times, sample_times


def _probe_replicas(s: Settings, probes: int, timeout: float) -> tuple[list[float], dict[str, list[float]]]:
    import numpy as np

    from paramserver.redis_store import RedisStore
    from paramserver.rows import Rows, TableConfig

    source = RedisStore(s.ps.shards, [TableConfig(PROBE_TABLE, dim=4, capacity=1024)], namespace=s.ps.namespace)
    replicas = {
        spec: RedisStore(spec.split(","), [], namespace=s.ps.namespace, configure_servers=False)
        for spec in s.ps.replicas
    }
    if not replicas:
        raise DemoError("no inference replicas configured (RECSYS_PS_REPLICAS)")
    slowest, per_replica = [], {spec: [] for spec in replicas}
    try:
        for i in range(probes):
            ids = np.arange(i * 4, i * 4 + 4, dtype=np.int64)
            rows = Rows(ids, np.full((4, 4), float(i), dtype=np.float32), np.zeros((4, 1), dtype=np.float32))
            sent = time.perf_counter()
            version = source.push({PROBE_TABLE: rows})
            pending = set(replicas)
            while pending:
                for spec in list(pending):
                    if replicas[spec].version() >= version:
                        per_replica[spec].append(time.perf_counter() - sent)
                        pending.discard(spec)
                if time.perf_counter() - sent > timeout:
                    raise DemoError(f"replicas {sorted(pending)} never applied version {version}")
                time.sleep(0.002)
            slowest.append(time.perf_counter() - sent)
    finally:
        source.close()
        for store in replicas.values():
            store.close()
    return slowest, per_replica


def _probe_champion(s: Settings, client: Any, version: str, probes: int, timeout: float) -> list[float]:
    """Move the champion alias between the champion and a registry copy of it, until serving follows.

    The copy is a second registered version with the same artifacts (tag ``demo_probe_copy_of``), so
    every alias move is a real champion change for serving; the alias ends on the trained champion.
    """
    name = s.train.model_name
    mv = client.get_model_version(name, version)
    copy = client.create_model_version(
        name,
        mv.source,
        run_id=mv.run_id,
        tags={"demo_probe_copy_of": str(version), "role": "demo-probe"},
        description=f"demo freshness probe: a copy of version {version}",
    )
    base = f"http://127.0.0.1:{s.serving.port}"
    times = []
    try:
        for i in range(probes):
            target = str(copy.version) if i % 2 == 0 else str(version)
            client.set_registered_model_alias(name, "champion", target)
            sent = time.perf_counter()
            _wait_served(base, f"{s.serving.model_name}/{target}", timeout)
            times.append(time.perf_counter() - sent)
    finally:
        client.set_registered_model_alias(name, "champion", str(version))
    _wait_served(base, f"{s.serving.model_name}/{version}", timeout)
    return times


def measure_freshness(s: Settings, config: DemoConfig, client: Any, version: str, report: Report) -> None:
    timeout = 120.0
    _step(f"freshness: {config.probes} probes of each chain")
    features, samples = asyncio.run(_probe_features_and_samples(s, config.probes, timeout))
    report.freshness["event_to_feature_online"] = quantiles(features)
    report.freshness["click_to_sample"] = quantiles(samples)
    slowest, per_replica = _probe_replicas(s, config.probes, timeout)
    report.freshness["push_to_replica_applied"] = {
        **quantiles(slowest),
        "per_replica": {spec: quantiles(v) for spec, v in per_replica.items()},
    }
    report.freshness["champion_to_serving_reload"] = {
        **quantiles(_probe_champion(s, client, version, config.probes, timeout)),
        "how": f"alias moved in the registry; serving polls it every {s.serving.reload_poll_s:g}s",
    }
    for key, label in CHAINS.items():
        f = report.freshness[key]
        console.print(f"{label}: median {f['median_s'] * 1000:.0f} ms, p99 {f['p99_s'] * 1000:.0f} ms (n={f['n']})")


# --------------------------------------------------------------------------- report


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"


def write_report(report: Report, out_dir: Path) -> Path:
    """report.json, report.md and the plots (loss.png, auc.png, freshness.png) under ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    plots = []
    history = report.model.get("loss_history") or []
    if history:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([h[0] for h in history], [h[1] for h in history], lw=1)
        ax.set(
            xlabel="step",
            ylabel="training loss (log loss)",
            title=f"{report.model.get('name')} v{report.model.get('champion_version')}",
        )
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=110)
        plt.close(fig)
        plots.append(("Training loss", "loss.png"))
    aucs = {
        "oracle (true probabilities)": report.model.get("oracle_auc"),
        "model (eval set)": report.model.get("eval_auc"),
        "random": 0.5,
    }
    aucs = {k: v for k, v in aucs.items() if v is not None}
    fig, ax = plt.subplots(figsize=(6, 3.0))
    colors = {"oracle (true probabilities)": "#4c72b0", "model (eval set)": "#dd8452", "random": "#999999"}
    ax.barh(list(aucs), list(aucs.values()), color=[colors[k] for k in aucs])
    for y, v in enumerate(aucs.values()):
        ax.text(v, y, f" {v:.3f}", va="center")
    ax.set(xlim=(0.4, 1.0), xlabel="AUC", title="AUC: oracle vs model vs random")
    fig.tight_layout()
    fig.savefig(out_dir / "auc.png", dpi=110)
    plt.close(fig)
    plots.append(("AUC", "auc.png"))
    chains = [k for k in CHAINS if report.freshness.get(k, {}).get("n")]
    if chains:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ys = range(len(chains))
        med = [report.freshness[k]["median_s"] for k in chains]
        p99 = [report.freshness[k]["p99_s"] for k in chains]
        ax.barh([y + 0.2 for y in ys], med, height=0.4, label="median")
        ax.barh([y - 0.2 for y in ys], p99, height=0.4, label="p99")
        ax.set_yticks(list(ys), [CHAINS[k] for k in chains])
        ax.set(xscale="log", xlabel="seconds (log scale)", title="Freshness")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "freshness.png", dpi=110)
        plt.close(fig)
        plots.append(("Freshness", "freshness.png"))

    c, m, sv = report.counts, report.model, report.serving
    ctr = sv.get("expected_ctr_top10", {})
    lines = [
        f"# recsys demo report ({report.started})",
        "",
        "## Services",
        "",
        *[f"- {k.replace('_', ' ')}: {v}" for k, v in report.urls.items()],
        "",
        "## Counts",
        "",
        "| stage | count |",
        "|---|---|",
        f"| events published (simulator) | {c.get('events_published')} |",
        f"| events in (events topic) | {c.get('events_in')} |",
        f"| malformed injected | {c.get('bad_injected')} |",
        f"| dead-lettered | {c.get('deadlettered')} |",
        f"| impressions / clicks | {c.get('impressions')} / {c.get('clicks')} |",
        f"| samples (impression ⋈ click) | {c.get('samples')} |",
        f"| late clicks | {c.get('late_clicks')} |",
        "",
        "## Training (through Airflow)",
        "",
        f"DAG run `{report.dag.get('run_id')}`: **{report.dag.get('state')}** in {report.dag.get('seconds')} s; "
        f"tasks: {', '.join(f'{k}={v}' for k, v in report.dag.get('tasks', {}).items())}.",
        "",
        f"Champion `{m.get('name')}` v{m.get('champion_version')} (gate: {m.get('gate')}, parameter version "
        f"{m.get('ps_version')}), trained on {m.get('train_samples')} samples, evaluated on {m.get('eval_samples')}.",
        "",
        "| AUC | value |",
        "|---|---|",
        f"| oracle (true click probabilities, all impressions) | {m.get('oracle_auc', float('nan')):.4f} |",
        f"| model (evaluation set, newest share of the window) | {m.get('eval_auc') or float('nan'):.4f} |",
        "",
        "## Serving",
        "",
        f"{sv.get('requests')} requests to `{sv.get('url')}/v1/recommend` (all items as candidates, k=10): "
        f"latency median {_fmt_s(sv.get('latency', {}).get('median_s'))}, p99 "
        f"{_fmt_s(sv.get('latency', {}).get('p99_s'))}.",
        "",
        "Expected CTR of the top 10 for the queried users (simulator's true probabilities): "
        f"served {ctr.get('served', float('nan')):.4f}, random {ctr.get('random', float('nan')):.4f}, "
        f"oracle {ctr.get('oracle', float('nan')):.4f}; served beats random for "
        f"{sv.get('served_beats_random_share', 0):.0%} of users (measured right after the champion was served).",
        "",
        *(
            [
                f"Again after the freshness probes (~1 min later): served "
                f"{sv['settled']['expected_ctr_top10']['served']:.4f}, random "
                f"{sv['settled']['expected_ctr_top10']['random']:.4f}; served beats random for "
                f"{sv['settled']['served_beats_random_share']:.0%} of users; latency median "
                f"{_fmt_s(sv['settled']['latency']['median_s'])}, p99 {_fmt_s(sv['settled']['latency']['p99_s'])}.",
                "",
            ]
            if "settled" in sv
            else []
        ),
        "## Freshness",
        "",
        "| chain | n | median | p99 |",
        "|---|---|---|---|",
        *[
            f"| {label} | {report.freshness.get(k, {}).get('n', 0)} | {_fmt_s(report.freshness.get(k, {}).get('median_s'))}"
            f" | {_fmt_s(report.freshness.get(k, {}).get('p99_s'))} |"
            for k, label in CHAINS.items()
        ],
        "",
        "## Stage times",
        "",
        *[f"- {k}: {v:.1f} s" for k, v in report.stage_seconds.items()],
        "",
        *[f"## {title}\n\n![{title}]({path})\n" for title, path in plots],
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------- the loop


def stop_everything(s: Settings) -> None:
    from local_services import airflow as airflow_local
    from local_services import services

    airflow_local.down(s)
    entries = services.status(s.local.run_dir)
    order = ["serving", "stream-worker", "ps-replicator", "mlflow", "ps-", "redis", "kafka"]

    def rank(name: str) -> int:
        return next((i for i, prefix in enumerate(order) if name.startswith(prefix)), len(order))

    for entry in sorted(entries, key=lambda e: rank(e.name)):
        services.stop(s.local.run_dir, entry.name)


def run_demo(config: DemoConfig) -> tuple[Report, Path]:
    """The whole loop; returns the report and the path of report.md."""
    run_dir = Path(os.environ.get("RECSYS_RUN_DIR", str(PROJECT_ROOT / ".run"))).resolve()
    os.environ.update(demo_overrides(os.environ, run_dir, config.mlflow_port if config.mlflow_server else None))
    s = Settings()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = config.report_dir or PROJECT_ROOT / "reports" / f"demo-{stamp}"
    report = Report(
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
    )
    stages: list[tuple[str, Callable[[], Any]]] = []
    state: dict[str, Any] = {}
    stages = [
        ("services", lambda: start_services(s, config, report)),
        ("simulate_and_stream", lambda: state.update(sim=simulate_and_stream(s, config, report))),
        ("training_dag", lambda: run_training_dag(s, config, report)),
        ("champion", lambda: state.update(champ=champion(s, report))),
        ("serving", lambda: query_serving(s, config, state["sim"], state["champ"][1], report)),
        ("freshness", lambda: measure_freshness(s, config, *state["champ"], report)),
        ("serving_settled", lambda: query_serving(s, config, state["sim"], state["champ"][1], report, True)),
    ]
    try:
        for name, stage in stages:
            started = time.monotonic()
            try:
                stage()
            finally:
                report.stage_seconds[name] = round(time.monotonic() - started, 1)
    finally:
        path = write_report(report, out_dir)
        if config.stop:
            _step("stopping every service (--stop)")
            stop_everything(s)
    return report, path


app = typer.Typer(invoke_without_command=True)


@app.callback()
def demo(
    users: Annotated[int, typer.Option(min=10, help="simulated users")] = 500,
    items: Annotated[int, typer.Option(min=10, max=1000, help="simulated items (all are ranked per query)")] = 300,
    requests: Annotated[
        int, typer.Option(min=50, help="simulated recommendation requests (10 impressions each)")
    ] = 4000,
    seed: Annotated[int, typer.Option(help="simulator seed")] = 1,
    bad_fraction: Annotated[float, typer.Option(min=0.0, max=0.5, help="share of malformed records")] = 0.01,
    rate: Annotated[
        float, typer.Option(min=0.0, help="publish at most this many records/s (0: as fast as possible)")
    ] = 0.0,
    epochs: Annotated[int, typer.Option(min=1, max=100, help="training epochs (DAG run parameter)")] = 4,
    ranks: Annotated[int, typer.Option(min=1, max=8, help="torchrun ranks (DAG run parameter)")] = 1,
    probes: Annotated[int, typer.Option(min=1, max=1000, help="freshness probes per chain")] = 20,
    query_users: Annotated[int, typer.Option(min=1, help="users queried against serving")] = 100,
    mlflow_server: Annotated[bool, typer.Option(help="run `mlflow server` (else a SQLite tracking URI)")] = True,
    mlflow_port: Annotated[int, typer.Option(min=1, max=65535, help="port of the MLflow server")] = 5000,
    stop: Annotated[bool, typer.Option("--stop/--keep", help="stop every service at the end")] = False,
    stage_timeout_s: Annotated[float, typer.Option(min=10, help="longest wait of one stage")] = 600.0,
    report_dir: Annotated[Path | None, typer.Option(help="where the report goes (default reports/demo-<time>)")] = None,
) -> None:
    """Run the whole loop on local services, measure it and write a Markdown + PNG report."""
    if users < 10 or items < 10:
        raise typer.BadParameter("users and items must be at least 10")
    config = DemoConfig(
        users=users,
        items=items,
        requests=requests,
        seed=seed,
        bad_fraction=bad_fraction,
        rate=rate,
        epochs=epochs,
        ranks=ranks,
        probes=probes,
        query_users=query_users,
        mlflow_server=mlflow_server,
        mlflow_port=mlflow_port,
        stop=stop,
        stage_timeout_s=stage_timeout_s,
        report_dir=report_dir,
    )
    try:
        report, path = run_demo(config)
    except Exception as exc:  # noqa: BLE001 (DemoError, ServiceError, AirflowError, Kafka: a message, not a trace)
        console.print(f"[red]demo failed:[/red] {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    out = Console()
    out.print(f"\nreport: {path}")
    for name, url in report.urls.items():
        out.print(f"{name.replace('_', ' ')}: {url}")
    if stop:
        out.print("services stopped (--stop)")
    else:
        out.print(
            "services keep running: `uv run recsys services status`; stop them with `uv run recsys services down`"
        )
