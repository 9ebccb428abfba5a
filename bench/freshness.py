"""Freshness of the online loop, end to end: a click -> sample -> trained -> flushed -> on every replica -> served.

    uv run python -m bench freshness [--rate 1000] [--probes 40] [--replicas 2] [--trainers 1]
                                     [--flush-interval S] [--no-worker] [--kafka HOST:PORT]

Starts Kafka (unless ``--kafka``), the stream worker (`recsys stream worker`, unless
``--no-worker``), one Redis for the training copy and one per inference replica,
``--trainers`` online-trainer processes (`recsys train online`), a replicator per replica, and
the serving app in process (rows and online dense weights from the nearest replica).
Background load: simulated samples published to the samples topic at ``--rate`` per second
all along. Probes: every ~2 s (random phase) an impression and a click of a never-seen
(user, item) pair go to the events topic; the chain of each is timed on one clock:

- click -> sample: the stream worker joined the click and its sample is on the samples topic
  (read by the benchmark, matched by sample id); with ``--no-worker`` the probe is the sample;
- sample -> flushed: consumed, trained, and pushed in a flush (the trainer's flush journal
  says which flush covered the sample's offset and its parameter version; flushed is when the
  training copy reached that version);
- flushed -> on every replica: the first time each replica's version reached that version;
- flushed -> served: the first /v1/score answer for the pair scored with rows of that version
  or newer (its ``model_version`` names them) whose score differs from the one before the click.

Freshness = the later of "on every replica" and "served", from the click. Printed: p50 and p99
with the stage breakdown. Baseline, measured in the same run: the same chain for rows pushed
straight into the training copy (no Kafka, no trainer): what the replication and serving's
version poll cost alone, so the difference is the worker's and the trainer's (mostly the flush
interval). The hourly batch DAG's equivalent (schedule, not measured) is printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from traffic.freshness import Follower, Probe, ProbeProducer, SampleWatcher, Watcher, served_score

DESCRIPTION = __doc__


class Load(threading.Thread):
    """Publishes simulated samples to the samples topic at ``rate`` per second until stopped."""

    def __init__(self, bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], rate: float) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.records, self.rate = bootstrap, topic, records, rate
        self.sent = 0
        self.seconds = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        from core.kafka import start_producer

        producer = await start_producer(self.bootstrap)
        started = time.monotonic()
        try:
            while not self.stop.is_set():
                due = int((time.monotonic() - started) * self.rate)
                while self.sent < due:
                    key, value = self.records[self.sent % len(self.records)]
                    await producer.send(self.topic, value, key=key)
                    self.sent += 1
                await asyncio.sleep(0.005)
            await producer.flush()
        finally:
            self.seconds = time.monotonic() - started
            await producer.stop()


def _stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"p50 {np.percentile(values, 50):.2f} s, p99 {np.percentile(values, 99):.2f} s, max {max(values):.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench freshness", description=DESCRIPTION)
    parser.add_argument("--rate", type=float, default=1000.0, help="background samples/s published all along")
    parser.add_argument("--probes", type=int, default=40, help="clicked samples of never-seen pairs to time")
    parser.add_argument("--every", type=float, default=2.0, help="mean seconds between probes (random phase)")
    parser.add_argument("--baseline-probes", type=int, default=15, help="direct row pushes timed as the baseline")
    parser.add_argument("--replicas", type=int, default=2, help="inference replicas (Redis each)")
    parser.add_argument("--trainers", type=int, default=1, help="online-trainer processes in the group")
    parser.add_argument("--flush-interval", type=float, default=None, help="RECSYS_ONLINE_FLUSH_INTERVAL_S")
    parser.add_argument(
        "--no-worker",
        action="store_true",
        help="publish the probes' samples straight to the samples topic (skip the stream worker's click join)",
    )
    parser.add_argument("--kafka", default=None, help="bootstrap of a running Kafka (default: start one)")
    args = parser.parse_args(argv)

    from local_services import kafka as local_kafka
    from local_services import services

    tmp = Path(tempfile.mkdtemp(prefix="bench-freshness-"))
    started: list[str] = []
    procs: list[subprocess.Popen] = []
    try:
        bootstrap = args.kafka
        if bootstrap is None:
            started.append("kafka-fresh")
            bootstrap = local_kafka.start_scratch_kafka(tmp, "kafka-fresh")
        urls = []
        for i in range(1 + args.replicas):
            port = services.free_port()
            services.start_redis(tmp, port, name=f"redis-fresh-{i}")
            started.append(f"redis-fresh-{i}")
            urls.append(f"redis://127.0.0.1:{port}/0")
        return _run(args, bootstrap, urls[0], urls[1:], tmp, procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for name in reversed(started):
            services.stop(tmp, name)
        shutil.rmtree(tmp, ignore_errors=True)


def _run(
    args: argparse.Namespace, bootstrap: str, train_url: str, replica_urls: list[str], tmp: Path, procs: list
) -> int:
    from core.consumer_lag import group_lag
    from core.kafka import ensure_topics
    from core.settings import PROJECT_ROOT, Settings
    from paramserver import Replicator, open_store
    from serving.app import create_app
    from serving.components import Components
    from serving.features import StaticFeatures
    from serving.loader import OnlineDense
    from serving.model import EmbeddingDotScorer, ModelHandle
    from serving.server import server_config
    from serving.wiring import open_rows
    from traffic.simulator import SimConfig
    from traffic.synthetic import simulate_samples
    from training.model import ModelConfig
    from training.online.rows import dense_table
    from training.params import open_training_store, table_configs

    tag = uuid.uuid4().hex[:8]
    topic, group = f"samples.fresh.{tag}", f"fresh.{tag}"
    journal = tmp / "journal"
    env = {
        "RECSYS_KAFKA_BOOTSTRAP": bootstrap,
        "RECSYS_TOPIC_SAMPLES": topic,
        "RECSYS_PS_SHARDS": json.dumps([train_url]),
        "RECSYS_PS_NAMESPACE": f"fresh{tag}",
        "RECSYS_LOCAL_RUN_DIR": str(tmp / "run"),
        "RECSYS_ONLINE_GROUP_ID": group,
        "RECSYS_ONLINE_JOURNAL_DIR": str(journal),
        **({"RECSYS_ONLINE_FLUSH_INTERVAL_S": str(args.flush_interval)} if args.flush_interval else {}),
    }
    os.environ.update(env)  # this process's settings are the trainers'
    s = Settings()
    asyncio.run(ensure_topics(bootstrap, {topic: s.kafka.topic_partitions}))
    print("simulating the background samples ...", flush=True)
    background = simulate_samples(SimConfig(users=2000, items=1000, requests=2000, seed=7)).samples
    records = [(b.user_id.encode(), b.to_json()) for b in background]

    logs = []
    for i in range(args.trainers):
        log = tmp / f"trainer-{i}.log"
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "training.cli", "online"],
                cwd=PROJECT_ROOT,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
                stdout=open(log, "wb"),
                stderr=subprocess.STDOUT,
            )
        )
    events = f"events.fresh.{tag}"
    worker = None
    if not args.no_worker:
        from bench.streaming import start_worker, worker_env

        asyncio.run(ensure_topics(bootstrap, {events: s.kafka.topic_partitions}))
        worker_vars, _ = worker_env(bootstrap, events, tmp, RECSYS_TOPIC_SAMPLES=topic)
        worker = start_worker(worker_vars, tmp / "worker.log")
        procs.append(worker)
    config = ModelConfig.of_settings(s.train)
    # the tables as a trainer creates them, so that replicas and serving know them from the start
    from training.model import DenseArch

    n_params = sum(p.numel() for p in DenseArch(config).parameters())
    source: Any = open_training_store(
        s.ps, [*table_configs(s.train.embedding_dim, s.train.init_std), dense_table(n_params)]
    )
    replicas = [open_store("redis", [], s.ps, shards=[url]) for url in replica_urls]  # watched
    targets: list[Any] = [open_store("redis", [], s.ps, shards=[url]) for url in replica_urls]  # replicated into
    stop = threading.Event()
    threads = [
        threading.Thread(target=Replicator(source, r, poll_s=s.ps.replicator_poll_s).run, args=(stop,), daemon=True)
        for r in targets
    ]
    for t in threads:
        t.start()
    watcher = Watcher([source, *replicas])
    watcher.start()
    load = Load(bootstrap, topic, records, args.rate)

    rows = open_rows(s, replica_urls)
    model = ModelHandle(None, lambda: EmbeddingDotScorer({}), rows.refresh_version, OnlineDense(rows, config))
    comps = Components(model=model, rows=rows, features=StaticFeatures(), follow_stream=False, log_impressions=False)
    app = create_app(s, comps)
    port = _free_port()
    import uvicorn

    server = uvicorn.Server(server_config(app, s.serving, host="127.0.0.1", port=port, log_level="warning"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    import httpx

    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        _wait(lambda: server.started, 60, "serving")
        _wait(lambda: all(" owns partitions " in log.read_text(errors="replace") for log in logs), 180, "trainers")
        load.start()
        print(
            f"warming up: background load {args.rate:.0f} samples/s; flush interval {s.online.flush_interval_s} s, "
            f"replicator poll {s.ps.replicator_poll_s} s, serving version poll {s.serving.param_version_poll_s} s, "
            f"online dense refresh {s.serving.online_dense_refresh_s} s",
            flush=True,
        )
        _wait(lambda: model.current is not None and model.current.version.startswith("online/"), 120, "online dense")

        rng = np.random.default_rng(5)
        base = f"http://127.0.0.1:{port}"
        follower = Follower(base, watcher, journal)
        follower.start()
        producer = ProbeProducer(bootstrap, topic)
        samples = SampleWatcher(bootstrap, topic)
        samples.start()
        _wait(samples.ready.is_set, 60, "the samples reader")
        try:
            if worker is not None:  # until the stream worker joins a first click (Faust and Feast start-up)
                print("waiting for the stream worker ...", flush=True)
                warm = Probe(f"warm-u{tag}", f"warm-i{tag}", 0.0, 0.0)
                clicked, sid = producer.click(events, warm.user, warm.item)
                samples.watched[sid] = warm
                _wait(lambda: warm.partition >= 0 or worker.poll() is not None, 240, "the stream worker")
                if worker.poll() is not None:
                    raise RuntimeError(f"the stream worker exited: {(tmp / 'worker.log').read_text()[-2000:]}")
            print(f"{args.probes} probes ...", flush=True)
            for k in range(args.probes):
                time.sleep(float(rng.uniform(0.5, 1.5)) * args.every)  # a random phase of the flush cycle
                user, item = f"fresh-u{tag}-{k}", f"fresh-i{tag}-{k}"
                before, _ = served_score(client, user, item)
                if worker is None:
                    published, partition, offset = producer.publish(user, item)
                    probe = Probe(user, item, published, before, partition, offset, replicas=[None] * len(replicas))
                else:
                    probe = Probe(user, item, 0.0, before, replicas=[None] * len(replicas))
                    probe.published, sid = producer.click(events, user, item)
                    samples.watched[sid] = probe
                follower.probes.append(probe)
        finally:
            producer.close()
        follower.wait_done(60.0)
        samples.stop.set()
        samples.join(timeout=30)
        probes = follower.probes
        lag = asyncio.run(group_lag(bootstrap, group, topic))

        # baseline: rows pushed straight into the training copy (no Kafka, no trainer), same load
        from feature_repo.spec import user_id_key

        direct_follower = Follower(base, watcher, None)
        direct_follower.start()
        for k in range(args.baseline_probes):
            time.sleep(float(rng.uniform(0.5, 1.5)) * args.every / 2)
            user, item = f"direct-u{tag}-{k}", f"direct-i{tag}-{k}"
            before, _ = served_score(client, user, item)
            ids = np.array([user_id_key(user)], np.int64)
            delta = np.full((1, s.train.embedding_dim + 1), 0.1, np.float32)
            published = time.time()
            version = source.push_deltas({"user_id": (ids, delta)})
            direct_follower.probes.append(
                Probe(user, item, published, before, version=version, replicas=[None] * len(replicas))
            )
        direct_follower.wait_done(30.0)
        direct = direct_follower.probes
    finally:
        load.stop.set()
        load.join(timeout=30)
        client.close()
        server.should_exit = True
        serving.join(timeout=30)
        stop.set()
        watcher.stop.set()
        for t in threads:
            t.join(timeout=10)
        source.close()
        for r in [*replicas, *targets]:
            r.close()

    _report(args, probes, direct, load, lag, s)
    return 0 if all(p.done() for p in probes) else 1


def _report(args, probes: list[Probe], direct: list[Probe], load: Load, lag, s) -> None:  # noqa: ANN001
    done = [p for p in probes if p.done()]
    achieved = load.sent / load.seconds if load.seconds else 0.0
    print(
        f"\nbackground load: {load.sent} samples in {load.seconds:.0f} s = {achieved:,.0f} samples/s; "
        f"uncommitted at the end (awaiting a flush): {sum(p.end - p.committed for p in lag) if lag else 'n/a'} samples"
    )
    print(f"probes: {len(done)} of {len(probes)} served with their update (the others timed out)")
    if done:
        start = "sample published" if args.no_worker else "click"
        stages = {
            "click -> sample (stream worker's join)": [p.stages()[0] for p in done],
            "sample -> flushed (consumed, trained, pushed)": [p.stages()[1] for p in done],
            "flushed -> on every replica": [p.stages()[2] for p in done],
            "flushed -> served score changed": [p.stages()[3] for p in done],
        }
        if args.no_worker:
            del stages["click -> sample (stream worker's join)"]
        print(f"freshness ({start} -> on every replica and served): {_stats([p.fresh() for p in done])}")
        print("  stages:")
        for name, values in stages.items():
            print(f"    {name:<50} {_stats(values)}")
    base = [p for p in direct if p.done()]
    print(
        f"baseline, rows pushed straight into the training copy ({len(base)} of {len(direct)}): "
        f"push -> on every replica and served: {_stats([p.fresh() for p in base])}"
    )
    print(
        f"hourly batch DAG ({s.airflow.training_schedule}, not measured): a click waits for the next run, "
        "mean 1800 s + the run's duration, worst 3600 s + the run's duration"
    )


def _free_port() -> int:
    from local_services import services

    return services.free_port()


def _wait(check, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
