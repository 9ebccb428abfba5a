"""The stream worker's logic, free of Faust: validate, de-duplicate, encode, join, emit.

The Faust app (``streaming/app.py``) feeds batches of raw records to ``Processor`` and
sends what comes back; the state lives in key-value stores that the app backs with Faust
tables (changelogged to Kafka) and unit tests back with dicts.

Delivery guarantee: at-least-once with idempotent consumers. Every sample carries a
deterministic ``sample_id`` (request id, item id) and the same label on every emission, so
a reader that keeps one sample per id sees exactly the samples of an uninterrupted run.
Why the labels do not change across a crash (Faust commits offsets only after flushing the
producer, so the state at the committed offset is complete, and anything after it may be
partially durable):

* de-duplication remembers where it first saw an event id (partition, offset): a record
  seen again at the same offset is a re-delivery after a crash and is processed again, a
  different offset is a client retry and is dropped;
* the whole life of an impression (open, positive, negative) is one key of one table, so
  the state restored for it is a prefix of its transitions;
* the event-time watermark of a partition is rebuilt from the re-delivered records (never
  restored ahead of them); a click joins only while the watermark before it has not passed
  the impression's deadline, and expiry runs after every batch, before its offsets can be
  committed, so a window decision taken before the commit is in the restored state;
* the app writes a batch's changelog records only after Kafka acknowledged the batch's
  samples (``StreamWorker.submit``), so a restored entry that says "resolved" always had its
  sample durable; a crash between the two leaves the entry open and the record that resolved
  it uncommitted, so it is resolved again on re-delivery (same id, same label). Resolved
  entries are therefore small (status and times) and are kept ``resolved_retention_s`` of
  wall time only to tell late clicks and impression retries apart.

The one input that is not replayed identically is wall time: a partition that holds open
impressions, has been read to its end and has been idle for ``idle_advance_s`` advances its
watermark with the clock,
so that windows close on a quiet stream. Replays that publish faster than that never go
idle mid-stream, so their labels do not depend on it.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import orjson

from feature_repo.contract import SCHEMA_VERSION, InvalidEvent, RejectReason, parse_event, sample_id
from feature_repo.spec import EncodedEntity, encode_item, encode_user, validate_encoded
from streaming import metrics

log = logging.getLogger("streaming.processor")

OPEN, POSITIVE, NEGATIVE = "o", "p", "n"

# reasons of the dead-letter topic beyond the contract's own (RejectReason)
INTERNAL_ERROR = "internal_error"
MISSING_KEY = "missing_value"
# reasons of the late-click topic
LATE_AFTER_NEGATIVE = "after_negative"
LATE_AFTER_WINDOW = "after_window"
LATE_NO_IMPRESSION = "no_impression"


_COUNTERS = {
    "events": metrics.EVENTS_IN,
    "dup": metrics.DUPLICATES,
    "feat": metrics.FEATURE_SOURCE,
    "samples": metrics.SAMPLES,
    "dead": metrics.DEADLETTERED,
    "late": metrics.LATE_CLICKS,
    "stale": metrics.STALE_PROFILES,
}


class KV(Protocol):
    """A key-value store whose writes name the source partition they belong to (a changelog partition)."""

    def get(self, key: str) -> Any: ...

    def put(self, partition: int, key: str, value: Any) -> None: ...

    def delete(self, partition: int, key: str) -> None: ...

    def items(self) -> Iterable[tuple[str, Any]]: ...

    def __len__(self) -> int: ...


class DictKV(dict):
    """In-memory KV for unit tests and the benchmark's passthrough."""

    def put(self, partition: int, key: str, value: Any) -> None:
        self[key] = value

    def delete(self, partition: int, key: str) -> None:
        self.pop(key, None)


