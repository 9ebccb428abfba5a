"""The stream worker against real Kafka and Feast: a subprocess `recsys stream worker` per test.

Each test gets its own topics, Faust app id (consumer group, changelog topics), run and
Feast data directories; the simulator gives the ground truth of every impression.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from feast.errors import FeatureViewNotFoundException

from core.kafka import end_offsets, ensure_topics, produce_all, read_topic
from core.procs import free_port
from core.settings import PROJECT_ROOT
from feature_repo.contract import Sample, sample_id
from feature_repo.spec import encode_item, encode_user, join_features
from traffic.simulator import SimConfig, SimRecord, Simulation

pytestmark = pytest.mark.integration

PARTITIONS = 4
WINDOW_S = 4.0  # attribution window in event time; the simulated clicks arrive within 2 s
BAD_REASON = {"non_utf8": "not_utf8"}  # simulator's name -> contract reason where they differ
ALL_WORKERS: list[Worker] = []  # every worker of the running test, for the failure report
# An idle advance that never fires during a test: windows close on event time only, so the labels cannot
# depend on how long the stream pauses while a test waits on a worker (the wall clock is the one input a
# replay does not repeat, see streaming/processor.py); `end_of_stream` closes the last windows instead.
NEVER_S = 24 * 3600.0
STALL_S = 180.0  # no progress for this long is a hang (a worker's start-up on a loaded machine included)


LAUNCHERS = {
    "recsys": [sys.executable, "-m", "recsys.cli", "stream", "worker"],
    "faust": [sys.executable, "-m", "faust", "-A", "streaming.app", "worker", "-l", "warn"],  # Faust's own CLI
}


class Worker:
    """One stream worker subprocess (`recsys stream worker` unless told otherwise) with its log file."""

    def __init__(self, env: dict[str, str], log: Path, launcher: str = "recsys") -> None:
        self.log = log
        self.handle = open(log, "ab")
        self.proc = subprocess.Popen(
            LAUNCHERS[launcher],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        ALL_WORKERS.append(self)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.handle.close()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


class Setup:
    def __init__(
        self,
        bootstrap: str,
        tmp: Path,
        online: str = "sqlite",
        redis_url: str | None = None,
        tag: str | None = None,
        events_topic: str | None = None,
        idle_advance_s: float = 1.5,
    ) -> None:
        self.tag = tag = tag or uuid.uuid4().hex[:8]
        self.bootstrap = bootstrap
        self.events = events_topic or f"st.events.{tag}"
        self.samples, self.deadletter, self.late = f"st.samples.{tag}", f"st.dead.{tag}", f"st.late.{tag}"
        self.feast_dir = tmp / f"feast-{tag}"
        self.env = {
            **os.environ,
            "RECSYS_KAFKA_BOOTSTRAP": bootstrap,
            "RECSYS_TOPIC_EVENTS": self.events,
            "RECSYS_TOPIC_SAMPLES": self.samples,
            "RECSYS_TOPIC_DEADLETTER": self.deadletter,
            "RECSYS_TOPIC_LATE": self.late,
            "RECSYS_TOPIC_PARTITIONS": str(PARTITIONS),
            "RECSYS_STREAM_APP_ID": f"stream-test-{tag}",
            "RECSYS_RUN_DIR": str(tmp / f"run-{tag}"),
            "RECSYS_FEAST_DATA_DIR": str(self.feast_dir),
            "RECSYS_FEAST_ONLINE_STORE": online,
            "RECSYS_STREAM_ATTRIBUTION_WINDOW_S": str(WINDOW_S),
            "RECSYS_STREAM_IDLE_ADVANCE_S": str(idle_advance_s),
            "RECSYS_STREAM_SESSION_TIMEOUT_S": "6",
            "RECSYS_STREAM_BATCH_SIZE": "500",
            "RECSYS_STREAM_LOG_LEVEL": "info",
            "PYTHONUNBUFFERED": "1",
        }
        if redis_url:
            self.env["RECSYS_FEAST_REDIS_URL"] = redis_url
        self.tmp = tmp
        self.workers: list[Worker] = []
        asyncio.run(
            ensure_topics(bootstrap, {t: PARTITIONS for t in (self.events, self.samples, self.deadletter, self.late)})
        )

    def start_worker(self, launcher: str = "recsys") -> Worker:
        worker = Worker(self.env, self.tmp / f"worker-{self.tag}-{len(self.workers)}.log", launcher)
        self.workers.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()

    def publish(self, records) -> int:
        return asyncio.run(produce_all(self.bootstrap, self.events, [(r.key, r.value) for r in records]))

    def count(self, topic: str) -> int:
        return sum(asyncio.run(end_offsets(self.bootstrap, topic)).values())

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            self._fail_on_exit()
            time.sleep(0.5)
        _fail_with_logs(f"timed out waiting for {what}")

    def wait_until(self, what: str, measure: Callable[[], int], target: int, stall_s: float = STALL_S) -> None:
        """Poll ``measure`` until it reaches ``target``. Fails only when it stops growing for ``stall_s``
        (a hang) or a worker exits on its own: how long the worker takes is never a failure."""
        best, since = -1, time.monotonic()
        while (value := measure()) < target:
            if value > best:
                best, since = value, time.monotonic()
            elif time.monotonic() - since > stall_s:
                _fail_with_logs(f"no progress towards {what} for {stall_s:.0f} s (at {value} of {target})")
            self._fail_on_exit()
            time.sleep(0.2)

    def _fail_on_exit(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() not in (None, -signal.SIGKILL):
                pytest.fail(f"worker exited with {worker.proc.returncode}:\n{worker.tail()}")


def _fail_with_logs(message: str) -> None:
    logs = "\n---\n".join(f"{w.log.name}:\n{w.tail()}" for w in ALL_WORKERS)
    pytest.fail(f"{message}:\n{logs}")


def read_all(bootstrap: str, topic: str) -> list:
    """Every record of a topic with its headers."""

    async def run() -> list:
        ends = await end_offsets(bootstrap, topic)
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in ends]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            records = []

            async def behind() -> bool:
                return any([await consumer.position(tp) < ends[tp.partition] for tp in tps])

            while await behind():
                batch = await consumer.getmany(timeout_ms=1000)
                for tp_records in batch.values():
                    records.extend(tp_records)
            return records
        finally:
            await consumer.stop()

    return asyncio.run(run())


def samples_by_id(bootstrap: str, topic: str) -> dict[str, Sample]:
    """Samples de-duplicated by id; a sample id seen with two labels fails the test."""
    out: dict[str, Sample] = {}
    for record in read_all(bootstrap, topic):
        sample = Sample.from_json(record.value)
        previous = out.setdefault(sample.sample_id, sample)
        assert previous.label == sample.label, f"sample {sample.sample_id} emitted with both labels"
    return out


class SampleTally:
    """The distinct samples of a samples topic, read on from where the last look stopped."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.positions: dict[int, int] = {}
        self.first: dict[str, tuple[int, int, Sample]] = {}  # sample id -> where it was first seen, and it

    def distinct(self) -> int:
        async def read_on() -> None:
            async for record in read_topic(self.bootstrap, self.topic, start=dict(self.positions)):
                self.positions[record.partition] = record.offset + 1
                sample = Sample.from_json(record.value)
                p, offset, previous = self.first.setdefault(sample.sample_id, (record.partition, record.offset, sample))
                assert previous.label == sample.label, (
                    f"sample {sample.sample_id} emitted with both labels: {previous} at {p}:{offset}, "
                    f"{sample} at {record.partition}:{record.offset}"
                )

        asyncio.run(read_on())
        return len(self.first)


