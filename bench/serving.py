"""Serving benchmark: latency and throughput of /v1/recommend (100 candidates) vs a trivial endpoint.

    uv run python -m bench serving [--rate 200] [--seconds 10] [--repeats 3] [--candidates 100]

Everything is real and on loopback: Redis as the inference parameter replica, Feast with a
Redis online store, Kafka for impressions, an MLflow registry (SQLite) whose ``champion`` is
a DLRM dense part (training.model, random weights: the same compute as a trained one), and
the server started as ``recsys serve`` in its own process. The load generator is another
process: a small asyncio HTTP/1.1 client on keep-alive connections, open loop (requests are
sent on a fixed schedule; latency counts from the scheduled send time, so a slow server
cannot hide queueing). Baseline: ``GET /v1/ping`` of the same server under the same load,
i.e. the framework's own overhead. Then a closed loop (16 requests in flight) measures the
throughput of each endpoint.

``--with-stack`` measures the same figures with the rest of the demo stack running beside the
server, as the demo runs it: a training copy on Redis replicated by ``paramserver.cli replicate``
into two inference replicas (serving reads the nearest), the Faust stream worker consuming the
impressions serving logs (features pushed to Feast, samples to Kafka), and an ``mlflow server``
as the registry. Compare it with a run without the flag on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._serving_load import cpu_seconds, get, post, profile_top, run_load, start_profile

USERS, ITEMS, DIM = 1000, 2000, 16
MODEL_NAME = "bench-serving-dlrm"


# --------------------------------------------------------------------------- the stack under test


def _seed(run_dir: Path, ps_url: str, feast_url: str, tracking_uri: str) -> int:
    """Features, parameter rows (into ``ps_url``) and the champion; returns the rows' parameter version."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    from core.settings import ParamServerSettings
    from feature_repo.spec import SPEC, encode_item, encode_user, item_id_key, user_id_key
    from feature_repo.store import open_store as open_feast
    from feature_repo.store import push_online, rows_frame
    from paramserver import Rows, TableConfig, open_store
    from traffic.simulator import SimConfig, World
    from training.model import DenseArch, ModelConfig, save_dense

    world = World(SimConfig(users=USERS, items=ITEMS))
    now = time.time()
    feast = open_feast(run_dir / "feast", "redis", feast_url, apply=True)
    push_online(
        feast,
        "user",
        rows_frame(
            "user",
            [encode_user(u, world.user_profile(i, "e", now)) for i, u in enumerate(world.user_ids)],
            [now] * USERS,
        ),
    )
    push_online(
        feast,
        "item",
        rows_frame(
            "item",
            [encode_item(it, world.item_profile(j, "e", now)) for j, it in enumerate(world.item_ids)],
            [now] * ITEMS,
        ),
    )
    rng = np.random.default_rng(0)
    tables = [TableConfig(name, DIM, init_std=0.05) for name in SPEC.sparse_names]
    store = open_store("redis", tables, ParamServerSettings(), shards=[ps_url])
    users = np.array([user_id_key(u) for u in world.user_ids], np.int64)
    items = np.array([item_id_key(i) for i in world.item_ids], np.int64)
    store.push(
        {
            "user_id": Rows(
                users, rng.normal(0, 0.1, (USERS, DIM)).astype(np.float32), np.zeros((USERS, 1), np.float32)
            ),
            "item_id": Rows(
                items, rng.normal(0, 0.1, (ITEMS, DIM)).astype(np.float32), np.zeros((ITEMS, 1), np.float32)
            ),
        }
    )
    version = store.version()
    store.close()
    torch.manual_seed(0)
    config = ModelConfig.from_spec(SPEC, DIM, (32, DIM), (64, 32))
    path = save_dense(run_dir / "dense" / "dense.pt", config, DenseArch(config).state_dict())
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("bench-serving")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(path), "dense")
    client = MlflowClient(tracking_uri=tracking_uri)
    client.create_registered_model(MODEL_NAME)
    mv = client.create_model_version(MODEL_NAME, source=f"runs:/{run.info.run_id}/dense", run_id=run.info.run_id)
    client.set_registered_model_alias(MODEL_NAME, "champion", mv.version)
    return version


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float = 900.0) -> dict:
    # generous: under load each worker's imports (torch, Feast, MLflow) took over 3 minutes here
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            if r.status_code == 200 and r.json()["scorer"] == "dlrm":
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


