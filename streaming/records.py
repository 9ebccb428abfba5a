"""The processor's vocabulary, free of Faust: its config, the KV protocol its state lives in, the records it
reads and emits, and what it keeps per partition in memory.

The app backs the KVs with Faust tables (``streaming.tables.TableKV``); unit tests back them with ``DictKV``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from core.settings import Settings
    from feature_repo.spec import EncodedEntity

# reasons of the dead-letter topic beyond the contract's own (RejectReason)
INTERNAL_ERROR = "internal_error"
MISSING_KEY = "missing_value"
# reasons of the late-click topic
LATE_AFTER_NEGATIVE = "after_negative"
LATE_AFTER_WINDOW = "after_window"
LATE_NO_IMPRESSION = "no_impression"  # held for the early-click wait; no impression came
LATE_TOO_OLD_TO_WAIT = "too_old_to_wait"  # no impression known, and the click's wait was over when it came
LATE_MESSAGES = {
    LATE_AFTER_NEGATIVE: "its impression's window had closed: the sample was emitted with label 0",
    LATE_AFTER_WINDOW: "the click came after its impression's attribution window: the sample has label 0",
    LATE_NO_IMPRESSION: "held for RECSYS_STREAM_EARLY_CLICK_WAIT_S of event time, its impression never came",
    LATE_TOO_OLD_TO_WAIT: "no impression known, and the partition's event time was already past the click's "
    "early-click wait when it came: its impression never came (resolved ones are remembered as long as "
    "events are accepted, RECSYS_MAX_EVENT_AGE_S)",
}
# the header of an event the worker re-published under its owner's key (value: "partition:offset" of the original)
REKEYED_FROM = "rekeyed_from"


@dataclass(frozen=True)
class ProcessorConfig:
    """What the processor reads of the settings; no defaults here: they live in ``core.settings`` only."""

    attribution_window_s: float
    early_click_wait_s: float
    dedup_window_s: float
    resolved_retention_s: float
    idle_advance_s: float
    max_event_bytes: int
    max_future_skew_s: float
    max_event_age_s: float
    source_topic: str
    served_metrics_max_versions: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ProcessorConfig:
        return cls(
            attribution_window_s=settings.stream.attribution_window_s,
            early_click_wait_s=settings.stream.early_click_wait_s,
            dedup_window_s=settings.stream.dedup_window_s,
            resolved_retention_s=settings.stream.resolved_retention_s,
            idle_advance_s=settings.stream.idle_advance_s,
            max_event_bytes=settings.events.max_event_bytes,
            max_future_skew_s=settings.events.max_future_skew_s,
            max_event_age_s=settings.events.max_event_age_s,
            source_topic=settings.kafka.topic_events,
            served_metrics_max_versions=settings.stream.served_metrics_max_versions,
        )


class KV(Protocol):
    """A key-value store whose writes name the source partition they belong to (a changelog partition)."""

    def get(self, key: str, /) -> Any: ...

    def put(self, partition: int, key: str, value: Any) -> None: ...

    def delete(self, partition: int, key: str) -> None: ...

    def items(self) -> Iterable[tuple[str, Any]]: ...

    def __len__(self) -> int: ...


class DictKV(dict[str, Any]):
    """In-memory KV for unit tests and the benchmark's passthrough."""

    def put(self, partition: int, key: str, value: Any) -> None:
        self[key] = value

    def delete(self, partition: int, key: str) -> None:
        self.pop(key, None)


class Record(Protocol):
    """What the processor reads of a Kafka record (aiokafka's ``ConsumerRecord`` is one, as is ``RawRecord``)."""

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


@dataclass(frozen=True)
class RawRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None
    headers: Sequence[tuple[str, bytes]] = ()