def _partition_of(key: bytes | None) -> int:
    """The events partition the producer sends ``key`` to (the client's default partitioner)."""
    return DefaultPartitioner()(key, list(range(PARTITIONS)), list(range(PARTITIONS)))


def samples_due(chunks: list[list[SimRecord]]) -> list[int]:
    """For each chunk, how many distinct samples a worker has emitted once it processed every chunk up to it.

    The worker's rules in event time: an impression's sample is out once its click came, or once the
    watermark of its partition (the latest event time it holds) passed the end of its window.
    """
    watermark = dict.fromkeys(range(PARTITIONS), -float("inf"))
    deadlines: dict[str, tuple[int, float]] = {}  # open impression -> (partition, end of its window)
    due: set[str] = set()
    counts = []
    for chunk in chunks:
        for record in chunk:
            p = _partition_of(record.key)
            watermark[p] = max(watermark[p], record.timestamp)
            if record.kind in ("impression", "click"):
                event = orjson.loads(record.value)
                sid = sample_id(event["request_id"], event["item_id"])
                if record.kind == "impression":
                    deadlines[sid] = (p, record.timestamp + WINDOW_S)
                elif sid in deadlines:  # a click on no impression is a late click, not a sample
                    due.add(sid)
        due.update(sid for sid, (p, deadline) in deadlines.items() if deadline < watermark[p])
        counts.append(len(due))
    return counts


