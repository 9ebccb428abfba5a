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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

USERS, ITEMS, DIM = 1000, 2000, 16
MODEL_NAME = "bench-serving-dlrm"


# --------------------------------------------------------------------------- load generator (own process)


async def _request(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], payload: bytes) -> int:
    reader, writer = conn
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def _load(port: int, payloads: list[bytes], rate: float | None, seconds: float, connections: int) -> dict:
    conns: asyncio.Queue = asyncio.Queue()
    for _ in range(connections):
        conns.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    latencies: list[float] = []  # of answered (200) requests only: a fast 503 must not improve the quantiles
    errors = shed = expired = 0
    loop = asyncio.get_running_loop()

    async def one(payload: bytes, scheduled: float) -> None:
        nonlocal errors, shed, expired
        conn = await conns.get()
        try:
            status = await _request(conn, payload)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            conn = await asyncio.open_connection("127.0.0.1", port)
        else:
            if status == 200:
                latencies.append(loop.time() - scheduled)
            elif status == 503:  # load shedding: the server said "retry later", by design
                shed += 1
            elif status == 504:  # the request's deadline passed
                expired += 1
            else:
                errors += 1
        conns.put_nowait(conn)

    start = loop.time()
    tasks = []
    if rate:  # open loop: fixed schedule
        n = int(rate * seconds)
        for i in range(n):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(payloads[i % len(payloads)], due)))
        await asyncio.gather(*tasks)
    else:  # closed loop: keep ``connections`` requests in flight
        count = 0

        async def worker() -> None:
            nonlocal count
            while loop.time() - start < seconds:
                count += 1
                await one(payloads[count % len(payloads)], loop.time())

        await asyncio.gather(*[worker() for _ in range(connections)])
    elapsed = loop.time() - start
    while not conns.empty():
        conns.get_nowait()[1].close()
    lat = np.array(latencies) * 1000.0
    return {
        "requests": len(latencies),
        "errors": errors,
        "shed_503": shed,
        "deadline_504": expired,
        "seconds": elapsed,
        "throughput": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
    }


def _load_process(
    port: int, payloads: list[bytes], rate: float | None, seconds: float, connections: int, out: multiprocessing.Queue
) -> None:
    out.put(asyncio.run(_load(port, payloads, rate, seconds, connections)))


def run_load(port: int, payloads: list[bytes], rate: float | None, seconds: float, connections: int = 32) -> dict:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_load_process, args=(port, payloads, rate, seconds, connections, out))
    proc.start()
    result = out.get(timeout=seconds + 120)
    proc.join(timeout=30)
    return result


