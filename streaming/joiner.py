"""The joiner: an impression waits in the ``joins`` table for its click until event time passes its deadline.

The whole life of an impression (held click, open, positive, negative) is one key of ``joins`` (its
sample id), so the state restored for it after a crash is a prefix of its transitions
(``streaming.processor`` says why the labels survive a crash). An open entry holds what its sample
needs; a resolved entry keeps only its status and times, for ``resolved_retention_s`` of wall time,
to tell late clicks and impression retries apart.

A click that comes before its impression (another device, or another partition, uploaded first) is
held under the same key (``HELD``: the click record itself, to send it on if nothing comes) until
event time passes ``click time + early_click_wait_s``; its impression arriving within that resolves
the entry positive at once. A held click whose wait ends goes to the late topic as ``no_impression``
and is forgotten (an impression arriving after that is an impression without a click: label 0).

One label forever: every resolved sample id is remembered with its label (``PartitionState.labels``,
changelogged as chunks in table ``resolved``, one record per batch and partition rather than one per
sample) until its partition's event time is ``max_event_age_s + max_future_skew_s`` past it, when no
event of it can be accepted any more. A re-sent impression of a remembered id is dropped; a re-sent
click on it is a duplicate (label 1) or late ``after_negative`` (label 0): a log published twice, after
de-duplication forgot its event ids and the joins forgot its entries, never gives an id a second label.
"""

from __future__ import annotations

import heapq
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from feature_repo.contract import SCHEMA_VERSION, sample_id
from streaming import metrics
from streaming.records import (
    KV,
    LATE_AFTER_NEGATIVE,
    LATE_AFTER_WINDOW,
    LATE_NO_IMPRESSION,
    LATE_TOO_OLD_TO_WAIT,
    Outgoing,
    PartitionState,
    ProcessorConfig,
    RawRecord,
    Record,
    late_click,
)

if TYPE_CHECKING:
    from feature_repo.contract import Click, Impression

OPEN, POSITIVE, NEGATIVE, HELD = "o", "p", "n", "c"
# most sample ids per label-memory chunk (one changelog record): 1000 x ~40 bytes stays far below Kafka's 1 MB
LABELS_CHUNK_IDS = 1000


def _held_entry(p: int, ts: float, record: Record) -> dict[str, Any]:
    """A held click: what its late record needs if no impression comes (bytes kept exactly: latin-1 is 1:1)."""
    return {
        "st": HELD,
        "p": p,
        "ts": ts,
        "o": record.offset,
        "k": None if record.key is None else record.key.decode("latin-1"),
        "v": (record.value or b"").decode("latin-1"),
        "h": [[name, (value or b"").decode("latin-1")] for name, value in record.headers or ()],
    }


def _held_record(entry: Mapping[str, Any]) -> Record:
    key = entry["k"]
    return RawRecord(
        entry["p"],
        entry["o"],
        None if key is None else key.encode("latin-1"),
        entry["v"].encode("latin-1"),
        headers=tuple((name, value.encode("latin-1")) for name, value in entry["h"]),
    )


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
            # absent from an entry: the impression logged none (or predates propensities); the sample says null
            "propensity": entry.get("pr"),
            "policy": entry.get("pl"),
            "sparse": entry["sp"],
            "dense": entry["dn"],
        }
    )