def end_of_stream(records: list[SimRecord]) -> list[SimRecord]:
    """One event per partition, later than every window: the watermarks pass them and the last windows close.

    Clicks on no impression (they go to the late-click topic and make no sample)."""
    ts = max(r.timestamp for r in records) + WINDOW_S + 1.0
    keys: dict[int, bytes] = {}
    n = 0
    while len(keys) < PARTITIONS:
        key = f"end-of-stream-{n}".encode()
        keys.setdefault(_partition_of(key), key)
        n += 1
    return [
        SimRecord(
            key,
            orjson.dumps(
                {
                    "schema_version": 1,
                    "event_type": "click",
                    "event_id": f"end-of-stream-{p}",
                    "timestamp": ts,
                    "request_id": "end-of-stream",
                    "user_id": key.decode(),
                    "item_id": "end-of-stream",
                }
            ),
            ts,
            "click",
        )
        for p, key in sorted(keys.items())
    ]


def simulation(
    requests: int, bad_fraction: float = 0.0, seed: int = 7, requests_per_second: float = 100.0
) -> tuple[Simulation, list]:
    sim = Simulation(
        SimConfig(
            users=60,
            items=40,
            requests=requests,
            slate_size=5,
            seed=seed,
            requests_per_second=requests_per_second,
            click_delay_mean_s=0.5,
            click_delay_max_s=2.0,
            bad_fraction=bad_fraction,
        )
    )
    return sim, list(sim.records())


def truth_labels(sim: Simulation) -> dict[str, int]:
    return {sample_id(t.request_id, t.item_id): int(t.clicked) for t in sim.truth}


@pytest.fixture
def make_setup(kafka_bootstrap: str, tmp_path: Path):
    setups: list[Setup] = []

    def make(**kwargs) -> Setup:
        setup = Setup(kafka_bootstrap, tmp_path, **kwargs)
        setups.append(setup)
        return setup

    yield make
    for setup in setups:
        setup.stop_all()
    ALL_WORKERS.clear()


