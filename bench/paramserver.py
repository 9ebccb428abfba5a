"""Parameter-service benchmark: `uv run python -m bench paramserver [--rows N] [--repeats R]`.

Starts its own redis-servers on free ports (temporary run directory) and measures, each
beside a baseline from the same run:

1. pull and push rows/s for batches of 4096 ids at dim 64 over 2 shards, versus raw
   pipelined MGET/MSET of the same bytes (one key per row) on the same servers;
2. memory per stored row (INFO used_memory) versus dim x 4 bytes, and versus one key per row;
3. replication lag p99 from push acknowledgement to visibility on a replica, under 20k row
   updates/s, versus Redis' own REPLICAOF replication of the same shard;
4. failover time when the nearest replica dies, versus a normal read; and (``--only
   failover-concurrent``) the latency of each of 100 concurrent reads with the nearest replica
   frozen, beside 100 concurrent reads without a fault;
5. the cost of gating served rows (``--only staging``, paramserver/staging.py): staging push and
   promotion rows/s versus a plain push of the same rows, memory per staged row and per undo row
   versus a stored row, and pull rows/s of the store while a stage waits beside it (what serving
   pays: nothing, by construction) and through a ``StagedView`` (what evaluation pays), versus a
   plain pull.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import signal
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import redis

from core.settings import get_settings
from local_services import services
from paramserver import FailoverReader, Replicator, Rows, TableConfig
from paramserver.redis_format import parse_applied
from paramserver.redis_store import RedisStore

BATCH = 4096
DIM = 64


def _start(run_dir: Path, name: str, extra: list[str] | None = None) -> str:
    port = services.free_port()
    services.start_redis(
        run_dir,
        port,
        name=name,
        extra_args=["--hash-max-listpack-value", "4096", "--hash-max-listpack-entries", "1024", *(extra or [])],
    )
    return f"redis://127.0.0.1:{port}/0"


def _rows(config: TableConfig, ids: np.ndarray, rng: np.random.Generator) -> Rows:
    return Rows(
        ids,
        rng.standard_normal((len(ids), config.dim)).astype(np.float32) * 0.01,
        rng.random((len(ids), config.state_dim)).astype(np.float32),
    )


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# --------------------------------------------------------------------------- 1. throughput


def bench_throughput(run_dir: Path, n_rows: int, repeats: int, rows_per_bucket: int) -> dict:
    urls = [_start(run_dir, f"bench-tp-{i}") for i in range(2)]
    config = TableConfig("user", dim=DIM, capacity=n_rows)
    rng = np.random.default_rng(0)
    all_ids = rng.choice(2**62, size=n_rows, replace=False).astype(np.int64)
    store = RedisStore(urls, [config], namespace="bench", log_retention_s=5.0, rows_per_bucket=rows_per_bucket)
    for start in range(0, n_rows, BATCH):
        store.push({"user": _rows(config, all_ids[start : start + BATCH], rng)})
    clients = [redis.Redis.from_url(u) for u in urls]
    pool = ThreadPoolExecutor(max_workers=2)
    shard_of, _ = store.shards.route(config, all_ids)
    # baseline keys: the same number of bytes per row under one key each, on the shard the store uses
    data = rng.integers(0, 255, size=(n_rows, config.row_bytes), dtype=np.uint8)
    for s, client in enumerate(clients):
        idx = np.flatnonzero(shard_of == s)
        for start in range(0, len(idx), 5000):
            chunk = idx[start : start + 5000]
            client.mset({b"raw:%d" % all_ids[j]: data[j].tobytes() for j in chunk.tolist()})

    def raw_get(ids: np.ndarray) -> np.ndarray:
        shards, _ = store.shards.route(config, ids)
        groups = [ids[shards == s] for s in range(2)]
        parts = list(pool.map(lambda s: clients[s].mget([b"raw:%d" % i for i in groups[s].tolist()]), range(2)))
        return np.frombuffer(b"".join(v for part in parts for v in part), np.uint8)

    def raw_set(ids: np.ndarray, rows: np.ndarray) -> None:
        shards, _ = store.shards.route(config, ids)

        def one(s: int) -> None:
            sel = np.flatnonzero(shards == s)
            clients[s].mset({b"raw:%d" % ids[j]: rows[j].tobytes() for j in sel.tolist()})

        list(pool.map(one, range(2)))

    pull_t, mget_t, push_t, mset_t = [], [], [], []
    for _ in range(repeats):
        batch = rng.choice(all_ids, size=BATCH, replace=False)
        t = time.perf_counter()
        got = store.pull("user", batch)
        pull_t.append(time.perf_counter() - t)
        assert got.weights.shape == (BATCH, DIM)
        t = time.perf_counter()
        raw = raw_get(batch)
        mget_t.append(time.perf_counter() - t)
        assert raw.size == BATCH * config.row_bytes
        update = _rows(config, batch, rng)
        t = time.perf_counter()
        store.push({"user": update})
        push_t.append(time.perf_counter() - t)
        rowbytes = np.frombuffer(np.concatenate([update.weights, update.state], axis=1).tobytes(), np.uint8)
        t = time.perf_counter()
        raw_set(batch, rowbytes.reshape(BATCH, config.row_bytes))
        mset_t.append(time.perf_counter() - t)
    store.close()
    pool.shutdown()
    for i in range(2):
        services.stop(run_dir, f"bench-tp-{i}")
    return {
        "pull_rows_s": BATCH / _median(pull_t),
        "mget_rows_s": BATCH / _median(mget_t),
        "push_rows_s": BATCH / _median(push_t),
        "mset_rows_s": BATCH / _median(mset_t),
    }


# --------------------------------------------------------------------------- 2. memory


def bench_memory(run_dir: Path, n_rows: int, dtype: str, rows_per_bucket: int) -> dict:
    url = _start(run_dir, f"bench-mem-{dtype}")
    client = redis.Redis.from_url(url)
    config = TableConfig("user", dim=DIM, storage_dtype=dtype, capacity=n_rows)
    rng = np.random.default_rng(1)
    ids = rng.choice(2**62, size=n_rows, replace=False).astype(np.int64)
    store = RedisStore([url], [config], namespace="mem", log_retention_s=0.0, rows_per_bucket=rows_per_bucket)
    before = int(client.info("memory")["used_memory"])
    for start in range(0, n_rows, BATCH):
        store.push({"user": _rows(config, ids[start : start + BATCH], rng)})
    # the delta log is held for the retention period, not per stored row: measure it, then drop it
    with_log = int(client.info("memory")["used_memory"])
    log_keys = list(client.scan_iter(match="mem:log:*", count=1000))
    client.unlink(*log_keys, "mem:commits")
    time.sleep(0.2)  # UNLINK frees in the background
    after = int(client.info("memory")["used_memory"])
    per_row = (after - before) / n_rows
    # baseline: the same rows as one key per row, on the same server
    rows = rng.integers(0, 255, size=(n_rows, config.row_bytes), dtype=np.uint8)
    for start in range(0, n_rows, 5000):
        client.mset({b"k:%d" % ids[j]: rows[j].tobytes() for j in range(start, min(n_rows, start + 5000))})
    per_key = (int(client.info("memory")["used_memory"]) - after) / n_rows
    store.close()
    services.stop(run_dir, f"bench-mem-{dtype}")
    return {
        "bytes_per_row": per_row,
        "key_per_row_bytes": per_key,
        "payload_bytes": config.row_bytes,
        "log_bytes_per_row": (with_log - after) / n_rows,
    }


# --------------------------------------------------------------------------- 5. gating (staging areas)


def bench_staging(run_dir: Path, n_rows: int, repeats: int, rows_per_bucket: int) -> dict:
    from paramserver.staging import StagedView, promote_stage

    url = _start(run_dir, "bench-stage")
    client = redis.Redis.from_url(url)
    config = TableConfig("user", dim=DIM, capacity=n_rows)
    rng = np.random.default_rng(2)
    ids = rng.choice(2**62, size=n_rows, replace=False).astype(np.int64)
    store = RedisStore([url], [config], namespace="gate", log_retention_s=0.0, rows_per_bucket=rows_per_bucket)

    def used() -> int:
        time.sleep(0.2)  # UNLINK frees in the background
        return int(client.info("memory")["used_memory"])

    def drop_log() -> None:
        keys = list(client.scan_iter(match="gate*:log:*", count=1000))
        if keys:
            client.unlink(*keys)

    for start in range(0, n_rows, BATCH):  # the champion's rows
        store.push({"user": _rows(config, ids[start : start + BATCH], rng)})
    plain_t = []  # the baseline: the same rows pushed over them, as a job without gating would
    for start in range(0, n_rows, BATCH):
        t = time.perf_counter()
        store.push({"user": _rows(config, ids[start : start + BATCH], rng)})
        plain_t.append(time.perf_counter() - t)
    drop_log()
    stored = used()
    # a job's rows: the same ids, trained, staged in batches as a job's push would be (one version each)
    stage = store.stage("job-bench")
    stage_t = []
    for start in range(0, n_rows, BATCH):
        t = time.perf_counter()
        stage.push({"user": _rows(config, ids[start : start + BATCH], rng)})
        stage_t.append(time.perf_counter() - t)
    drop_log()
    staged = used()

    pull_plain, pull_beside, pull_view = [], [], []
    view = StagedView(store, "job-bench")
    for _ in range(repeats):
        batch = rng.choice(ids, size=BATCH, replace=False)
        t = time.perf_counter()
        view.pull("user", batch)
        pull_view.append(time.perf_counter() - t)
        t = time.perf_counter()
        store.pull("user", batch)
        pull_beside.append(time.perf_counter() - t)
    t = time.perf_counter()
    done = promote_stage(store, "job-bench", undo="undo-bench")
    promote_s = time.perf_counter() - t
    drop_log()
    with_undo = used()
    for _ in range(repeats):
        batch = rng.choice(ids, size=BATCH, replace=False)
        t = time.perf_counter()
        store.pull("user", batch)
        pull_plain.append(time.perf_counter() - t)
    store.close()
    services.stop(run_dir, "bench-stage")
    assert done.rows == {"user": n_rows}
    return {
        "rows": n_rows,
        "push_rows_s": n_rows / sum(plain_t),
        "stage_rows_s": n_rows / sum(stage_t),
        "promote_rows_s": n_rows / promote_s,
        "staged_bytes_per_row": (staged - stored) / n_rows,
        "undo_bytes_per_row": (with_undo - stored) / n_rows,
        "pull_rows_s": BATCH / _median(pull_plain),
        "pull_beside_stage_rows_s": BATCH / _median(pull_beside),
        "pull_view_rows_s": BATCH / _median(pull_view),
    }


# --------------------------------------------------------------------------- 3. replication lag


def _replicate(source_urls: list[str], replica_url: str, stop: mp.Event) -> None:
    source = RedisStore(source_urls, [], namespace="lag")
    replica = RedisStore([replica_url], list(source.tables.values()), namespace="lag")
    Replicator(source, replica, poll_s=0.05).run(stop)  # type: ignore[arg-type]


def bench_lag(run_dir: Path, seconds: float, rows_per_s: int = 20_000, pushes_per_s: int = 10) -> dict:
    source_urls = [_start(run_dir, f"bench-lag-{i}") for i in range(2)]
    replica_url = _start(run_dir, "bench-lag-replica")
    native_port = int(source_urls[0].rsplit(":", 1)[1].split("/")[0])
    native_url = _start(run_dir, "bench-lag-native", ["--replicaof", "127.0.0.1", str(native_port)])
    config = TableConfig("user", dim=DIM, capacity=200_000)
    source = RedisStore(source_urls, [config], namespace="lag", log_retention_s=30.0)
    replica_probe = redis.Redis.from_url(replica_url)
    native_probe = redis.Redis.from_url(native_url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the native replica answers only after its first sync
        try:
            if native_probe.info("replication").get("master_link_status") == "up":
                break
        except redis.BusyLoadingError:
            pass
        time.sleep(0.1)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=_replicate, args=(source_urls, replica_url, stop))
    proc.start()
    rng = np.random.default_rng(2)
    ids = rng.choice(2**62, size=200_000, replace=False).astype(np.int64)
    per_push = rows_per_s // pushes_per_s
    acked: dict[int, float] = {}
    seen: dict[int, float] = {}
    native_seen: dict[int, float] = {}
    done = threading.Event()

    def watch() -> None:
        last = last_native = 0
        while not done.is_set() or last < max(acked, default=0):
            now = time.time()
            v = int(replica_probe.get("lag:version") or 0)
            for k in range(last + 1, v + 1):
                seen[k] = now
            last = max(last, v)
            nv = parse_applied(native_probe.get("lag:applied"))[0]  # shard 0's applied version, via REPLICAOF
            for k in range(last_native + 1, nv + 1):
                native_seen[k] = now
            last_native = max(last_native, nv)
            if done.is_set() and time.time() - done_at[0] > 10:
                break
            time.sleep(0.001)

    done_at = [0.0]
    watcher = threading.Thread(target=watch)
    source.push({"user": _rows(config, ids[:per_push], rng)})  # tables recorded before the replicator reads them
    deadline = time.monotonic() + 60
    while int(replica_probe.get("lag:version") or 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # the replicator process is up and has caught up: start the clock
    watcher.start()
    start = time.time()
    n = 0
    while time.time() - start < seconds:
        due = start + n / pushes_per_s
        if due > time.time():
            time.sleep(due - time.time())
        batch = rng.choice(ids, size=per_push, replace=False)
        v = source.push({"user": _rows(config, batch, rng)})
        acked[v] = time.time()
        n += 1
    achieved = n * per_push / (time.time() - start)
    done_at[0] = time.time()
    done.set()
    watcher.join()
    stop.set()
    proc.join(10)
    source.close()
    lags = [seen[v] - acked[v] for v in acked if v in seen]
    native = [native_seen[v] - acked[v] for v in acked if v in native_seen]
    for name in ("bench-lag-0", "bench-lag-1", "bench-lag-replica", "bench-lag-native"):
        services.stop(run_dir, name)
    return {
        "rows_per_s": achieved,
        "versions": len(acked),
        "visible": len(lags),
        "p50": float(np.percentile(lags, 50)),
        "p99": float(np.percentile(lags, 99)),
        "native_p50": float(np.percentile(native, 50)),
        "native_p99": float(np.percentile(native, 99)),
    }


# --------------------------------------------------------------------------- 4. failover


def bench_failover(run_dir: Path, trials: int) -> dict:
    source_urls = [_start(run_dir, "bench-fo-src")]
    config = TableConfig("user", dim=DIM, capacity=50_000)
    source = RedisStore(source_urls, [config], namespace="fo")
    ids = np.arange(BATCH, dtype=np.int64)
    source.push({"user": _rows(config, ids, np.random.default_rng(3))})
    near_url, far_url = _start(run_dir, "bench-fo-near"), _start(run_dir, "bench-fo-far")
    near_port = int(near_url.rsplit(":", 1)[1].split("/")[0])
    for url in (near_url, far_url):
        with RedisStore([url], [], namespace="fo") as replica:
            Replicator(source, replica).step()
    reader = FailoverReader([[near_url], [far_url]], [], probe_s=0.2, namespace="fo", timeout=0.3)
    batch = ids[:512]
    normal = []
    for _ in range(20):
        t = time.perf_counter()
        reader.pull("user", batch)
        normal.append(time.perf_counter() - t)
    results: dict[str, list[float]] = {"kill": [], "freeze": []}
    failed = 0
    for trial in range(trials * 2):
        mode = "kill" if trial % 2 == 0 else "freeze"
        assert reader.current == 0
        pid = next(e.pid for e in services.status(run_dir) if e.name == "bench-fo-near")
        if mode == "kill":
            services.stop(run_dir, "bench-fo-near")  # the nearest datacenter goes away: connections refused
        else:
            os.kill(pid, signal.SIGSTOP)  # it hangs (partition, stalled host): only timeouts tell
        started = time.perf_counter()
        while True:  # time until a read is served again (by the far replica)
            try:
                reader.pull("user", batch)
            except Exception:
                failed += 1
                continue
            if reader.current == 1:
                break
        results[mode].append(time.perf_counter() - started)
        if mode == "kill":
            services.start_redis(
                run_dir, near_port, name="bench-fo-near", extra_args=["--hash-max-listpack-value", "4096"]
            )
            with RedisStore([near_url], [], namespace="fo") as replica:
                Replicator(source, replica).step()
        else:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while reader.current != 0 and time.monotonic() < deadline:  # the probe brings reads back to the nearest
            reader.pull("user", batch)
            time.sleep(0.05)
    reader.close()
    source.close()
    for name in ("bench-fo-src", "bench-fo-near", "bench-fo-far"):
        services.stop(run_dir, name)
    return {
        "kill_s": _median(results["kill"]),
        "freeze_s": _median(results["freeze"]),
        "max_s": max(results["kill"] + results["freeze"]),
        "normal_read_s": _median(normal),
        "failed_reads": failed,
        "trials": trials,
        "timeout_s": 0.3,
    }


def bench_failover_concurrent(run_dir: Path, concurrent: int = 100, rounds: int = 3) -> dict:
    """Per-read latency of ``concurrent`` reads at once, the nearest replica frozen at each round's start."""
    source_urls = [_start(run_dir, "bench-foc-src")]
    config = TableConfig("user", dim=DIM, capacity=50_000)
    source = RedisStore(source_urls, [config], namespace="foc")
    ids = np.arange(BATCH, dtype=np.int64)
    source.push({"user": _rows(config, ids, np.random.default_rng(4))})
    near_url, far_url = _start(run_dir, "bench-foc-near"), _start(run_dir, "bench-foc-far")
    for url in (near_url, far_url):
        with RedisStore([url], [], namespace="foc") as replica:
            Replicator(source, replica).step()
    timeout_s = get_settings().ps.failover_timeout_s
    reader = FailoverReader([[near_url], [far_url]], [], probe_s=0.2, namespace="foc", timeout=timeout_s)
    batch = ids[:512]
    gate = threading.Barrier(concurrent)

    def timed_read() -> float:
        gate.wait()  # all reads start together
        t = time.perf_counter()
        reader.pull("user", batch)
        return time.perf_counter() - t

    pid = next(e.pid for e in services.status(run_dir) if e.name == "bench-foc-near")
    normal: list[float] = []
    frozen: list[float] = []
    with ThreadPoolExecutor(concurrent) as pool:
        for _ in range(rounds):
            normal += list(pool.map(lambda _: timed_read(), range(concurrent)))
            os.kill(pid, signal.SIGSTOP)
            try:
                frozen += list(pool.map(lambda _: timed_read(), range(concurrent)))
            finally:
                os.kill(pid, signal.SIGCONT)
            deadline = time.monotonic() + 10
            while reader.current != 0 and time.monotonic() < deadline:  # back to the nearest before the next round
                reader.pull("user", batch)
                time.sleep(0.05)
    reader.close()
    source.close()
    for name in ("bench-foc-src", "bench-foc-near", "bench-foc-far"):
        services.stop(run_dir, name)

    def spread(xs: list[float]) -> dict[str, float]:
        return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99)), "max": max(xs)}

    return {
        "normal": spread(normal),
        "frozen": spread(frozen),
        "concurrent": concurrent,
        "rounds": rounds,
        "timeout_s": timeout_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench paramserver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows stored for throughput and memory")
    parser.add_argument("--repeats", type=int, default=30, help="batches timed per operation")
    parser.add_argument("--lag-seconds", type=float, default=15.0, help="duration of the 20k rows/s load")
    parser.add_argument("--failover-trials", type=int, default=5)
    parser.add_argument("--rows-per-bucket", type=int, default=None, help="default: RECSYS_PS_ROWS_PER_BUCKET")
    parser.add_argument(
        "--only",
        choices=["throughput", "memory", "lag", "failover", "failover-concurrent", "staging"],
        action="append",
        help="run only these parts (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.getLogger("paramserver").setLevel(logging.ERROR)  # failover warnings are the expected outcome here
    if args.rows < BATCH or args.repeats < 1:
        parser.error("--rows must be >= 4096 and --repeats >= 1")
    rpb = args.rows_per_bucket or get_settings().ps.rows_per_bucket
    parts = set(args.only or ["throughput", "memory", "lag", "failover", "failover-concurrent", "staging"])
    with tempfile.TemporaryDirectory(prefix="bench-ps-") as tmp:
        run_dir = Path(tmp)
        try:
            if "throughput" in parts:
                tp = bench_throughput(run_dir, args.rows, args.repeats, rpb)
                print(
                    f"pull  {tp['pull_rows_s']:>12,.0f} rows/s   raw MGET {tp['mget_rows_s']:>12,.0f} rows/s   "
                    f"ratio {tp['pull_rows_s'] / tp['mget_rows_s']:.2f}  (target >= 0.7; batches of {BATCH}, dim {DIM},"
                    f" 2 shards, median of {args.repeats})"
                )
                print(
                    f"push  {tp['push_rows_s']:>12,.0f} rows/s   raw MSET {tp['mset_rows_s']:>12,.0f} rows/s   "
                    f"ratio {tp['push_rows_s'] / tp['mset_rows_s']:.2f}  (target >= 0.7; one version per batch)"
                )
            for dtype in ("float32", "float16") if "memory" in parts else ():
                mem = bench_memory(run_dir, args.rows, dtype, rpb)
                print(
                    f"memory {dtype}: {mem['bytes_per_row']:.1f} B/row = {mem['bytes_per_row'] / (DIM * 4):.3f}x "
                    f"dim*4 ({DIM * 4} B; payload {mem['payload_bytes']} B incl. state)   one key per row "
                    f"{mem['key_per_row_bytes']:.1f} B/row = {mem['key_per_row_bytes'] / (DIM * 4):.3f}x   "
                    f"ratio {mem['bytes_per_row'] / mem['key_per_row_bytes']:.2f}; delta log while retained "
                    f"+{mem['log_bytes_per_row']:.0f} B/row written"
                    + ("  (target <= 1.2x)" if dtype == "float32" else "")
                )
            if "lag" in parts:
                lag = bench_lag(run_dir, args.lag_seconds)
                print(
                    f"replication lag at {lag['rows_per_s']:,.0f} row updates/s: p99 {lag['p99'] * 1000:.1f} ms "
                    f"(p50 {lag['p50'] * 1000:.1f} ms; {lag['visible']}/{lag['versions']} versions)   "
                    f"native REPLICAOF of one shard p99 {lag['native_p99'] * 1000:.1f} ms (p50 "
                    f"{lag['native_p50'] * 1000:.1f} ms)   ratio {lag['p99'] / max(lag['native_p99'], 1e-6):.1f}  "
                    f"(target p99 <= 1 s)"
                )
            if "failover" in parts:
                fo = bench_failover(run_dir, args.failover_trials)
                print(
                    f"failover when the nearest replica dies: killed {fo['kill_s'] * 1000:.1f} ms, frozen "
                    f"(SIGSTOP, {fo['timeout_s']} s timeout) {fo['freeze_s'] * 1000:.1f} ms (medians of "
                    f"{fo['trials']}; max {fo['max_s'] * 1000:.1f} ms; {fo['failed_reads']} failed reads)   "
                    f"normal read {fo['normal_read_s'] * 1000:.2f} ms   ratio (frozen) "
                    f"{fo['freeze_s'] / fo['normal_read_s']:.0f}  (target <= 1 s)"
                )
            if "failover-concurrent" in parts:
                fc = bench_failover_concurrent(run_dir)
                n, f = fc["normal"], fc["frozen"]
                print(
                    f"{fc['concurrent']} concurrent reads of 512 rows ({fc['rounds']} rounds): normal p50 "
                    f"{n['p50'] * 1000:.1f} / p99 {n['p99'] * 1000:.1f} / max {n['max'] * 1000:.1f} ms; nearest "
                    f"frozen (SIGSTOP, {fc['timeout_s']} s timeout) p50 {f['p50'] * 1000:.1f} / p99 "
                    f"{f['p99'] * 1000:.1f} / max {f['max'] * 1000:.1f} ms  (target: max <= timeout + a small margin)"
                )
            if "staging" in parts:
                st = bench_staging(run_dir, args.rows, args.repeats, rpb)
                print(
                    f"staging {st['rows']:,} rows: stage push {st['stage_rows_s']:,.0f} rows/s vs plain push "
                    f"{st['push_rows_s']:,.0f} (ratio {st['stage_rows_s'] / st['push_rows_s']:.2f}); promotion "
                    f"{st['promote_rows_s']:,.0f} rows/s (ratio {st['promote_rows_s'] / st['push_rows_s']:.2f} of a "
                    f"plain push; reads the stage and the replaced rows, writes the undo area and the rows)"
                )
                print(
                    f"staging memory: staged {st['staged_bytes_per_row']:.1f} B/row, kept undo "
                    f"{st['undo_bytes_per_row']:.1f} B/row after promotion, vs a stored row (see memory above); "
                    f"pull {st['pull_rows_s']:,.0f} rows/s, beside a waiting stage "
                    f"{st['pull_beside_stage_rows_s']:,.0f} "
                    f"(ratio {st['pull_beside_stage_rows_s'] / st['pull_rows_s']:.2f}), through a StagedView "
                    f"{st['pull_view_rows_s']:,.0f} (ratio {st['pull_view_rows_s'] / st['pull_rows_s']:.2f})"
                )
        finally:
            for entry in services.status(run_dir):
                services.stop(run_dir, entry.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
