"""Stream worker benchmark: `uv run python -m bench streaming [--records N] [--repeats R] [--rate R]`.

1. Throughput: raw events/s through the whole Faust worker (`recsys stream worker` as a
   subprocess: validate, de-duplicate, encode, push features to Feast, join, emit samples)
   against a passthrough aiokafka consume -> produce -> commit loop over the same records,
   both reading the same pre-loaded topic in the same run. The worker's rate is taken from
   its own Prometheus counter between its first and its last record, so Feast's import and
   Faust's start-up are not counted.
2. Freshness: p99 delay from publishing a profile event to its features being readable from
   the online store (SQLite), with events published at a steady rate (default 5k/s); the
   baseline is a direct Feast push + read of one row (the floor the worker cannot beat).
3. Restart time (``--recovery N,N,...``): for each history length, with the worker's defaults and two
   baselines (the Feast store opened before the worker starts, RECSYS_STREAM_FEATURE_STORE_OPEN=before_start;
   no changelog settings, RECSYS_STREAM_CHANGELOG_COMPACTION=false), seconds from a worker's start to
   its first processed record after another worker processed that history, with the records its
   changelogs held; a history of 0 is the baseline (start-up alone). Off unless asked for.

Starts its own Kafka on free ports in a temporary directory and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson

from core.kafka import ensure_topics, publish, start_producer
from core.settings import PROJECT_ROOT
from feature_repo.contract import user_profile_event
from local_services import kafka as local_kafka
from local_services import services
from streaming.tables import changelog_sizes
from traffic.simulator import SimConfig, Simulation

PARTITIONS = 4


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[index]


# --------------------------------------------------------------------------- passthrough baseline


async def passthrough(bootstrap: str, source: str, total: int) -> float:
    """Consume every record of ``source`` and produce it to a fresh topic, committing per batch; records/s."""
    from aiokafka import AIOKafkaConsumer

    target = f"bench.passthrough.{uuid.uuid4().hex[:8]}"
    await ensure_topics(bootstrap, {target: PARTITIONS})
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=f"bench-pt-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=2000,
    )
    producer = await start_producer(bootstrap)
    await consumer.start()
    try:
        seen = 0
        started = None
        while seen < total:
            batches = await consumer.getmany(timeout_ms=500, max_records=2000)
            if not batches:
                continue
            if started is None:
                started = time.perf_counter()
            futures = []
            for records in batches.values():
                for record in records:
                    futures.append(await producer.send(target, record.value, key=record.key))
                seen += len(records)
            await asyncio.gather(*futures)
            await consumer.commit()
        return seen / (time.perf_counter() - started)
    finally:
        await consumer.stop()
        await producer.stop()


# --------------------------------------------------------------------------- the worker


def metric(port: int, name: str) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0
    total = 0.0
    for match in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M):
        total += float(match.group(1))
    return total


def worker_env(bootstrap: str, events: str, tmp: Path, **extra: str) -> tuple[dict[str, str], int]:
    tag = uuid.uuid4().hex[:8]
    port = services.free_port()
    env = {
        **os.environ,
        "RECSYS_KAFKA_BOOTSTRAP": bootstrap,
        "RECSYS_TOPIC_EVENTS": events,
        "RECSYS_TOPIC_SAMPLES": f"bench.samples.{tag}",
        "RECSYS_TOPIC_DEADLETTER": f"bench.dead.{tag}",
        "RECSYS_TOPIC_LATE": f"bench.late.{tag}",
        "RECSYS_TOPIC_PARTITIONS": str(PARTITIONS),
        "RECSYS_STREAM_APP_ID": f"bench-{tag}",
        "RECSYS_RUN_DIR": str(tmp / f"run-{tag}"),
        "RECSYS_FEAST_DATA_DIR": str(tmp / f"feast-{tag}"),
        "RECSYS_STREAM_METRICS_PORT": str(port),
        "RECSYS_STREAM_LOG_LEVEL": "warning",
        **extra,
    }
    return env, port


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "recsys.cli", "stream", "worker"],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_worker(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def worker_throughput(
    bootstrap: str, events: str, total: int, tmp: Path, timeout: float = 240.0
) -> tuple[float, dict[str, float]]:
    """The worker's raw events/s, and the records it wrote per destination (samples, changelog, ...)."""
    # the steady rate: Feast's import (a start-up cost, measured by --recovery) must not overlap the first records
    env, port = worker_env(
        bootstrap, events, tmp, RECSYS_STREAM_ATTRIBUTION_WINDOW_S="2", RECSYS_STREAM_FEATURE_STORE_OPEN="before_start"
    )
    log = tmp / f"worker-{env['RECSYS_STREAM_APP_ID']}.log"
    proc = start_worker(env, log)
    try:
        rate = rate_from_counter(proc, port, total, log, timeout)
        time.sleep(1.0)  # the last batches' changelog records go out once their samples are acknowledged
        return rate, records_out(port)
    finally:
        stop_worker(proc)