# --------------------------------------------------------------------------- the ranking alone, in process


def _ranking_in_process(env: dict[str, str], bodies: list[dict], calls: int) -> list[str]:
    """CPU per ``Ranker.recommend`` call and per stage, in this process, with serving's own wiring (real Redis and
    Feast, the champion from the registry): no HTTP, no thread pool, no other request. Scored with the numpy forward
    and, as the baseline in the same run, with the torch forward of the same weights."""
    from serving.metrics import Metrics
    from serving.ranker import Ranker
    from serving.wiring import build_components

    os.environ.update(env)  # serving reads its settings from RECSYS_* as `recsys serve` does
    from core.settings import Settings

    settings = Settings()
    metrics = Metrics()
    comps = build_components(settings, metrics)
    comps.model.reload()
    scorer: Any = comps.model.current  # a DLRMScorer: its numpy_arch is swapped below
    if scorer is None or comps.rows is None:
        raise RuntimeError("no champion or no parameter reader in process")
    ranker = Ranker(comps.model, comps.rows, comps.features, None, metrics, 100, settings.serving.explore_share)
    lines = []
    for body in bodies:  # warm: every row and item of the run cached, as in the server after warm-up
        ranker.recommend(body["user_id"], body["k"], body["candidate_item_ids"])
    numpy_arch = getattr(scorer, "numpy_arch", None)
    for label, arch in (("numpy forward", numpy_arch), ("torch forward (baseline)", None)):
        scorer.numpy_arch = arch
        before = {stage: _stage_cpu(metrics, stage) for stage in ("features", "rows", "score")}
        started = time.thread_time()
        for i in range(calls):
            body = bodies[i % len(bodies)]
            ranker.recommend(body["user_id"], body["k"], body["candidate_item_ids"])
        per_call = 1000.0 * (time.thread_time() - started) / calls
        stages = ", ".join(
            f"{stage} {1000.0 * (_stage_cpu(metrics, stage) - before[stage]) / calls:.3f}" for stage in before
        )
        lines.append(f"  ranking in process, {label}: {per_call:.3f} ms CPU per recommend ({stages} ms)")
    scorer.numpy_arch = numpy_arch
    if comps.rows is not None:
        comps.rows.close()
    return lines


def _stage_cpu(metrics, stage: str) -> float:
    """Seconds of CPU stage ``stage`` observed so far (the sum of its histogram)."""
    from prometheus_client import generate_latest

    prefix = f'recsys_serving_stage_seconds_sum{{clock="cpu",stage="{stage}"}} '
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


# --------------------------------------------------------------------------- the rest of the demo stack


STREAM_APP_ID = "bench-serving-stream"
STACK = "WITH the demo stack (2 replicas + replicators, stream worker, MLflow server)"


def _replicas_at(replicas: list[str], version: int, timeout: float = 300.0) -> None:
    """Wait until every inference replica holds parameter ``version`` (the replicators copied the seed)."""
    from core.settings import ParamServerSettings
    from paramserver import open_reader

    deadline = time.time() + timeout
    for url in replicas:
        reader = open_reader(ParamServerSettings(), [url])
        try:
            while (held := _version_or_none(reader)) is None or held < version:
                if time.time() > deadline:
                    raise RuntimeError(f"replica {url} did not reach parameter version {version} (holds {held})")
                time.sleep(0.5)
        finally:
            reader.close()


def _version_or_none(reader) -> int | None:
    from paramserver import ParamServerError

    try:
        return int(reader.version())
    except (ParamServerError, OSError):
        return None