def _post(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


# --------------------------------------------------------------------------- the stack under test


def _seed(run_dir: Path, ps_url: str, feast_url: str, tracking_uri: str) -> None:
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


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench serving", description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests per second")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each measured open-loop run")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the server")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=100)
    args = parser.parse_args(argv)
    if not (
        0 < args.rate <= 5000
        and 1 <= args.seconds <= 60
        and 1 <= args.repeats <= 10
        and 1 <= args.candidates <= 1000
        and 1 <= args.workers <= 8
    ):
        parser.error(
            "rate in (0, 5000], seconds in [1, 60], repeats in [1, 10], candidates in [1, 1000], workers in [1, 8]"
        )

    from core.kafka import ensure_topics
    from core.settings import Settings
    from local_services import kafka as local_kafka
    from local_services import services

    defaults = Settings()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        run_dir = Path(tmp)
        started: list[str] = []
        proc = None
        try:
            ps_port, feast_port = services.free_port(), services.free_port()
            services.start_redis(run_dir, ps_port, name="bench-ps-replica")
            started.append("bench-ps-replica")
            services.start_redis(run_dir, feast_port, name="bench-feast")
            started.append("bench-feast")
            kafka_port, controller = services.free_port(), services.free_port()
            print("starting Kafka, Redis (parameter replica, Feast online store) on loopback ...", flush=True)
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
            tracking = f"sqlite:///{run_dir / 'mlflow.db'}"
            print("seeding parameters, features and the champion model ...", flush=True)
            _seed(run_dir, ps_url, feast_url, tracking)
            port = services.free_port()
            env = {
                **os.environ,
                "RECSYS_PS_REPLICAS": json.dumps([ps_url]),
                "RECSYS_PS_SHARDS": json.dumps([ps_url]),
                "RECSYS_FEAST_DATA_DIR": str(run_dir / "feast"),
                "RECSYS_FEAST_ONLINE_STORE": "redis",
                "RECSYS_FEAST_REDIS_URL": feast_url,
                "RECSYS_MLFLOW_TRACKING_URI": tracking,
                "RECSYS_KAFKA_BOOTSTRAP": bootstrap,
                "RECSYS_TOPIC_EVENTS": "bench.events",
                "RECSYS_SERVING_MODEL_NAME": MODEL_NAME,
                "RECSYS_RUN_DIR": str(run_dir),
            }
            proc = subprocess.Popen(
                [sys.executable, "-m", "recsys.cli", "serve", "--port", str(port), "--workers", str(args.workers)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(run_dir / "server.log", "wb"),
            )
            ready = _wait_ready(port, proc)
            print(
                f"server ready: model {ready['model_version']}, parameter version {ready['parameter_version']}",
                flush=True,
            )

            rng = np.random.default_rng(1)
            recommend = [
                _post(
                    "/v1/recommend",
                    {
                        "user_id": f"u{int(rng.integers(USERS))}",
                        "k": 10,
                        "candidate_item_ids": [f"i{j}" for j in rng.choice(ITEMS, args.candidates, replace=False)],
                    },
                )
                for _ in range(2000)
            ]
            ping = [_get("/v1/ping")]
            run_load(port, recommend, args.rate, 3.0)  # warm-up: caches, connections, lazy imports
            open_loop: dict[str, list[dict]] = {"recommend": [], "ping": []}
            closed: dict[str, list[dict]] = {"recommend": [], "ping": []}
            for r in range(args.repeats):
                for name, payloads in (("recommend", recommend), ("ping", ping)):
                    res = run_load(port, payloads, args.rate, args.seconds)
                    open_loop[name].append(res)
                    print(
                        f"  open loop {args.rate:.0f}/s {name:9s} run {r + 1}: p50 {res['p50_ms']:.2f} ms, "
                        f"p99 {res['p99_ms']:.2f} ms, {res['requests']} ok, {res['shed_503']} shed (503), "
                        f"{res['deadline_504']} past deadline (504), {res['errors']} errors",
                        flush=True,
                    )
                for name, payloads in (("recommend", recommend), ("ping", ping)):
                    res = run_load(port, payloads, None, min(args.seconds, 5.0), connections=16)
                    closed[name].append(res)
                    print(
                        f"  closed loop (16 in flight) {name:9s} run {r + 1}: {res['throughput']:.0f} req/s, "
                        f"p50 {res['p50_ms']:.2f} ms, {res['shed_503']} shed (503), {res['errors']} errors",
                        flush=True,
                    )
            metrics = __import__("httpx").get(f"http://127.0.0.1:{port}/metrics").text
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            for name in reversed(started):
                services.stop(run_dir, name)

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    rec_p50, rec_p99 = med(open_loop["recommend"], "p50_ms"), med(open_loop["recommend"], "p99_ms")
    ping_p50, ping_p99 = med(open_loop["ping"], "p50_ms"), med(open_loop["ping"], "p99_ms")
    rec_tp, ping_tp = med(closed["recommend"], "throughput"), med(closed["ping"], "throughput")
    every_run = [r for runs in (*open_loop.values(), *closed.values()) for r in runs]
    errors = sum(r["errors"] for r in every_run)
    shed, expired = sum(r["shed_503"] for r in every_run), sum(r["deadline_504"] for r in every_run)
    sent = next(
        (line for line in metrics.splitlines() if line.startswith("recsys_serving_impressions_sent_total")),
        "impressions: ?",
    )
    print()
    print(
        f"serving benchmark (medians of {args.repeats} runs; {args.candidates} candidates, k=10, DLRM champion, "
        f"Feast + parameter replica on Redis, impressions to Kafka; {args.workers} server worker(s); "
        f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
    print(f"  /v1/recommend at {args.rate:.0f} req/s: p50 {rec_p50:.2f} ms, p99 {rec_p99:.2f} ms")
    print(f"  baseline /v1/ping at {args.rate:.0f} req/s: p50 {ping_p50:.2f} ms, p99 {ping_p99:.2f} ms")
    print(f"  ratio recommend/ping: p50 {rec_p50 / ping_p50:.1f}x, p99 {rec_p99 / ping_p99:.1f}x")
    print(
        f"  throughput (16 in flight): /v1/recommend {rec_tp:.0f} req/s, /v1/ping {ping_tp:.0f} req/s "
        f"(ratio {rec_tp / ping_tp:.2f}x)"
    )
    print(f"  target p99 <= 20 ms at 200 req/s: {'met' if rec_p99 <= 20 and args.rate >= 200 else 'NOT met'}")
    print(
        f"  failed requests: {errors}; shed (503, not in the quantiles): {shed}; past deadline (504): {expired}; {sent}"
    )
    print(
        "  server-side mean per request (all runs): "
        + ", ".join(
            f"{stage} {_mean_ms(metrics, 'recsys_serving_stage_seconds', stage=stage):.2f} ms"
            for stage in ("features", "rows", "score")
        )
        + "; whole /v1/recommend handler "
        + f"{_mean_ms(metrics, 'recsys_serving_request_seconds', endpoint='recommend'):.2f} ms"
    )
    return 0 if errors == 0 else 1