def records_out(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return {
        match.group(1): float(match.group(2))
        for match in re.finditer(r'^recsys_stream_records_out_total{destination="([^"]+)"} ([0-9.e+-]+)$', text, re.M)
    }


def rate_from_counter(proc: subprocess.Popen, port: int, total: int, log: Path, timeout: float) -> float:
    """Records/s between a worker's first and its ``total``-th record, from its records-in counter."""
    deadline = time.monotonic() + timeout
    first_t = first_n = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}: {log.read_text()[-2000:]}")
        n = metric(port, "recsys_stream_records_in_total")
        now = time.perf_counter()
        if n > 0 and first_t is None:
            first_t, first_n = now, n
        if n >= total:
            return (n - first_n) / (now - first_t) if now > first_t else float("inf")  # all in one scrape
        time.sleep(0.2)  # each scrape costs the worker CPU (process collector); 0.2 s is <3% of a run
    raise RuntimeError(f"worker did not finish in {timeout}s: {log.read_text()[-2000:]}")


def noop_worker() -> None:
    """A Faust worker that only reads the events in batches (no work): the framework's own ceiling."""
    import faust
    from faust.worker import Worker
    from prometheus_client import Counter, start_http_server

    env = os.environ
    app = faust.App(
        env["BENCH_APP_ID"],
        broker=f"kafka://{env['BENCH_BOOTSTRAP']}",
        store="memory://",
        datadir=env["BENCH_DATA_DIR"],
        web_enabled=False,
        broker_max_poll_records=2000,
        stream_buffer_maxsize=4096,
        consumer_auto_offset_reset="earliest",
        worker_redirect_stdouts=False,
        autodiscover=False,
        broker_commit_interval=1.0,
    )
    topic = app.topic(env["BENCH_TOPIC"], key_serializer="raw", value_serializer="raw")
    seen = Counter("recsys_stream_records_in", "records read by the no-op worker")

    @app.agent(topic)
    async def consume(stream):  # type: ignore[no-untyped-def]
        async for batch in stream.take_events(2000, within=0.1):
            seen.inc(len(batch))

    start_http_server(int(env["BENCH_PORT"]), addr="127.0.0.1")
    Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False).execute_from_commandline()


def noop_throughput(bootstrap: str, events: str, total: int, tmp: Path, timeout: float = 180.0) -> float:
    port = services.free_port()
    env = {
        **os.environ,
        "BENCH_APP_ID": f"bench-noop-{uuid.uuid4().hex[:8]}",
        "BENCH_BOOTSTRAP": bootstrap,
        "BENCH_TOPIC": events,
        "BENCH_PORT": str(port),
    }
    env["BENCH_DATA_DIR"] = str(tmp / f"{env['BENCH_APP_ID']}-data")
    log = tmp / f"noop-{env['BENCH_APP_ID']}.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from bench.streaming import noop_worker; noop_worker()"],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        return rate_from_counter(proc, port, total, log, timeout)
    finally:
        stop_worker(proc)


# --------------------------------------------------------------------------- recovery


async def group_members(bootstrap: str, group: str) -> int:
    """Members of a consumer group now (the broker's view)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([group])
        # DescribeGroupsResponse: groups of (error, group id, state, protocol type, protocol, members, ...)
        return sum(len(group_row[5]) for response in described for group_row in response.groups)
    finally:
        await admin.close()


def log_times(log: Path) -> dict[str, float]:
    """Wall times (epoch seconds) of the first log line with each message of interest, and Feast's opening time."""
    times: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        msg = entry.get("msg")
        if msg in ("feature store ready", "took partition") and msg not in times:
            times[msg] = float(entry["ts"])
            if msg == "feature store ready":
                times["feast_s"] = float(entry.get("seconds", float("nan")))  # opening, after its import
    return times


