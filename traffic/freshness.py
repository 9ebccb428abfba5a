"""Freshness of the online loop, one probe at a time: a click -> its sample -> the flush that trained it
-> that parameter version on every replica -> the first served score of the pair that reflects it.

``bench freshness`` and the demo's online stage follow probes with these threads: a ``ProbeProducer``
publishes an impression and its click of a never-seen (user, item) pair, a ``SampleWatcher`` finds
the stream worker's sample (partition, offset), the ``Follower`` matches it to the online trainers'
flush journal (``RECSYS_ONLINE_JOURNAL_DIR``) and polls ``/v1/score`` until the pair is scored with
rows of that version or newer and a changed score; a ``Watcher`` records when each copy (the
training copy, then each replica) first reached each version. Times are wall-clock, on one clock.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Probe:
    user: str
    item: str
    published: float
    before: float
    partition: int = -1  # of its sample on the samples topic (-1: not seen there yet)
    offset: int = -1
    sampled: float | None = None  # when its sample was on the samples topic
    version: int | None = None  # the parameter version that holds its update
    flushed: float | None = None
    replicas: list[float | None] = field(default_factory=list)
    served: float | None = None
    score: float | None = None

    def done(self) -> bool:
        return self.served is not None and self.flushed is not None and all(t is not None for t in self.replicas)

    def fresh(self) -> float:
        return max(self.served or 0.0, *[t or 0.0 for t in self.replicas]) - self.published

    def stages(self) -> tuple[float, float, float, float]:
        """(published -> sample, sample -> flushed, flushed -> on every replica, flushed -> served) of a done probe."""
        flushed, served = self.flushed or 0.0, self.served or 0.0
        sampled = self.sampled if self.sampled is not None else self.published
        replicated = max(t or 0.0 for t in self.replicas)
        return sampled - self.published, flushed - sampled, replicated - flushed, served - flushed


class Watcher(threading.Thread):
    """Polls the versions of the training copy (0) and every replica (1..) every few ms; records when each
    first reached each version."""

    def __init__(self, stores: list) -> None:  # noqa: ANN001 - paramserver stores
        super().__init__(daemon=True)
        self.stores = stores
        self.history: list[list[tuple[float, int]]] = [[] for _ in stores]
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for i, store in enumerate(self.stores):
                try:
                    version = store.version()
                except Exception:  # noqa: BLE001 - a slow poll only delays the record
                    continue
                if not self.history[i] or version > self.history[i][-1][1]:
                    self.history[i].append((time.time(), version))
            time.sleep(0.003)

    def reached(self, replica: int, version: int) -> float | None:
        for t, v in self.history[replica]:
            if v >= version:
                return t
        return None


def journal_flushes(journal: Path, seen: dict[str, dict]) -> list[dict]:
    """Flush records of the journal not read yet."""
    new = []
    for path in sorted(journal.glob("flush-*.json")):
        if path.name in seen:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written: read at the next look
        seen[path.name] = record
        new.append(record)
    return new


def served_score(client, user: str, item: str) -> tuple[float, int | None]:  # noqa: ANN001 - httpx.Client
    """The served score of the pair and the parameter version of the rows it was scored with."""
    body = client.post("/v1/score", json={"pairs": [{"user_id": user, "item_id": item}]}).json()
    version = body["model_version"].rsplit("@ps", 1)
    return float(body["scores"][0]["score"]), int(version[1]) if len(version) == 2 else None


class Follower(threading.Thread):
    """Follows the probes added to ``probes`` on its own (so publishing the next one never delays it):
    matches the journal's flushes to them, reads the watcher, polls the served scores of pending ones."""

    def __init__(self, base: str, watcher: Watcher, journal: Path | None) -> None:
        super().__init__(daemon=True)
        self.base, self.watcher, self.journal = base, watcher, journal
        self.probes: list[Probe] = []
        self.seen: dict[str, dict] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base, timeout=60) as client:
            while not self.stop.is_set():
                self._step(client, [p for p in list(self.probes) if not p.done()])
                time.sleep(0.005)

    def _step(self, client, pending: list[Probe]) -> None:  # noqa: ANN001 - httpx.Client
        if self.journal is not None and any(p.version is None for p in pending):
            for record in journal_flushes(self.journal, self.seen):
                if record["version"] is None:
                    continue
                for p in pending:
                    if p.partition < 0:
                        continue
                    span = record["offsets"].get(str(p.partition))
                    if p.version is None and span and span[0] <= p.offset < span[1]:
                        p.version = record["version"]
        for p in pending:
            if p.version is None:
                continue
            if p.flushed is None:
                p.flushed = self.watcher.reached(0, p.version)
            for r in range(len(p.replicas)):
                if p.replicas[r] is None:
                    p.replicas[r] = self.watcher.reached(r + 1, p.version)
            if p.served is None:
                score, version = served_score(client, p.user, p.item)
                if version is not None and version >= p.version and score != p.before:
                    p.served, p.score = time.time(), score

    def pending_samples(self) -> int:
        return sum(p.partition < 0 for p in self.probes)

    def wait_done(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(p.done() for p in self.probes):
            time.sleep(0.05)
        self.stop.set()
        self.join(timeout=30)


class ProbeProducer:
    """One producer kept started on a loop of its own thread: publishing a probe costs one send."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from core.kafka import start_producer

        self.topic = topic
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.producer = self._call(start_producer(bootstrap, linger_ms=0))

    def _call(self, coroutine):  # noqa: ANN001, ANN202
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=120)

    def publish(self, user: str, item: str) -> tuple[float, int, int]:
        """A clicked sample of (user, item): when it was sent, its partition and offset."""
        from feature_repo.contract import Sample
        from feature_repo.spec import join_features

        sparse, dense = join_features(None, None, user, item)
        sample = Sample(
            sample_id=uuid.uuid4().hex,
            request_id=uuid.uuid4().hex,
            user_id=user,
            item_id=item,
            label=1,
            event_time=time.time(),
            sparse=sparse,
            dense=dense,
        )
        published = time.time()
        meta = self._call(self.producer.send_and_wait(self.topic, sample.to_json(), key=user.encode()))
        return published, meta.partition, meta.offset

    def click(self, events: str, user: str, item: str) -> tuple[float, str]:
        """An impression of (user, item) and its click on the events topic: the click's time and the sample id."""
        import orjson

        from feature_repo.contract import click_event, impression_event, sample_id

        request = f"probe-{uuid.uuid4().hex}"
        now = time.time()
        impression = impression_event(
            event_id=uuid.uuid4().hex, timestamp=now, request_id=request, user_id=user, item_id=item, position=0
        )
        self._call(self.producer.send_and_wait(events, orjson.dumps(impression), key=user.encode()))
        clicked = time.time()
        event = click_event(
            event_id=uuid.uuid4().hex, timestamp=clicked, request_id=request, user_id=user, item_id=item
        )
        self._call(self.producer.send_and_wait(events, orjson.dumps(event), key=user.encode()))
        return clicked, sample_id(request, item)

    def close(self) -> None:
        self._call(self.producer.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class SampleWatcher(threading.Thread):
    """Reads the samples topic (no group, from its end at start) and fills in where each watched probe's
    sample landed: the stream worker's output, matched by sample id."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.watched: dict[str, Probe] = {}
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        import orjson
        from aiokafka import AIOKafkaConsumer

        from core.kafka import connect_options, servers, start_client

        consumer = AIOKafkaConsumer(self.topic, **connect_options(self.bootstrap), auto_offset_reset="latest")
        await start_client(consumer, servers(self.bootstrap), consumer.stop)
        try:
            while not consumer.assignment():
                await asyncio.sleep(0.05)
            for tp in consumer.assignment():
                await consumer.position(tp)  # pin "latest" now: samples of probes sent after this are seen
            self.ready.set()
            while not self.stop.is_set():
                batches = await consumer.getmany(timeout_ms=100)
                now = time.time()
                for tp, records in batches.items():
                    for record in records:
                        if record.value is None or b"probe-" not in record.value:
                            continue
                        probe = self.watched.get(orjson.loads(record.value).get("sample_id"))
                        if probe is not None and probe.partition < 0:
                            probe.partition, probe.offset, probe.sampled = tp.partition, record.offset, now
        finally:
            await consumer.stop()