class Outgoing(NamedTuple):
    """A record for Kafka: ``kind`` is samples, deadletter or late (a tuple: ~3x cheaper to build than a dataclass)."""

    kind: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class BatchResult:
    out: list[Outgoing] = field(default_factory=list)
    # latest encoded profile per id in this batch, with its event time: for the feature store
    users: dict[str, tuple[EncodedEntity, float]] = field(default_factory=dict)
    items: dict[str, tuple[EncodedEntity, float]] = field(default_factory=dict)


@dataclass
class PartitionState:
    """The in-memory indexes of one source partition, rebuilt from its tables when the partition is taken."""

    watermark: float = -math.inf  # max event time seen in this process (rebuilt, never restored)
    anchor_wall: float = 0.0  # wall time the watermark last moved
    last_arrival_wall: float = 0.0
    next_offset: int = -1  # offset after the last record handled
    open_heap: list[tuple[float, str]] = field(default_factory=list)  # (deadline, sample id)
    resolved_heap: list[tuple[float, str]] = field(default_factory=list)  # (resolved wall time, sample id)
    held_heap: list[tuple[float, str]] = field(default_factory=list)  # (end of its wait, sample id): early clicks
    dedup_queue: deque[tuple[float, str]] = field(default_factory=deque)  # (newest event time, chunk key)
    chunk: dict[str, Any] | None = None  # the event ids first seen in the current batch, not yet in the table
    chunk_key: str = ""
    # resolved sample id -> its label, for as long as events are accepted (``streaming.joiner``'s label memory)
    labels: dict[str, int] = field(default_factory=dict)
    labels_queue: deque[tuple[float, str]] = field(default_factory=deque)  # (newest impression time, chunk key)
    labels_chunk: dict[str, Any] | None = None  # the ids resolved in the current batch, not yet in the table
    labels_key: str = ""


def _original_headers(record: Record) -> tuple[tuple[str, bytes], ...]:
    # the client's own headers (trace ids, schema hints, ...) come first; ours after them, so a reader
    # taking the last value of a name gets ours even if the client used the same name
    return tuple((name, value or b"") for name, value in record.headers or ())  # (Kafka allows null values)


def dead_letter(record: Record, reason: str, message: str, source_topic: str) -> Outgoing:
    """The record for the dead-letter topic: the original bytes and headers, untouched, and why in more headers."""
    return Outgoing(
        "deadletter",
        record.key,
        record.value or b"",
        _original_headers(record)
        + (
            ("reason", reason.encode()),
            ("message", message[:1000].encode("utf-8", "replace")),
            ("source_topic", source_topic.encode()),
            ("source_partition", str(record.partition).encode()),
            ("source_offset", str(record.offset).encode()),
        ),
    )


def rekeyed(record: Record, key: bytes) -> Outgoing:
    """The event again, for the events topic under its owner's key: the original bytes and headers, and where it was.

    ``kind`` "events": the worker sends it to the partition Kafka's default partitioner gives ``key``.
    """
    original_key = () if record.key is None else (("original_key", record.key),)
    return Outgoing(
        "events",
        key,
        record.value or b"",
        _original_headers(record) + original_key + ((REKEYED_FROM, f"{record.partition}:{record.offset}".encode()),),
    )


def is_rekeyed(record: Record) -> bool:
    """Was this record re-published by a worker? (It is then processed where it is, never forwarded again.)"""
    return any(name == REKEYED_FROM for name, _ in record.headers or ())


def late_click(record: Record, sid: str, reason: str) -> Outgoing:
    """The record for the late-click topic: the click's bytes and headers, and the sample it came too late for."""
    return Outgoing(
        "late",
        record.key,
        record.value or b"",
        _original_headers(record)
        + (
            ("reason", reason.encode()),
            ("message", LATE_MESSAGES[reason].encode()),
            ("sample_id", sid.encode()),
            ("source_partition", str(record.partition).encode()),
            ("source_offset", str(record.offset).encode()),
        ),
    )


def headers_dict(headers: Iterable[tuple[str, bytes]] | None) -> dict[str, str]:
    """Headers by name; of a name given twice, the last value (the worker's, after the client's own)."""
    return {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)) for k, v in (headers or ())}