@pytest.mark.parametrize("online", ["sqlite", "redis"])
def test_stream_makes_labelled_samples_features_and_dead_letters(make_setup, redis_factory, online):
    from feature_repo import store as fs

    redis_url = redis_factory("feast").url if online == "redis" else None
    setup = make_setup(online=online, redis_url=redis_url)
    sim, records = simulation(requests=300, bad_fraction=0.03)
    profiles = [r for r in records if r.kind in ("user_profile", "item_profile")]
    traffic = [r for r in records if r.kind not in ("user_profile", "item_profile")]
    setup.publish(profiles)
    setup.start_worker()

    # profiles reach the online store before any impression is published
    users = {r.key.decode(): orjson.loads(r.value) for r in profiles if r.kind == "user_profile"}
    items = {r.key.decode(): orjson.loads(r.value) for r in profiles if r.kind == "item_profile"}

    def online_complete() -> bool:
        if not (setup.feast_dir / "registry.db").exists():
            return False
        store = fs.open_store(setup.feast_dir, online, redis_url, apply=False)
        try:
            got_users = fs.read_online(store, "user", list(users))
            got_items = fs.read_online(store, "item", list(items))
        except FeatureViewNotFoundException:  # the worker created the registry and is still applying to it
            return False
        return all(v is not None for v in got_users.values()) and all(v is not None for v in got_items.values())

    setup.wait_for("profiles in the online store", online_complete, timeout=150)
    store = fs.open_store(setup.feast_dir, online, redis_url, apply=False)
    for user_id, online_user in fs.read_online(store, "user", list(users)).items():
        assert online_user == encode_user(user_id, users[user_id])
    for item_id, online_item in fs.read_online(store, "item", list(items)).items():
        assert online_item == encode_item(item_id, items[item_id])

    setup.publish(traffic)
    expected = truth_labels(sim)
    setup.wait_for("every impression's sample", lambda: setup.count(setup.samples) >= len(expected))
    samples = samples_by_id(setup.bootstrap, setup.samples)
    assert set(samples) == set(expected)
    assert {sid: s.label for sid, s in samples.items()} == expected
    assert sum(expected.values()) > 0 and sum(expected.values()) < len(expected)
    for sample in samples.values():
        user_id, item_id = sample.user_id, sample.item_id
        assert (sample.sparse, sample.dense) == join_features(
            encode_user(user_id, users[user_id]), encode_item(item_id, items[item_id]), user_id, item_id
        )

    # every malformed record is in the dead-letter topic, with its original bytes and a reason
    bad = [r for r in records if r.kind.startswith("bad:")]
    assert bad
    setup.wait_for("dead letters", lambda: setup.count(setup.deadletter) >= len(bad))
    letters = read_all(setup.bootstrap, setup.deadletter)
    reasons = Counter(dict(letter.headers)["reason"].decode() for letter in letters)
    wanted = Counter(BAD_REASON.get(r.kind[4:], r.kind[4:]) for r in bad)
    assert reasons == wanted
    assert Counter(letter.value for letter in letters) == Counter(r.value for r in bad)
    assert setup.count(setup.late) == 0  # every click arrived inside its window

    # the offline store got the same rows, partitioned by date
    assert list((setup.feast_dir / "offline" / "user").glob("date=*/part-*.parquet"))