def _start_stack_processes(run_dir: Path, env: dict[str, str], replicas: int, started: list[str]) -> None:
    """The replicators (training copy -> each replica) and the stream worker, as the demo starts them."""
    from local_services import services

    root = Path(__file__).resolve().parent.parent
    for i in range(replicas):
        name = f"bench-ps-replicator-{i}"
        cmd = [sys.executable, "-m", "paramserver.cli", "replicate", "--replica-index", str(i)]
        services.spawn(run_dir, name, cmd, 0, f"replicate --replica-index {i}", cwd=root, env=env)
        started.append(name)
    # Faust retitles its process: the data dir is the marker that survives (as in the demo)
    cmd = [sys.executable, "-m", "recsys.cli", "stream", "worker"]
    services.spawn(run_dir, "bench-stream-worker", cmd, 0, env["RECSYS_STREAM_DATA_DIR"], cwd=root, env=env)
    started.append("bench-stream-worker")


def _stream_consumed(bootstrap: str, topic: str) -> int | None:
    """Records of ``topic`` the stream worker's group committed (None: it has not committed yet)."""
    from core.consumer_lag import group_lag

    try:
        lags = asyncio.run(group_lag(bootstrap, STREAM_APP_ID, topic))
    except Exception:  # noqa: BLE001 - the group does not exist yet
        return None
    committed = [p.committed for p in lags if p.committed is not None]
    return sum(committed) if committed else None


def _wait_stream_worker(port: int, payloads: list[bytes], bootstrap: str, topic: str, timeout: float = 600.0) -> None:
    """Serve light traffic until the stream worker commits impressions (its start-up imports take minutes here)."""
    deadline = time.time() + timeout
    while _stream_consumed(bootstrap, topic) is None:
        if time.time() > deadline:
            raise RuntimeError(f"the stream worker did not consume {topic} within {timeout:.0f}s")
        run_load(port, payloads, 20.0, 2.0)
    print(f"stream worker consuming: {_stream_consumed(bootstrap, topic)} records committed", flush=True)