def first_record_s(
    env: dict[str, str], port: int, log: Path, bootstrap: str, events: str, timeout: float
) -> tuple[float, dict[str, float]]:
    """Seconds from starting a worker to its first processed record (a probe event published at its start),
    and the wall times of its start-up steps (``log_times``, relative to the start)."""
    started_wall, started = time.time(), time.perf_counter()
    proc = start_worker({**env, "RECSYS_STREAM_LOG_LEVEL": "info"}, log)
    try:
        probe = [(b"probe-user", orjson.dumps(profile("probe-user", time.time())))]
        asyncio.run(publish(probe, bootstrap, events))
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}: {log.read_text()[-2000:]}")
            if metric(port, "recsys_stream_records_in_total") > 0:
                seconds = time.perf_counter() - started
                steps = {k: v if k == "feast_s" else v - started_wall for k, v in log_times(log).items()}
                return seconds, steps
            time.sleep(0.2)  # each scrape costs the worker CPU
        raise RuntimeError(f"worker did not process a record in {timeout}s: {log.read_text()[-2000:]}")
    finally:
        stop_worker(proc)


def recovery(
    bootstrap: str,
    tmp: Path,
    history: int,
    compaction: bool,
    rate: float,
    settle_s: float,
    timeout: float = 900.0,
    feature_store_open: str = "background",
) -> tuple[float, dict[str, float], int, int]:
    """Restart time of a worker after ``history`` events: (seconds to its first record, its start-up steps,
    changelog records it restored, changelog records written). A first worker processes the history
    (simulated traffic at ``rate`` requests per second of event time, ending now; profiles of 2000 users
    and 1000 items first), then ``settle_s`` of live traffic at that rate; once it has left the group, a
    second one (same app id) is started and timed."""
    sim = Simulation(
        SimConfig(
            users=2000, items=1000, requests=max(1, history // 11), slate_size=10, seed=5, requests_per_second=rate
        )
    )
    records = list(sim.records())
    events = f"bench.recovery.{uuid.uuid4().hex[:8]}"
    asyncio.run(ensure_topics(bootstrap, {events: PARTITIONS}))
    # A replay runs ~100x faster than its event time: the wall-time settings are scaled down with it (the
    # retention of resolved entries; the changelogs' segment size and age, tombstone retention and dirty
    # ratio: what the cleaner does over hours of live traffic has to happen within the settle time), and the
    # idle advance is off (windows close on event time only, as in real time).
    extra = {
        "RECSYS_STREAM_CHANGELOG_COMPACTION": "true" if compaction else "false",
        "RECSYS_STREAM_CHANGELOG_SEGMENT_BYTES": str(1024**2),
        "RECSYS_STREAM_CHANGELOG_SEGMENT_MS": "5000",
        "RECSYS_STREAM_CHANGELOG_DELETE_RETENTION_MS": "5000",
        "RECSYS_STREAM_CHANGELOG_MIN_CLEANABLE_DIRTY_RATIO": "0.01",
        "RECSYS_STREAM_RESOLVED_RETENTION_S": "1",
        "RECSYS_STREAM_IDLE_ADVANCE_S": "86400",
        "RECSYS_STREAM_FEATURE_STORE_OPEN": feature_store_open,
    }
    env, port = worker_env(bootstrap, events, tmp, **extra)
    app_id = env["RECSYS_STREAM_APP_ID"]
    first = start_worker(env, tmp / f"worker-{app_id}-history.log")
    try:
        asyncio.run(publish(records, bootstrap, events))
        rate_from_counter(first, port, len(records), tmp / f"worker-{app_id}-history.log", timeout)
        # then live traffic at the same rate: the cleaner drops tombstones only while it cleans a log, and it
        # cleans one that got new records (a stopped stream keeps its last tombstones)
        live = Simulation(
            SimConfig(
                users=2000,
                items=1000,
                requests=max(1, int(rate * settle_s)),
                slate_size=10,
                seed=6,
                requests_per_second=rate,
                start_time=time.time(),
            )
        )
        asyncio.run(publish(live.records(), bootstrap, events, paced=True))
    finally:
        stop_worker(first)
    # a worker killed rather than stopped stays a member until its session times out: not what is measured here
    deadline = time.monotonic() + 60
    while asyncio.run(group_members(bootstrap, app_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    sizes = asyncio.run(changelog_sizes(bootstrap, app_id))
    restored, written = sum(held for held, _ in sizes.values()), sum(ever for _, ever in sizes.values())
    seconds, steps = first_record_s(env, port, tmp / f"worker-{app_id}-restart.log", bootstrap, events, timeout)
    return seconds, steps, restored, written


# --------------------------------------------------------------------------- freshness


def feast_floor(tmp: Path, n: int = 200) -> list[float]:
    """Delay of a direct one-row push and read from the online store (no Kafka, no worker)."""
    from feature_repo import store as fs
    from feature_repo.spec import encode_user

    store = fs.open_store(tmp / "feast-floor")
    delays = []
    for i in range(n):
        encoded = encode_user(f"floor{i}", {"age": 30})
        started = time.perf_counter()
        fs.push_online(store, "user", fs.rows_frame("user", [encoded], [time.time()]))
        while fs.read_online(store, "user", [f"floor{i}"])[f"floor{i}"] is None:
            pass
        delays.append(time.perf_counter() - started)
    return delays


def freshness(
    bootstrap: str, tmp: Path, rate: float, seconds: float, probe_every: int = 25
) -> tuple[list[float], float]:
    """Publish user profiles at ``rate``/s to a running worker; delays until probes are readable online."""
    from feature_repo import store as fs

    events = f"bench.fresh.{uuid.uuid4().hex[:8]}"
    asyncio.run(ensure_topics(bootstrap, {events: PARTITIONS}))
    env, port = worker_env(bootstrap, events, tmp)
    proc = start_worker(env, tmp / "worker-freshness.log")
    feast_dir = Path(env["RECSYS_FEAST_DATA_DIR"])
    published: dict[str, float] = {}
    delays: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def poll() -> None:
        store = fs.open_store(feast_dir, apply=False)
        while not stop.is_set() or published:
            with lock:
                pending = list(published)[:200]
            if not pending:
                time.sleep(0.002)
                continue
            found = fs.read_online(store, "user", pending)
            now = time.perf_counter()
            with lock:
                for user_id, encoded in found.items():
                    if encoded is not None and user_id in published:
                        delays.append(now - published.pop(user_id))
            time.sleep(0.002)

    async def publish() -> float:
        producer = await start_producer(bootstrap, linger_ms=1)
        try:
            # warm-up: wait until the worker serves a first profile (Feast import, Faust start-up)
            await producer.send_and_wait(events, orjson.dumps(profile("warmup", time.time())), key=b"warmup")
            store = None
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited: {(tmp / 'worker-freshness.log').read_text()[-2000:]}")
                if (feast_dir / "registry.db").exists():
                    try:  # the worker may still be applying the definitions
                        store = store or fs.open_store(feast_dir, apply=False)
                        if fs.read_online(store, "user", ["warmup"])["warmup"] is not None:
                            break
                    except Exception:
                        store = None
                await asyncio.sleep(0.2)
            poller.start()
            total = int(rate * seconds)
            started = time.perf_counter()
            for n in range(total):
                target = started + n / rate
                delay = target - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                user_id = f"fresh{n}"
                value = orjson.dumps(profile(user_id, time.time()))
                if n % probe_every == 0:
                    await producer.send_and_wait(events, value, key=user_id.encode())
                    with lock:
                        published[user_id] = time.perf_counter()
                else:
                    await producer.send(events, value, key=user_id.encode())
            await producer.flush()
            return total / (time.perf_counter() - started)
        finally:
            await producer.stop()

    poller = threading.Thread(target=poll, daemon=True)
    try:
        achieved = asyncio.run(publish())
        deadline = time.monotonic() + 60
        while published and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        poller.join(5)
        return delays, achieved
    finally:
        stop.set()
        stop_worker(proc)


def profile(user_id: str, ts: float) -> dict[str, Any]:
    return user_profile_event(
        event_id=f"p-{user_id}-{ts}",
        timestamp=ts,
        user_id=user_id,
        gender="F",
        age=33,
        occupation="writer",
        zip_code="10001",
    )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench streaming", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10000, help="simulated requests (10 impressions each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", type=float, default=5000.0, help="publish rate of the freshness run (events/s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the freshness run")
    parser.add_argument("--skip-freshness", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--recovery",
        type=lambda text: [int(n) for n in text.split(",") if n],
        default=[],
        metavar="N,N,...",
        help="restart times after these numbers of events of history, with and without the changelog settings",
    )
    parser.add_argument("--recovery-rate", type=float, default=20.0, help="requests/s of event time of the history")
    parser.add_argument(
        "--settle", type=float, default=45.0, help="seconds for the cleaner between history and restart"
    )
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    bootstrap = local_kafka.start_scratch_kafka(tmp, "kafka-bench")
    try:
        sim = Simulation(
            SimConfig(users=2000, items=1000, requests=args.requests, slate_size=10, seed=3, bad_fraction=0.01)
        )
        records = list(sim.records())
        events = f"bench.events.{uuid.uuid4().hex[:8]}"
        asyncio.run(ensure_topics(bootstrap, {events: PARTITIONS}))

        asyncio.run(publish(records, bootstrap, events))
        size = sum(len(r.value) for r in records) / len(records)
        print(
            f"pre-loaded {len(records)} records (mean {size:.0f} B; {len(sim.truth)} impressions, "
            f"{sum(sim.stats.bad.values())} malformed) into {PARTITIONS} partitions",
            flush=True,
        )

        base, work, noop = [], [], []
        for repeat in range(0 if args.skip_throughput else args.repeats):
            base.append(asyncio.run(passthrough(bootstrap, events, len(records))))
            rate, written = worker_throughput(bootstrap, events, len(records), tmp)
            work.append(rate)
            noop.append(noop_throughput(bootstrap, events, len(records), tmp))
            print(
                f"  repeat {repeat + 1}: worker {work[-1]:,.0f} ev/s, passthrough {base[-1]:,.0f} ev/s, "
                f"Faust no-op reader {noop[-1]:,.0f} ev/s",
                flush=True,
            )
            if repeat == 0:
                print(
                    "  records written per raw event: "
                    + ", ".join(
                        f"{destination} {count / len(records):.2f}" for destination, count in sorted(written.items())
                    ),
                    flush=True,
                )
        if not args.skip_throughput:
            w, b, f = statistics.median(work), statistics.median(base), statistics.median(noop)
            print(
                f"throughput (median of {args.repeats}): worker {w:,.0f} raw events/s; "
                f"passthrough aiokafka consume->produce {b:,.0f} events/s; ratio {w / b:.2f}x; "
                f"(Faust take_events reader doing nothing: {f:,.0f} events/s)"
            )

        # the worker's defaults first, then each baseline: the Feast store opened before the worker starts (as
        # before issue #18's restart work), and the broker's changelog defaults (no compaction settings)
        variants = ((True, "background"), (True, "before_start"), (False, "background"))
        for history in args.recovery:
            for compaction, feast_open in variants:
                seconds, steps, restored, written = recovery(
                    bootstrap, tmp, history, compaction, args.recovery_rate, args.settle, feature_store_open=feast_open
                )
                feast = (
                    f"Feast ready at {steps['feature store ready']:.1f} s, its opening {steps['feast_s']:.1f} s of it"
                    if "feature store ready" in steps
                    else "Feast not open yet at the first record"
                )
                print(
                    f"restart after {history:,} events ({'with' if compaction else 'without'} the changelog "
                    f"settings, Feast opened {feast_open.replace('_', ' ')}): first record {seconds:.1f} s after "
                    f"start ({feast}; group joined, tables restored and first partition taken at "
                    f"{steps.get('took partition', float('nan')):.1f} s); the changelogs held "
                    f"{restored:,} records of {written:,} written",
                    flush=True,
                )

        if not args.skip_freshness:
            floor = feast_floor(tmp)
            delays, achieved = freshness(bootstrap, tmp, args.rate, args.seconds)
            print(
                f"freshness at {achieved:,.0f} events/s published ({len(delays)} probes): "
                f"p50 {percentile(delays, 50) * 1000:.0f} ms, p99 {percentile(delays, 99) * 1000:.0f} ms "
                f"from publication to online-readable; baseline direct Feast push+read p50 "
                f"{percentile(floor, 50) * 1000:.1f} ms, p99 {percentile(floor, 99) * 1000:.1f} ms"
            )
        return 0
    finally:
        services.stop(tmp, "kafka-bench")
        shutil.rmtree(tmp, ignore_errors=True)