@pytest.mark.parametrize("launcher", ["recsys", "faust"])
def test_late_clicks_and_client_retries(make_setup, launcher):
    setup = make_setup()
    now = time.time()

    def event(**fields) -> tuple[bytes, bytes]:
        return fields["user_id"].encode(), orjson.dumps({"schema_version": 1, **fields})

    imp = {"event_type": "impression", "request_id": "r1", "user_id": "u1", "position": 0, "model_version": "m1@ps4"}
    explored = {"propensity": 0.05, "policy": "explore"}
    records = [
        event(**imp, **explored, event_id="i1", timestamp=now - 60, item_id="a"),
        event(**imp, **explored, event_id="i1", timestamp=now - 60, item_id="a"),  # a client retry
        event(**imp, event_id="i2", timestamp=now - 60, item_id="b", propensity=0.9, policy="exploit"),
        event(event_type="click", event_id="c1", timestamp=now - 59, request_id="r1", user_id="u1", item_id="a"),
        event(event_type="click", event_id="c1", timestamp=now - 59, request_id="r1", user_id="u1", item_id="a"),
        # moves event time past both windows: b closes negative, and its click is late
        event(
            **imp,
            event_id="i3",
            timestamp=now - 50,
            item_id="c",
        ),
        event(event_type="click", event_id="c2", timestamp=now - 49, request_id="r1", user_id="u1", item_id="b"),
    ]
    asyncio.run(produce_all(setup.bootstrap, setup.events, records))
    metrics_port = free_port()
    setup.env["RECSYS_STREAM_METRICS_PORT"] = str(metrics_port)  # served only by `recsys stream worker`
    setup.start_worker(launcher)
    setup.wait_for(
        "three samples and a late click",
        lambda: setup.count(setup.samples) >= 3 and setup.count(setup.late) >= 1,
        timeout=150,
    )
    samples = samples_by_id(setup.bootstrap, setup.samples)
    assert {s.item_id: s.label for s in samples.values()} == {"a": 1, "b": 0, "c": 0}
    # the impressions' propensities and policies came through the join (c logged none)
    assert {s.item_id: (s.propensity, s.policy) for s in samples.values()} == {
        "a": (0.05, "explore"),
        "b": (0.9, "exploit"),
        "c": (None, None),
    }
    if launcher == "recsys":
        # served CTR counters: one sample per (version, policy) here, the clicked one counted as a click too
        expected_served = {
            ("impressions", "m1@ps4", "explore"): 1.0,
            ("clicks", "m1@ps4", "explore"): 1.0,
            ("impressions", "m1@ps4", "exploit"): 1.0,
            ("clicks", "m1@ps4", "exploit"): 0.0,
            ("impressions", "m1@ps4", "none"): 1.0,
            ("clicks", "m1@ps4", "none"): 0.0,
        }
        assert served_counters(metrics_port) == expected_served
    [late] = read_all(setup.bootstrap, setup.late)
    # after_window when expiry had not run yet on the click's batch, after_negative otherwise
    assert dict(late.headers)["reason"] in (b"after_window", b"after_negative")
    assert dict(late.headers)["sample_id"] == sample_id("r1", "b").encode()
    assert orjson.loads(late.value)["event_id"] == "c2"
    assert setup.count(setup.samples) == 3  # the retried impression and click made nothing twice
    # the app created its tables' changelogs before its consumer started, compacted as Faust would
    policies = asyncio.run(
        cleanup_policies(
            setup.bootstrap,
            [
                f"stream-test-{setup.tag}-{table}-changelog"
                for table in ("dedup", "joins", "resolved", "users", "items")
            ],
        )
    )
    assert set(policies.values()) == {"compact"}, policies