class Record(Protocol):
    """What the processor reads of a Kafka record (Faust's ``Message`` is one, as is ``RawRecord``)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class RawRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


class Outgoing(NamedTuple):
    """A record for Kafka: ``kind`` is samples, deadletter or late (a tuple: ~3x cheaper to build than a dataclass)."""

    kind: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


# most event ids per de-duplication chunk (one changelog record): ids are <= 256 chars, so a chunk stays
# far below Kafka's 1 MB record limit
DEDUP_CHUNK_IDS = 1000


@dataclass(frozen=True)
class ProcessorConfig:
    attribution_window_s: float = 600.0
    dedup_window_s: float = 3600.0
    resolved_retention_s: float = 60.0
    idle_advance_s: float = 5.0
    max_event_bytes: int = 64 * 1024
    max_future_skew_s: float = 300.0
    max_event_age_s: float = 30 * 24 * 3600.0
    source_topic: str = "recsys.events"


@dataclass
class BatchResult:
    out: list[Outgoing] = field(default_factory=list)
    # latest encoded profile per id in this batch, with its event time: for the feature store
    users: dict[str, tuple[EncodedEntity, float]] = field(default_factory=dict)
    items: dict[str, tuple[EncodedEntity, float]] = field(default_factory=dict)


@dataclass
class _PartitionState:
    watermark: float = -math.inf  # max event time seen in this process (rebuilt, never restored)
    anchor_wall: float = 0.0  # wall time the watermark last moved
    last_arrival_wall: float = 0.0
    next_offset: int = -1  # offset after the last record handled
    open_heap: list[tuple[float, str]] = field(default_factory=list)  # (deadline, sample id)
    resolved_heap: list[tuple[float, str]] = field(default_factory=list)  # (resolved wall time, sample id)
    dedup_queue: deque[tuple[float, str]] = field(default_factory=deque)  # (newest event time, chunk key)
    chunk: dict[str, Any] | None = None  # the event ids first seen in the current batch, not yet in the table
    chunk_key: str = ""


def encoded_to_state(entity: EncodedEntity, ts: float) -> dict[str, Any]:
    return {"ts": ts, "sp": entity.sparse, "dn": entity.dense}


def sample_bytes(sid: str, entry: Mapping[str, Any], label: int) -> bytes:
    """The wire format of ``feature_repo.contract.Sample`` (same fields, same order), without pydantic's cost."""
    return orjson.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "sample_id": sid,
            "request_id": entry["r"],
            "user_id": entry["u"],
            "item_id": entry["i"],
            "label": label,
            "event_time": entry["ts"],
            "position": entry["pos"],
            "model_version": entry["mv"],
            "sparse": entry["sp"],
            "dense": entry["dn"],
        }
    )


