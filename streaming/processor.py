"""The stream worker's logic, free of Faust: validate, de-duplicate, encode, join, emit.

The Faust app (``streaming.worker.StreamWorker``) feeds batches of raw records to ``Processor``
and sends what comes back; the state lives in key-value stores (``streaming.records.KV``) that
the app backs with Faust tables (changelogged to Kafka) and unit tests back with dicts. The
attribution window is ``streaming.joiner``'s; de-duplication and the partitions' watermarks are here.

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
  samples (``streaming.worker.StreamWorker.submit``), so a restored entry that says "resolved" always had its
  sample durable; a crash between the two leaves the entry open and the record that resolved
  it uncommitted, so it is resolved again on re-delivery (same id, same label). Resolved
  entries are therefore small (status and times) and are kept ``resolved_retention_s`` of
  wall time only to tell late clicks and impression retries apart.

The one input that is not replayed identically is wall time: a partition that holds open
impressions, has been read to its end and has been idle for ``idle_advance_s`` advances its
watermark with the clock, so that windows close on a quiet stream. Replays that publish faster than that never go
idle mid-stream, so their labels do not depend on it.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

from feature_repo.contract import Click, Impression, InvalidEvent, ItemProfile, RejectReason, UserProfile, parse_event
from feature_repo.spec import EncodedEntity, encode_item, encode_user, validate_encoded
from streaming import metrics
from streaming.joiner import Joiner
from streaming.records import (
    INTERNAL_ERROR,
    KV,
    MISSING_KEY,
    BatchResult,
    DictKV,
    Outgoing,
    PartitionState,
    ProcessorConfig,
    Record,
    dead_letter,
    is_rekeyed,
    rekeyed,
)

log = logging.getLogger("streaming.processor")

_COUNTERS = {
    "events": metrics.EVENTS_IN,
    "dup": metrics.DUPLICATES,
    "feat": metrics.FEATURE_SOURCE,
    "samples": metrics.SAMPLES,
    "dead": metrics.DEADLETTERED,
    "late": metrics.LATE_CLICKS,
    "stale": metrics.STALE_PROFILES,
    "redelivered": metrics.REDELIVERED,
    "rekeyed": metrics.REKEYED,
}

# most event ids per de-duplication chunk (one changelog record): ids are <= 256 chars, so a chunk stays
# far below Kafka's 1 MB record limit
DEDUP_CHUNK_IDS = 1000


def encoded_to_state(entity: EncodedEntity, ts: float) -> dict[str, Any]:
    return {"ts": ts, "sp": entity.sparse, "dn": entity.dense}


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
        home_partition: Callable[[bytes], int | None] | None = None,
        resolved: KV | None = None,
    ) -> None:
        self.config = config
        # key -> the events partition Kafka's default partitioner gives it (None: not known yet); None: one
        # partition, or a test that does not route (a single process holds every partition's tables anyway)
        self.home_partition = home_partition
        self._homes: dict[str, int] = {}
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
        self.partitions: dict[int, PartitionState] = {}
        # per-batch counts, added to the Prometheus metrics once per batch (per-event .inc() took ~30% of the CPU)
        self.tally: Counter[tuple[str, str]] = Counter()
        self.served: Counter[tuple[str | None, str | None, int]] = Counter()  # emitted samples, for served CTR
        self.served_counters = metrics.ServedCounters(config.served_metrics_max_versions)
        self.resolved = DictKV() if resolved is None else resolved
        self.joiner = Joiner(config, joins, self.resolved, self.tally, self.served, self.features_for, wall)

    # ------------------------------------------------------------------ partitions

    def _take_partitions(self, partitions: set[int]) -> None:
        """Rebuild the in-memory indexes of partitions from their restored tables (one pass over the tables)."""
        now = self.wall()
        states = {p: PartitionState(anchor_wall=now, last_arrival_wall=now) for p in partitions}
        self.joiner.restore(states)
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
                        "held_clicks": len(state.held_heap),
                        "remembered_labels": len(state.labels),
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
        times = self.joiner.event_times(p)
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
                metrics.OPEN_IMPRESSIONS.dec(self.joiner.open_in(state))
                log.info("released partition", extra={"fields": {"partition": p}})
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
            if record.offset < state.next_offset:
                # Delivered again while this process still owns the partition (Faust resumes the stream
                # before its seek to the committed offset, which then hands out records already handled):
                # their effects are in the state already, and handling them twice could reopen an
                # impression whose resolution has expired and give its sample a second label.
                self.tally[("redelivered", "")] += 1
                continue
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
                self._close_chunk(p, state, state.chunk)
            self._expire(p, state, result.out, now)
        self.flush_metrics()
        return result

    def advance_idle(self) -> list[Outgoing]:
        """Move the watermark of idle partitions with the wall clock and close the windows it passes."""
        out: list[Outgoing] = []
        now = self.wall()
        for p, state in self.partitions.items():
            if not self.joiner.waits(state):
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

    def _process(self, record: Record, state: PartitionState, result: BatchResult, now: float) -> None:
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
        if isinstance(event, Impression) and event.features is not None:
            try:
                validate_encoded(event.features.sparse, event.features.dense)
            except ValueError as exc:
                self._deadletter(record, RejectReason.BAD_VALUE.value, f"logged features: {exc}", result.out)
                return
        p = record.partition
        if self.home_partition is not None and not isinstance(event, ItemProfile) and not is_rekeyed(record):
            home = self._homes.get(event.user_id)
            if home is None:
                home = self._home(event.user_id)
            if home is not None and home != p:
                # keyed by something else than its user (null, empty, another user's key, a custom partitioner):
                # its impression, its click and its profile would be on different partitions, owned by different
                # workers, and never join. Re-published under its user's key, it is processed where they are.
                self.tally[("rekeyed", kind)] += 1
                result.out.append(rekeyed(record, event.user_id.encode()))
                return
        self.tally[("events", kind)] += 1
        if event.timestamp > state.watermark:
            state.watermark = event.timestamp
            state.anchor_wall = now
        # de-duplication, inline: it runs for every record
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
                    self._close_chunk(p, state, chunk)
                chunk = state.chunk = {"p": p, "ts": event.timestamp, "ids": [], "off": []}
                state.chunk_key = f"{p}:{record.offset}"
            chunk["ids"].append(event.event_id)
            chunk["off"].append(record.offset)
            if event.timestamp > chunk["ts"]:
                chunk["ts"] = event.timestamp
        if isinstance(event, Impression):
            self.joiner.impression(event, p, state, result.out, now)
        elif isinstance(event, Click):
            self.joiner.click(event, record, state, result.out, now)
        elif isinstance(event, UserProfile):
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

    def _home(self, user_id: str) -> int | None:
        assert self.home_partition is not None
        home = self.home_partition(user_id.encode())
        if home is not None:
            if len(self._homes) >= 500_000:
                self._homes.clear()
            self._homes[user_id] = home
        return home

    def _expire(self, p: int, state: PartitionState, out: list[Outgoing], now: float) -> None:
        self.joiner.expire(p, state, out, now)
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

    def _close_chunk(self, p: int, state: PartitionState, chunk: dict[str, Any]) -> None:
        """Write the ids first seen since the last chunk as one ``dedup`` record, keyed "partition:first offset"."""
        self.dedup.put(p, state.chunk_key, chunk)
        state.dedup_queue.append((chunk["ts"], state.chunk_key))
        state.chunk = None

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

    # ------------------------------------------------------------------ dead letters and metrics

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
        out.append(dead_letter(record, reason, message, self.config.source_topic))

    def flush_metrics(self) -> None:
        for (name, label), count in self.tally.items():
            if not count:
                continue
            if name == "open":
                metrics.OPEN_IMPRESSIONS.inc(count)
            elif label:
                _COUNTERS[name].labels(label).inc(count)
            else:
                _COUNTERS[name].inc(count)
        self.tally.clear()
        if self.served:
            self.served_counters.add(self.served)
            self.served.clear()

    def open_count(self) -> int:
        return sum(len(s.open_heap) for s in self.partitions.values())