def served_counters(port: int) -> dict[tuple[str, str, str], float]:
    """The worker's recsys_served_{impressions,clicks}_total, by (which, model version, policy)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for which in ("impressions", "clicks"):
                if sample.name == f"recsys_served_{which}_total":
                    out[(which, sample.labels["model_version"], sample.labels["policy"])] = sample.value
    return out


async def topic_configs(bootstrap: str, topics: list[str]) -> dict[str, dict[str, str]]:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
        return {
            resource[3]: {entry[0]: entry[1] for entry in resource[4]}
            for response in responses
            for resource in response.resources
        }
    finally:
        await admin.close()


async def cleanup_policies(bootstrap: str, topics: list[str]) -> dict[str, str]:
    return {name: configs["cleanup.policy"] for name, configs in (await topic_configs(bootstrap, topics)).items()}


@pytest.mark.slow
def test_sigkill_during_replay_loses_no_sample_and_changes_no_label(make_setup):
    # 50 requests per second of event time: 32 s, so a window (4 s) is short beside the gaps between the kills
    sim, records = simulation(requests=1600, seed=11, requests_per_second=50.0)
    expected = truth_labels(sim)
    steady = make_setup(idle_advance_s=NEVER_S)
    crashy = make_setup(events_topic=steady.events, idle_advance_s=NEVER_S)  # same input, its own group and outputs
    steady.start_worker()
    crashy.start_worker()
    # The replay goes out in chunks, each one only once the crashy worker has emitted as many samples as the
    # chunks up to `lag` before it make: however fast or slow the machine, the stream stays just ahead of the
    # worker. Each kill comes right after the chunk at a fixed place in the stream went out: the worker has
    # done most of what came before (seen in its samples), the chunks just sent are in flight, the rest is
    # not even published. Positions in the stream, not seconds, decide where the kills land.
    size = len(records) // 32 + 1
    chunks = [records[i : i + size] for i in range(0, len(records), size)]
    due = samples_due(chunks)
    lag = 2
    first_kill, second_kill = len(chunks) // 3, 2 * len(chunks) // 3
    assert due[first_kill - lag] > 0
    # the second kill waits on samples that the chunks the first worker could have read never make
    assert due[second_kill - lag] > due[first_kill]
    tally = SampleTally(crashy.bootstrap, crashy.samples)
    kills = 0
    for n, chunk in enumerate(chunks):
        if n >= lag:
            crashy.wait_until(f"the samples of chunk {n - lag}", tally.distinct, due[n - lag])
        steady.publish(chunk)
        if n in (first_kill, second_kill):
            crashy.workers[-1].kill()
            kills += 1
            crashy.start_worker()
    steady.publish(end_of_stream(records))
    for setup in (steady, crashy):
        sink = SampleTally(setup.bootstrap, setup.samples)
        setup.wait_until("every impression's sample", sink.distinct, len(expected))
    uninterrupted = samples_by_id(steady.bootstrap, steady.samples)
    recovered = samples_by_id(crashy.bootstrap, crashy.samples)
    assert kills == 2
    assert set(recovered) == set(uninterrupted) == set(expected)
    labels = {sid: s.label for sid, s in recovered.items()}
    assert labels == {sid: s.label for sid, s in uninterrupted.items()} == expected


def _partitions_taken(worker: Worker) -> set[int]:
    """The partitions ``worker`` holds now, replayed from its log (a rebalance releases some it took before)."""
    taken: set[int] = set()
    for line in worker.log.read_text(errors="replace").splitlines():
        # JSON log lines; Faust's console codes may precede one
        if '"took partition"' in line:
            taken.add(orjson.loads(line[line.index("{") :])["partition"])
        elif '"released partition"' in line:
            taken.discard(orjson.loads(line[line.index("{") :])["partition"])
    return taken


@pytest.mark.slow
def test_two_workers_in_one_group_share_the_partitions_and_make_every_sample(make_setup):
    sim, records = simulation(requests=800, seed=5)
    expected = truth_labels(sim)
    setup = make_setup(idle_advance_s=NEVER_S)
    first, second = setup.start_worker(), setup.start_worker()  # same app id: one consumer group

    def shared() -> bool:  # both in the group, each with its share (seen in their logs; start-up takes a while)
        taken = [_partitions_taken(first), _partitions_taken(second)]
        return all(taken) and taken[0] | taken[1] == set(range(PARTITIONS))

    setup.wait_for("both workers to take partitions", shared, timeout=STALL_S)
    setup.publish(records + end_of_stream(records))
    sink = SampleTally(setup.bootstrap, setup.samples)
    setup.wait_until("every impression's sample", sink.distinct, len(expected))
    time.sleep(7)  # longer than the session timeout: a worker that left the group would be seen below
    assert [w.proc.poll() for w in (first, second)] == [None, None], [w.tail() for w in (first, second)]
    got = samples_by_id(setup.bootstrap, setup.samples)
    assert {sid: s.label for sid, s in got.items()} == expected
    taken = [_partitions_taken(first), _partitions_taken(second)]
    assert all(taken), f"each worker should process some partitions, took {taken}"
    assert taken[0] | taken[1] == set(range(PARTITIONS))