class Processor:
    def __init__(
        self,
        config: ProcessorConfig,
        dedup: KV,
        joins: KV,
        users: KV,
        items: KV,
        wall: Callable[[], float] = time.time,
        caught_up: Callable[[int, int], bool] = lambda partition, next_offset: True,
    ) -> None:
        self.config = config
        # (partition, next offset) -> has this worker read everything the partition holds? Only a
        # caught-up partition counts as idle: a busy or restarting worker must not close windows early.
        self.caught_up = caught_up
        self.dedup, self.joins, self.users, self.items = dedup, joins, users, items
        # event id -> (partition, offset) where it was first seen; rebuilt from the ``dedup`` table, which holds
        # chunks of ids (one changelog record per batch and partition rather than one per event)
        self.seen: dict[str, tuple[int, int]] = {}
        self._user_json: dict[str, tuple[Any, bytes, bytes]] = {}
        self._item_json: dict[str, tuple[Any, bytes, bytes]] = {}
        self.wall = wall
        self.partitions: dict[int, _PartitionState] = {}
        # per-batch counts, added to the Prometheus metrics once per batch (per-event .inc() took ~30% of the CPU)
        self.tally: Counter[tuple[str, str]] = Counter()

    # ------------------------------------------------------------------ partitions

    def _take_partitions(self, partitions: set[int]) -> None:
        """Rebuild the in-memory indexes of partitions from their restored tables (one pass over the tables)."""
        now = self.wall()
        states = {p: _PartitionState(anchor_wall=now, last_arrival_wall=now) for p in partitions}
        for sid, entry in list(self.joins.items()):
            state = states.get(entry.get("p"))
            if state is None:
                continue
            if entry["st"] == OPEN:
                state.open_heap.append((entry["ts"] + self.config.attribution_window_s, sid))
            else:
                state.resolved_heap.append((entry.get("at", 0.0), sid))
        chunks: dict[int, list[tuple[float, str]]] = {p: [] for p in partitions}
        seen = self.seen
        for key, chunk in list(self.dedup.items()):
            p = chunk["p"] if isinstance(chunk, dict) else None  # (records of an older layout are skipped)
            if p in states:
                chunks[p].append((chunk["ts"], key))
                for event_id, offset in zip(chunk["ids"], chunk["off"]):
                    seen[event_id] = (p, offset)
        for p, state in states.items():
            heapq.heapify(state.open_heap)
            heapq.heapify(state.resolved_heap)
            state.dedup_queue.extend(sorted(chunks[p]))
            metrics.OPEN_IMPRESSIONS.inc(len(state.open_heap))
            log.info(
                "took partition",
                extra={
                    "fields": {
                        "partition": p,
                        "open": len(state.open_heap),
                        "resolved": len(state.resolved_heap),
                        "dedup_chunks": len(chunks[p]),
                    }
                },
            )
        self.partitions.update(states)

    def take_quiet_partition(self, p: int, position: int) -> None:
        """Take a partition that has nothing left to read (its committed offset is its end).

        No record will rebuild its watermark, so it starts from the restored tables: every record
        of the partition was committed, so nothing in them is ahead of the input.
        """
        if p in self.partitions:
            return
        self._take_partitions({p})
        state = self.partitions[p]
        times = [entry["ts"] for _, entry in self.joins.items() if entry.get("p") == p]
        times += [chunk["ts"] for _, chunk in self.dedup.items() if isinstance(chunk, dict) and chunk["p"] == p]
        if times:
            state.watermark = max(times)
        state.next_offset = position
        self.flush_metrics()

    def release_partitions(self, partitions: Iterable[int]) -> None:
        """Forget the in-memory indexes of revoked partitions (another worker now owns them)."""
        released = set()
        for p in partitions:
            state = self.partitions.pop(p, None)
            if state is not None:
                released.add(p)
                metrics.OPEN_IMPRESSIONS.dec(
                    sum(1 for _, sid in state.open_heap if (self.joins.get(sid) or {}).get("st") == OPEN)
                )
        if released:
            self.seen = {event_id: where for event_id, where in self.seen.items() if where[0] not in released}

    # ------------------------------------------------------------------ batches

    def process_batch(self, records: Sequence[Record]) -> BatchResult:
        result = BatchResult()
        touched = {record.partition for record in records}
        if not touched.issubset(self.partitions):
            self._take_partitions(touched.difference(self.partitions))
        partitions = self.partitions
        now = self.wall()
        for record in records:
            state = partitions[record.partition]
            state.last_arrival_wall = now
            state.next_offset = record.offset + 1
            try:
                self._process(record, state, result, now)
            except Exception as exc:  # a bug must not stop the stream: the record is kept, with the reason
                log.exception(
                    "record failed", extra={"fields": {"partition": record.partition, "offset": record.offset}}
                )
                self._deadletter(record, INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", result.out)
        for p in touched:
            state = partitions[p]
            if state.chunk is not None:
                self._close_chunk(p, state)
            self._expire(p, state, result.out, now)
        self.flush_metrics()
        return result

    def advance_idle(self) -> list[Outgoing]:
        """Move the watermark of idle partitions with the wall clock and close the windows it passes."""
        out: list[Outgoing] = []
        now = self.wall()
        for p, state in self.partitions.items():
            heap = state.open_heap
            while heap and (self.joins.get(heap[0][1]) or {}).get("st") != OPEN:
                heapq.heappop(heap)  # resolved by a click: nothing waits on it
            if not heap:
                # nothing waits for a window: quiet time is not banked (a partition that only saw profiles
                # must not expire the impressions that arrive after a pause)
                state.anchor_wall = now
            elif (
                state.watermark > -math.inf
                and now - state.last_arrival_wall >= self.config.idle_advance_s
                and self.caught_up(p, state.next_offset)
            ):
                state.watermark += now - state.anchor_wall
                state.anchor_wall = now
            self._expire(p, state, out, now)
        self.flush_metrics()
        return out

    def _process(self, record: Record, state: _PartitionState, result: BatchResult, now: float) -> None:
        c = self.config
        if record.value is None:
            self._deadletter(record, MISSING_KEY, "record has no value (tombstone)", result.out)
            return
        try:
            event = parse_event(
                record.value,
                max_bytes=c.max_event_bytes,
                max_future_skew_s=c.max_future_skew_s,
                max_age_s=c.max_event_age_s,
                now=now,
            )
        except InvalidEvent as exc:
            self._deadletter(record, exc.reason.value, exc.message, result.out)
            return
        kind = event.event_type
        if kind == "impression" and event.features is not None:
            try:
                validate_encoded(event.features.sparse, event.features.dense)
            except ValueError as exc:
                self._deadletter(record, RejectReason.BAD_VALUE.value, f"logged features: {exc}", result.out)
                return
        self.tally[("events", kind)] += 1
        p = record.partition
        if event.timestamp > state.watermark:
            state.watermark = event.timestamp
            state.anchor_wall = now
        seen = self.seen.get(event.event_id)
        if seen is not None:
            if seen[0] != p or seen[1] != record.offset:
                self.tally[("dup", kind)] += 1
                return
            # same partition and offset: a re-delivery after a crash, processed again (idempotently)
        else:
            self.seen[event.event_id] = (p, record.offset)
            chunk = state.chunk
            if chunk is None or len(chunk["ids"]) >= DEDUP_CHUNK_IDS:
                if chunk is not None:
                    self._close_chunk(p, state)
                chunk = state.chunk = {"p": p, "ts": event.timestamp, "ids": [], "off": []}
                state.chunk_key = f"{p}:{record.offset}"
            chunk["ids"].append(event.event_id)
            chunk["off"].append(record.offset)
            if event.timestamp > chunk["ts"]:
                chunk["ts"] = event.timestamp
        if kind == "impression":
            self._impression(event, p, state)
        elif kind == "click":
            self._click(event, record, state, result.out, now)
        elif kind == "user_profile":
            self._profile(
                self.users,
                result.users,
                p,
                event.user_id,
                encode_user(event.user_id, event.model_dump()),
                event.timestamp,
            )
        else:
            self._profile(
                self.items,
                result.items,
                p,
                event.item_id,
                encode_item(event.item_id, event.model_dump()),
                event.timestamp,
            )

    # ------------------------------------------------------------------ features

    def _profile(
        self,
        table: KV,
        batch: dict[str, tuple[EncodedEntity, float]],
        p: int,
        entity_id: str,
        encoded: EncodedEntity,
        ts: float,
    ) -> None:
        current = table.get(entity_id)
        if current is not None and current["ts"] > ts:
            self.tally[("stale", "")] += 1  # an older profile arriving late never overwrites a newer one
            return
        table.put(p, entity_id, encoded_to_state(encoded, ts))
        previous = batch.get(entity_id)
        if previous is None or previous[1] <= ts:
            batch[entity_id] = (encoded, ts)

    def features_for(self, user_id: str, item_id: str) -> tuple[orjson.Fragment, orjson.Fragment]:
        """The latest encoded features the stream knows for a (user, item) pair: ``join_features`` of them, as JSON.

        Sparse and dense come as JSON objects (spec order: user features, then item features),
        built from each profile's JSON, which is cached per profile version: this runs for every
        impression without logged features, and the features are written twice (the join entry's
        changelog record and the sample).
        """
        _, user_sparse, user_dense = self._profile_json(self.users, self._user_json, user_id, encode_user)
        _, item_sparse, item_dense = self._profile_json(self.items, self._item_json, item_id, encode_item)
        return (
            orjson.Fragment(b"{" + b",".join(filter(None, (user_sparse, item_sparse))) + b"}"),
            orjson.Fragment(b"{" + b",".join(filter(None, (user_dense, item_dense))) + b"}"),
        )

    @staticmethod
    def _profile_json(
        table: KV, cache: dict[str, tuple[Any, bytes, bytes]], entity_id: str, encode: Callable[[str], EncodedEntity]
    ) -> tuple[Any, bytes, bytes]:
        """(table state, sparse JSON members, dense JSON members) of one entity; cached while its state is the same."""
        state = table.get(entity_id)
        cached = cache.get(entity_id)
        if cached is not None and cached[0] is state:
            return cached
        if state is None:  # no profile known (yet): its id feature and the "missing" encoding of the rest
            encoded = encode(entity_id)
            sparse, dense = encoded.sparse, encoded.dense
        else:
            sparse, dense = state["sp"], state["dn"]
        if len(cache) >= 100_000:
            cache.clear()
        cached = cache[entity_id] = (state, orjson.dumps(sparse)[1:-1], orjson.dumps(dense)[1:-1])
        return cached

    # ------------------------------------------------------------------ the joiner

    def _impression(self, event: Any, p: int, state: _PartitionState) -> None:
        sid = sample_id(event.request_id, event.item_id)
        if self.joins.get(sid) is not None:
            return  # a retry of the same impression under a new event id, or a re-delivery: first one wins
        if event.features is not None:
            sparse, dense = event.features.sparse, event.features.dense
            self.tally[("feat", "logged")] += 1
        else:
            sparse, dense = self.features_for(event.user_id, event.item_id)  # type: ignore[assignment]
            self.tally[("feat", "stream")] += 1
        entry = {
            "st": OPEN,
            "p": p,
            "ts": event.timestamp,
            "r": event.request_id,
            "u": event.user_id,
            "i": event.item_id,
            "pos": event.position,
            "mv": event.model_version,
            "sp": sparse,
            "dn": dense,
        }
        self.joins.put(p, sid, entry)
        heapq.heappush(state.open_heap, (event.timestamp + self.config.attribution_window_s, sid))
        self.tally[("open", "")] += 1

    def _click(self, event: Any, record: Record, state: _PartitionState, out: list[Outgoing], now: float) -> None:
        sid = sample_id(event.request_id, event.item_id)
        entry = self.joins.get(sid)
        if entry is None:
            self._late(record, sid, LATE_NO_IMPRESSION, out)
        elif entry["st"] == OPEN:
            if state.watermark > entry["ts"] + self.config.attribution_window_s:
                # the window has closed in event time even if expiry has not run yet: negative, click is late
                out.append(self._resolve(record.partition, sid, entry, NEGATIVE, state, now))
                self._late(record, sid, LATE_AFTER_WINDOW, out)
            else:
                out.append(self._resolve(record.partition, sid, entry, POSITIVE, state, now))
        elif entry["st"] == NEGATIVE:
            self._late(record, sid, LATE_AFTER_NEGATIVE, out)
        else:
            self.tally[("dup", "click_on_positive")] += 1

    def _resolve(
        self, p: int, sid: str, entry: dict[str, Any], status: str, state: _PartitionState, now: float
    ) -> Outgoing:
        label = 1 if status == POSITIVE else 0
        sample = self._sample(sid, entry, label)
        # what later records need (status, times, partition): the sample itself is durable before this is
        self.joins.put(p, sid, {"st": status, "p": entry["p"], "ts": entry["ts"], "at": now})
        heapq.heappush(state.resolved_heap, (now, sid))
        self.tally[("open", "")] -= 1
        return sample

    def _sample(self, sid: str, entry: Mapping[str, Any], label: int) -> Outgoing:
        """The sample of an open entry."""
        self.tally[("samples", str(label))] += 1
        if self.tally[("samples", str(label))] % 16 == 1:  # sampled: a histogram observation costs ~10 us
            metrics.JOIN_LAG.observe(max(0.0, self.wall() - entry["ts"]))
        return Outgoing("samples", entry["u"].encode(), sample_bytes(sid, entry, label))

    def _expire(self, p: int, state: _PartitionState, out: list[Outgoing], now: float) -> None:
        heap = state.open_heap
        while heap and heap[0][0] < state.watermark:
            _, sid = heapq.heappop(heap)
            entry = self.joins.get(sid)
            if entry is not None and entry["st"] == OPEN:
                out.append(self._resolve(p, sid, entry, NEGATIVE, state, now))
        resolved = state.resolved_heap
        while resolved and resolved[0][0] < now - self.config.resolved_retention_s:
            _, sid = heapq.heappop(resolved)
            entry = self.joins.get(sid)
            if entry is not None and entry["st"] != OPEN:
                self.joins.delete(p, sid)
        queue = state.dedup_queue
        horizon = state.watermark - self.config.dedup_window_s
        seen = self.seen
        while queue and queue[0][0] < horizon:
            _, key = queue.popleft()
            chunk = self.dedup.get(key)
            if chunk is None:
                continue
            for event_id, offset in zip(chunk["ids"], chunk["off"]):
                if seen.get(event_id) == (p, offset):
                    del seen[event_id]
            self.dedup.delete(p, key)
        metrics.WATERMARK_LAG.labels(str(p)).set(max(0.0, now - state.watermark) if state.watermark > -math.inf else 0)

    def _close_chunk(self, p: int, state: _PartitionState) -> None:
        """Write the ids first seen since the last chunk as one ``dedup`` record, keyed by partition and first offset."""
        chunk = state.chunk
        self.dedup.put(p, state.chunk_key, chunk)
        state.dedup_queue.append((chunk["ts"], state.chunk_key))  # type: ignore[index]
        state.chunk = None

    # ------------------------------------------------------------------ side topics

    def _deadletter(self, record: Record, reason: str, message: str, out: list[Outgoing]) -> None:
        self.tally[("dead", reason)] += 1
        log.info(
            "dead-lettered",
            extra={
                "fields": {
                    "reason": reason,
                    "message": message[:200],
                    "partition": record.partition,
                    "offset": record.offset,
                }
            },
        )
        out.append(
            Outgoing(
                "deadletter",
                record.key,
                record.value or b"",
                (
                    ("reason", reason.encode()),
                    ("message", message[:1000].encode("utf-8", "replace")),
                    ("source_topic", self.config.source_topic.encode()),
                    ("source_partition", str(record.partition).encode()),
                    ("source_offset", str(record.offset).encode()),
                ),
            )
        )

    def _late(self, record: Record, sid: str, reason: str, out: list[Outgoing]) -> None:
        self.tally[("late", reason)] += 1
        out.append(
            Outgoing(
                "late",
                record.key,
                record.value or b"",
                (
                    ("reason", reason.encode()),
                    ("sample_id", sid.encode()),
                    ("source_partition", str(record.partition).encode()),
                    ("source_offset", str(record.offset).encode()),
                ),
            )
        )

    def flush_metrics(self) -> None:
        for (name, label), count in self.tally.items():
            if not count:
                continue
            if name == "open":
                metrics.OPEN_IMPRESSIONS.inc(count)
            else:
                _COUNTERS[name].labels(label).inc(count) if label else _COUNTERS[name].inc(count)
        self.tally.clear()

    def open_count(self) -> int:
        return sum(len(s.open_heap) for s in self.partitions.values())


def headers_dict(headers: Iterable[tuple[str, bytes]] | None) -> dict[str, str]:
    return {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)) for k, v in (headers or ())}


def iter_samples(values: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    for value in values:
        yield orjson.loads(value)