def _mean_ms(metrics: str, name: str, **labels: str) -> float:
    """Mean of a Prometheus histogram (summed over the series matching ``labels``), in ms."""
    total = count = 0.0
    for line in metrics.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(name + suffix + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                value = float(line.rsplit(" ", 1)[1])
                if suffix == "_sum":
                    total += value
                else:
                    count += value
    return 1000.0 * total / count if count else float("nan")


def _start_server(env: dict[str, str], port: int, workers: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys.cli", "serve", "--port", str(port), "--workers", str(workers)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),
    )
    ready = _wait_ready(port, proc)
    print(
        f"server ready ({workers} worker(s)): model {ready['model_version']}, "
        f"parameter version {ready['parameter_version']}",
        flush=True,
    )
    return proc


def _stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _line(label: str, res: dict) -> str:
    cpu = f", server CPU {res['cpu_ms']:.2f} ms/request" if "cpu_ms" in res else ""
    return (
        f"  {label}: p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, {res['throughput']:.0f} req/s, "
        f"{res['requests']} ok, {res['shed_503']} shed (503), {res['deadline_504']} past deadline (504), "
        f"{res['errors']} errors{cpu}"
    )


def _measure(
    port: int, proc: subprocess.Popen, workers: int, payloads: dict[str, list[bytes]], args, out: Path
) -> dict:
    """Every figure of one server: open loop at the rate, the rate ladder, closed loop; its /metrics."""
    import httpx

    run_load(port, payloads["recommend"], args.rate, 3.0)  # warm-up: caches, connections, lazy imports
    open_loop: dict[str, list[dict]] = {"recommend": [], "ping": []}
    closed: dict[str, list[dict]] = {"recommend": [], "ping": []}
    for r in range(args.repeats):
        for name in ("recommend", "ping"):
            res = run_load(port, payloads[name], args.rate, args.seconds)
            open_loop[name].append(res)
            print(_line(f"{workers}w open loop {args.rate:.0f}/s {name:9s} run {r + 1}", res), flush=True)
        for name in ("recommend", "ping"):
            cpu = cpu_seconds(proc.pid)
            res = run_load(port, payloads[name], None, min(args.seconds, 5.0), connections=16)
            # the server's CPU (all its threads and workers) per answered request: what bounds throughput on
            # a machine whose cores are shared, unlike latency, which the other processes' load inflates
            res["cpu_ms"] = 1000.0 * (cpu_seconds(proc.pid) - cpu) / max(res["requests"], 1)
            closed[name].append(res)
            print(_line(f"{workers}w closed loop (16 in flight) {name:9s} run {r + 1}", res), flush=True)
    held = None
    for rate in args.ladder:
        res = run_load(port, payloads["recommend"], rate, args.seconds)
        ok = res["p99_ms"] <= args.hold_p99_ms and not (res["errors"] or res["shed_503"] or res["deadline_504"])
        print(_line(f"{workers}w ladder {rate:.0f}/s recommend {'holds' if ok else 'does not hold'}", res), flush=True)
        if not ok:
            break
        held = (rate, res)
    profile = None
    if args.profile:
        collapsed = out / f"py-spy-{workers}w.txt"
        spy = start_profile(proc.pid, args.seconds, collapsed)
        time.sleep(1.0)  # py-spy attaches
        run_load(port, payloads["recommend"], args.rate, args.seconds)
        _, err = spy.communicate(timeout=args.seconds + 60)
        if collapsed.exists():
            profile = profile_top(collapsed)
        else:
            print(f"  py-spy failed: {err.decode(errors='replace')[-500:]}", flush=True)
    return {
        "open": open_loop,
        "closed": closed,
        "held": held,
        "profile": profile,
        "metrics": httpx.get(f"http://127.0.0.1:{port}/metrics").text,
    }


def _report(workers: int, res: dict, args) -> list[str]:
    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    rec_p50, rec_p99 = med(res["open"]["recommend"], "p50_ms"), med(res["open"]["recommend"], "p99_ms")
    ping_p50, ping_p99 = med(res["open"]["ping"], "p50_ms"), med(res["open"]["ping"], "p99_ms")
    rec_tp, ping_tp = med(res["closed"]["recommend"], "throughput"), med(res["closed"]["ping"], "throughput")
    rec_cpu, ping_cpu = med(res["closed"]["recommend"], "cpu_ms"), med(res["closed"]["ping"], "cpu_ms")
    metrics = res["metrics"]
    lines = [
        f" {workers} worker(s):",
        f"  /v1/recommend at {args.rate:.0f} req/s: p50 {rec_p50:.2f} ms, p99 {rec_p99:.2f} ms "
        f"(baseline /v1/ping: p50 {ping_p50:.2f} ms, p99 {ping_p99:.2f} ms)",
        f"  closed loop (16 in flight): /v1/recommend {rec_tp:.0f} req/s, /v1/ping {ping_tp:.0f} req/s; "
        f"server CPU per request: recommend {rec_cpu:.2f} ms, ping {ping_cpu:.2f} ms",
    ]
    if res["held"] is None:
        lines.append(
            f"  highest rate held (p99 <= {args.hold_p99_ms:g} ms, nothing shed or failed): none of {args.ladder}"
        )
    else:
        rate, run = res["held"]
        lines.append(
            f"  highest rate held (p99 <= {args.hold_p99_ms:g} ms, nothing shed or failed) of {args.ladder}: "
            f"{rate:.0f} req/s (p50 {run['p50_ms']:.2f} ms, p99 {run['p99_ms']:.2f} ms)"
        )
    stages = ("features", "rows", "score", "thread_wait", "event_loop_lag")
    lines.append(
        "  server-side mean per request, wall / cpu ms (one worker's /metrics): "
        + ", ".join(
            f"{stage} {_mean_ms(metrics, 'recsys_serving_stage_seconds', stage=stage, clock='wall'):.2f}"
            + (
                f" / {_mean_ms(metrics, 'recsys_serving_stage_seconds', stage=stage, clock='cpu'):.2f}"
                if stage not in ("thread_wait", "event_loop_lag")
                else ""
            )
            for stage in stages
        )
        + f"; whole handler {_mean_ms(metrics, 'recsys_serving_request_seconds', endpoint='recommend'):.2f}"
    )
    if res["profile"]:
        for kind in ("self", "inclusive"):
            lines.append(f"  py-spy, samples holding the GIL during an open-loop run, top by {kind} share:")
            lines += [f"    {share:6.1%}  {frame}" for frame, share in res["profile"][kind]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench serving", description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests per second")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each measured run")
    parser.add_argument("--workers", default="1,2", help="uvicorn worker counts to measure, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--ladder", default="300,400,600,800", help="open-loop rates tried for the highest one held")
    parser.add_argument("--hold-p99-ms", type=float, default=20.0, help="p99 a rate must keep to count as held")
    parser.add_argument("--profile", action="store_true", help="profile the server with py-spy during one run")
    parser.add_argument(
        "--in-process",
        type=int,
        default=2000,
        metavar="CALLS",
        help="also time CALLS rankings in this process (numpy vs torch forward); 0: skip",
    )
    parser.add_argument(
        "--with-stack",
        action="store_true",
        help="with the rest of the demo stack running: two replicas fed by replicators, the stream worker, "
        "an MLflow server",
    )
    args = parser.parse_args(argv)
    try:
        worker_counts = [int(w) for w in args.workers.split(",")]
        args.ladder = [float(r) for r in args.ladder.split(",") if r.strip()]
    except ValueError:
        parser.error("--workers and --ladder are comma-separated numbers")
    if not (
        0 < args.rate <= 5000
        and 1 <= args.seconds <= 60
        and 1 <= args.repeats <= 10
        and 1 <= args.candidates <= 1000
        and worker_counts
        and all(1 <= w <= 8 for w in worker_counts)
        and all(0 < r <= 5000 for r in args.ladder)
    ):
        parser.error(
            "rate in (0, 5000], seconds in [1, 60], repeats in [1, 10], candidates in [1, 1000], "
            "workers in [1, 8], ladder rates in (0, 5000]"
        )

    from core.kafka import ensure_topics
    from core.settings import Settings
    from local_services import kafka as local_kafka
    from local_services import services

    defaults = Settings()
    results: dict[int, dict] = {}
    in_process: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        run_dir = Path(tmp)
        started: list[str] = []
        proc = None
        try:
            ps_port, feast_port = services.free_port(), services.free_port()
            # quiet: serving reads the one Redis the rows were pushed to; with the stack: the training copy
            # is replicated into two inference replicas and serving reads the nearest
            services.start_redis(run_dir, ps_port, name="bench-ps-shard")
            started.append("bench-ps-shard")
            replica_ports = [services.free_port() for _ in range(2)] if args.with_stack else []
            for i, port in enumerate(replica_ports):
                services.start_redis(run_dir, port, name=f"bench-ps-replica-{i}")
                started.append(f"bench-ps-replica-{i}")
            services.start_redis(run_dir, feast_port, name="bench-feast")
            started.append("bench-feast")
            kafka_port, controller = services.free_port(), services.free_port()
            print("starting Kafka, Redis (parameter service, Feast online store) on loopback ...", flush=True)
            local_kafka.start_kafka(
                run_dir,
                defaults.local.cache_dir,
                defaults.local.kafka_version,
                kafka_port,
                controller,
                name="bench-kafka",
                timeout=120,
            )
            started.append("bench-kafka")
            bootstrap = f"127.0.0.1:{kafka_port}"
            asyncio.run(ensure_topics(bootstrap, {"bench.events": 1}))
            ps_url, feast_url = f"redis://127.0.0.1:{ps_port}/0", f"redis://127.0.0.1:{feast_port}/0"
            replicas = [f"redis://127.0.0.1:{port}/0" for port in replica_ports] or [ps_url]
            tracking = f"sqlite:///{run_dir / 'mlflow.db'}"
            if args.with_stack:
                mlflow_port = services.free_port()
                print("starting an MLflow server ...", flush=True)
                services.start_mlflow(run_dir, mlflow_port, name="bench-mlflow", timeout=600)
                started.append("bench-mlflow")
                tracking = f"http://127.0.0.1:{mlflow_port}"
            print("seeding parameters, features and the champion model ...", flush=True)
            version = _seed(run_dir, ps_url, feast_url, tracking)
            env = {
                **os.environ,
                "RECSYS_PS_REPLICAS": json.dumps(replicas),
                "RECSYS_PS_SHARDS": json.dumps([ps_url]),
                "RECSYS_FEAST_DATA_DIR": str(run_dir / "feast"),
                "RECSYS_FEAST_ONLINE_STORE": "redis",
                "RECSYS_FEAST_REDIS_URL": feast_url,
                "RECSYS_MLFLOW_TRACKING_URI": tracking,
                "RECSYS_KAFKA_BOOTSTRAP": bootstrap,
                "RECSYS_TOPIC_EVENTS": "bench.events",
                "RECSYS_TOPIC_PARTITIONS": "1",
                "RECSYS_SERVING_MODEL_NAME": MODEL_NAME,
                "RECSYS_RUN_DIR": str(run_dir),
                "RECSYS_STREAM_APP_ID": STREAM_APP_ID,
                "RECSYS_STREAM_DATA_DIR": str(run_dir / "stream"),
            }
            if args.with_stack:
                print("starting the replicators and the stream worker ...", flush=True)
                _start_stack_processes(run_dir, env, len(replica_ports), started)
                _replicas_at(replicas, version)
            rng = np.random.default_rng(1)
            bodies = [
                {
                    "user_id": f"u{int(rng.integers(USERS))}",
                    "k": 10,
                    "candidate_item_ids": [f"i{j}" for j in rng.choice(ITEMS, args.candidates, replace=False)],
                }
                for _ in range(2000)
            ]
            payloads = {"recommend": [post("/v1/recommend", body) for body in bodies], "ping": [get("/v1/ping")]}
            in_process = _ranking_in_process(env, bodies, args.in_process) if args.in_process else []
            print("\n".join(in_process), flush=True)
            for workers in worker_counts:
                port = services.free_port()
                proc = _start_server(env, port, workers, run_dir / "server.log")
                if args.with_stack:
                    _wait_stream_worker(port, payloads["recommend"], bootstrap, "bench.events")
                results[workers] = _measure(port, proc, workers, payloads, args, Path(tempfile.gettempdir()))
                _stop_server(proc)
                proc = None
                print("\n".join(_report(workers, results[workers], args)), flush=True)  # kept if a later one fails
            if args.with_stack:
                consumed = _stream_consumed(bootstrap, "bench.events")
                print(f"stream worker: {consumed} impressions consumed and committed during the run", flush=True)
        finally:
            if proc is not None:
                _stop_server(proc)
            for name in reversed(started):
                services.stop(run_dir, name)

    every_run = [
        run
        for res in results.values()
        for group in (res["open"], res["closed"])
        for runs in group.values()
        for run in runs
    ]
    errors = sum(r["errors"] for r in every_run)
    shed, expired = sum(r["shed_503"] for r in every_run), sum(r["deadline_504"] for r in every_run)
    print()
    print(
        f"serving benchmark (medians of {args.repeats} runs of {args.seconds:g} s; {args.candidates} candidates, k=10, "
        f"DLRM champion, Feast + parameter replica on Redis, impressions to Kafka, "
        f"{STACK if args.with_stack else 'nothing else running (no stream worker)'}; "
        f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
    for line in in_process:
        print(line)
    for workers, res in results.items():
        for line in _report(workers, res, args):
            print(line)
    best = max(statistics.median(r["throughput"] for r in res["closed"]["recommend"]) for res in results.values())
    first = results[worker_counts[0]]
    p99 = statistics.median(r["p99_ms"] for r in first["open"]["recommend"])
    target_p99 = 20.0 if args.with_stack else 10.0  # issue #17's targets
    print(
        f" targets: p99 <= {target_p99:g} ms at 200 req/s {'with the stack' if args.with_stack else 'quiet'}: "
        f"{'met' if p99 <= target_p99 and args.rate >= 200 else 'NOT met'} "
        f"({p99:.2f} ms, {worker_counts[0]} worker(s)); >= 600 req/s closed loop: "
        f"{'met' if best >= 600 else 'NOT met'} ({best:.0f} req/s)"
    )
    print(f" failed requests: {errors}; shed (503, not in the quantiles): {shed}; past deadline (504): {expired}")
    return 0 if errors == 0 else 1