class Joiner:
    """Opens, resolves and expires the ``joins`` entries of the partitions the processor holds.

    ``features_for`` gives the stream's features of a (user, item) pair for impressions that logged
    none; ``tally`` is the processor's per-batch metric counts, ``served`` its per-batch count of
    emitted samples by (model version, policy, label): the served CTR.
    """

    def __init__(
        self,
        config: ProcessorConfig,
        joins: KV,
        resolved: KV,
        tally: Counter[tuple[str, str]],
        served: Counter[tuple[str | None, str | None, int]],
        features_for: Callable[[str, str], tuple[Any, Any]],
        wall: Callable[[], float],
    ) -> None:
        self.config = config
        self.joins = joins
        self.resolved = resolved
        # event time a resolved id is remembered: until no event of it can be accepted any more
        self.labels_horizon_s = config.max_event_age_s + config.max_future_skew_s
        self.tally = tally
        self.served = served
        self.features_for = features_for
        self.wall = wall

    # ------------------------------------------------------------------ partitions

    def restore(self, states: Mapping[int, PartitionState]) -> None:
        """Fill the heaps of newly taken partitions from the restored table (one pass over it; not heapified)."""
        window = self.config.attribution_window_s
        for key, chunk in list(self.resolved.items()):
            state = states.get(chunk.get("p"))
            if state is None:
                continue
            state.labels.update(zip(chunk["ids"], map(int, chunk["lab"])))
            state.labels_queue.append((chunk["ts"], key))
        for sid, entry in list(self.joins.items()):
            state = states.get(entry.get("p"))
            if state is None:
                continue
            if entry["st"] in (OPEN, HELD) and sid in state.labels:
                # Resolved, its sample durable (labels are written after it), but the records that resolved and
                # deleted the entry are not in what was read: the cleaner removed them while this worker read the
                # changelog (a restart longer than delete.retention.ms), or a crash lost them. Kept, the entry
                # would give the id a second sample.
                self.joins.delete(entry["p"], sid)
                continue
            if entry["st"] == OPEN:
                state.open_heap.append((entry["ts"] + window, sid))
            elif entry["st"] == HELD:
                state.held_heap.append((entry["ts"] + self.config.early_click_wait_s, sid))
            else:
                state.resolved_heap.append((entry.get("at", 0.0), sid))
        for state in states.values():
            state.labels_queue = deque(sorted(state.labels_queue))

    def event_times(self, p: int) -> list[float]:
        """Event times of the restored entries of partition ``p`` (a quiet partition's watermark starts there)."""
        return [entry["ts"] for _, entry in self.joins.items() if entry.get("p") == p]

    def open_in(self, state: PartitionState) -> int:
        """Impressions of a partition still waiting for a click."""
        return sum(1 for _, sid in state.open_heap if (self.joins.get(sid) or {}).get("st") == OPEN)

    def waits(self, state: PartitionState) -> bool:
        """Does an impression (or a held click) of this partition wait on event time? (Drops resolved heads.)"""
        for heap, status in ((state.open_heap, OPEN), (state.held_heap, HELD)):
            while heap and (self.joins.get(heap[0][1]) or {}).get("st") != status:
                heapq.heappop(heap)  # resolved: nothing waits on it
        return bool(state.open_heap or state.held_heap)

    # ------------------------------------------------------------------ events

    def impression(self, event: Impression, p: int, state: PartitionState, out: list[Outgoing], now: float) -> None:
        sid = sample_id(event.request_id, event.item_id)
        held = self.joins.get(sid)
        if held is None and sid in state.labels:
            self.tally[("dup", "impression_resolved")] += 1  # re-sent after its entry was forgotten: one label
            return
        if held is not None:
            if held["st"] != HELD:
                return  # a retry of the same impression under a new event id, or a re-delivery: first one wins
            if state.watermark > held["ts"] + self.config.early_click_wait_s:
                # the click's wait is over in event time even if expiry has not run yet: it is late, and this
                # is an impression without a click
                self._late(_held_record(held), sid, LATE_NO_IMPRESSION, out)
                held = None
            elif held["ts"] > event.timestamp + self.config.attribution_window_s:
                self._late(_held_record(held), sid, LATE_AFTER_WINDOW, out)  # clicked, but after the window
                held = None
        sparse: Any
        dense: Any
        if event.features is not None:
            sparse, dense = event.features.sparse, event.features.dense
            self.tally[("feat", "logged")] += 1
        else:
            sparse, dense = self.features_for(event.user_id, event.item_id)
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
        if event.propensity is not None:  # (left out when unknown: every open entry is a changelog record)
            entry["pr"] = event.propensity
        if event.policy is not None:
            entry["pl"] = event.policy
        self.tally[("open", "")] += 1
        if held is not None:  # its click came first and waited for it
            out.append(self._resolve(p, sid, entry, POSITIVE, state, now))
            return
        self.joins.put(p, sid, entry)
        heapq.heappush(state.open_heap, (event.timestamp + self.config.attribution_window_s, sid))

    def click(self, event: Click, record: Record, state: PartitionState, out: list[Outgoing], now: float) -> None:
        sid = sample_id(event.request_id, event.item_id)
        entry = self.joins.get(sid)
        if entry is None and sid in state.labels:  # resolved, its entry forgotten: what its label says
            entry = {"st": POSITIVE if state.labels[sid] else NEGATIVE}
        if entry is None:
            deadline = event.timestamp + self.config.early_click_wait_s
            if state.watermark > deadline:
                self._late(record, sid, LATE_TOO_OLD_TO_WAIT, out)
            else:  # before its impression: held for it
                self.joins.put(record.partition, sid, _held_entry(record.partition, event.timestamp, record))
                heapq.heappush(state.held_heap, (deadline, sid))
        elif entry["st"] == HELD:
            self.tally[("dup", "click_on_held")] += 1  # a retry of a held click
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

    def expire(self, p: int, state: PartitionState, out: list[Outgoing], now: float) -> None:
        """Close the windows the watermark passed (negatives); forget resolved entries past their retention."""
        heap = state.open_heap
        while heap and heap[0][0] < state.watermark:
            _, sid = heapq.heappop(heap)
            entry = self.joins.get(sid)
            if entry is not None and entry["st"] == OPEN:
                out.append(self._resolve(p, sid, entry, NEGATIVE, state, now))
        held = state.held_heap
        while held and held[0][0] < state.watermark:
            _, sid = heapq.heappop(held)
            entry = self.joins.get(sid)
            if entry is not None and entry["st"] == HELD:
                self._late(_held_record(entry), sid, LATE_NO_IMPRESSION, out)
                self.joins.delete(p, sid)
        resolved = state.resolved_heap
        while resolved and resolved[0][0] < now - self.config.resolved_retention_s:
            _, sid = heapq.heappop(resolved)
            entry = self.joins.get(sid)
            if entry is not None and entry["st"] in (POSITIVE, NEGATIVE):
                if sid not in state.labels:  # (its label chunk was lost in a crash mid-changelog: kept now)
                    self._remember(p, sid, int(entry["st"] == POSITIVE), entry["ts"], state)
                self.joins.delete(p, sid)
        self._forget_labels(p, state)
        if state.labels_chunk is not None:
            self.resolved.put(p, state.labels_key, state.labels_chunk)
            state.labels_queue.append((state.labels_chunk["ts"], state.labels_key))
            state.labels_chunk = None

    def _remember(self, p: int, sid: str, label: int, ts: float, state: PartitionState) -> None:
        """Add a resolved id to the label memory and to the chunk of this batch (written by ``expire``)."""
        state.labels[sid] = label
        chunk = state.labels_chunk
        if chunk is None or len(chunk["ids"]) >= LABELS_CHUNK_IDS:
            if chunk is not None:
                self.resolved.put(p, state.labels_key, chunk)
                state.labels_queue.append((chunk["ts"], state.labels_key))
            # a fresh key each time: a chunk written again after a crash must not replace another's ids
            chunk = state.labels_chunk = {"p": p, "ts": ts, "ids": [], "lab": ""}
            state.labels_key = f"{p}:{uuid.uuid4().hex[:16]}"
        chunk["ids"].append(sid)
        chunk["lab"] += "1" if label else "0"
        if ts > chunk["ts"]:
            chunk["ts"] = ts

    def _forget_labels(self, p: int, state: PartitionState) -> None:
        """Forget the chunks whose newest impression is older than any event that can still be accepted."""
        queue = state.labels_queue
        horizon = state.watermark - self.labels_horizon_s
        while queue and queue[0][0] < horizon:
            _, key = queue.popleft()
            chunk = self.resolved.get(key)
            if chunk is None:
                continue
            for sid in chunk["ids"]:
                state.labels.pop(sid, None)
            self.resolved.delete(p, key)

    # ------------------------------------------------------------------ outputs

    def _resolve(
        self, p: int, sid: str, entry: dict[str, Any], status: str, state: PartitionState, now: float
    ) -> Outgoing:
        label = 1 if status == POSITIVE else 0
        sample = self._sample(sid, entry, label)
        # what later records need (status, times, partition): the sample itself is durable before this is
        self.joins.put(p, sid, {"st": status, "p": entry["p"], "ts": entry["ts"], "at": now})
        heapq.heappush(state.resolved_heap, (now, sid))
        self._remember(p, sid, label, entry["ts"], state)
        self.tally[("open", "")] -= 1
        return sample

    def _sample(self, sid: str, entry: Mapping[str, Any], label: int) -> Outgoing:
        """The sample of an open entry."""
        self.tally[("samples", str(label))] += 1
        self.served[(entry["mv"], entry.get("pl"), label)] += 1
        if self.tally[("samples", str(label))] % 16 == 1:  # sampled: a histogram observation costs ~10 us
            metrics.JOIN_LAG.observe(max(0.0, self.wall() - entry["ts"]))
        return Outgoing("samples", entry["u"].encode(), sample_bytes(sid, entry, label))

    def _late(self, record: Record, sid: str, reason: str, out: list[Outgoing]) -> None:
        self.tally[("late", reason)] += 1
        out.append(late_click(record, sid, reason))
