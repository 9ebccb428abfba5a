"""`recsys events summary`: count what any of the project's topics holds, whatever is in it.

Each topic has its own vocabulary, so each kind has its own classifier:

* ``events``     event type, or ``invalid:<reject reason>`` for what the worker would dead-letter
* ``deadletter`` the ``reason`` header the worker wrote
* ``samples``    ``label=0`` / ``label=1``, or ``unparsable:<what failed>``
* ``late``       the ``reason`` header (after_negative, after_window, no_impression, too_old_to_wait)
* ``auto``       (a topic of another name) each record by what it is: a dead letter or a late click by
  its headers (``deadletter reason:...``, ``late reason:...``), a sample by its fields (``sample label=1``),
  anything else as an event

A classifier never raises: a record it cannot read is a count of its own, so one bad record
never hides the counts of the others.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from enum import StrEnum

import orjson
from pydantic import ValidationError

from core.kafka import TopicRecord, end_offsets, read_topic
from core.settings import Settings
from feature_repo.contract import InvalidEvent, Sample, parse_event


class TopicKind(StrEnum):
    events = "events"
    deadletter = "deadletter"
    samples = "samples"
    late = "late"
    auto = "auto"


def kind_of(topic: str, s: Settings) -> TopicKind | None:
    """The kind of a topic, recognised by the settings' topic names; None for any other topic (read it as auto)."""
    names = {
        s.kafka.topic_events: TopicKind.events,
        s.kafka.topic_deadletter: TopicKind.deadletter,
        s.kafka.topic_samples: TopicKind.samples,
        s.kafka.topic_late: TopicKind.late,
    }
    return names.get(topic)


def _header(record: TopicRecord, name: str) -> str | None:
    for key, value in record.headers:
        if key == name:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


def _event_classifier(s: Settings) -> Callable[[TopicRecord], str]:
    def classify(record: TopicRecord) -> str:
        try:
            event = parse_event(
                record.value or b"",
                max_bytes=s.events.max_event_bytes,
                max_future_skew_s=s.events.max_future_skew_s,
                max_age_s=s.events.max_event_age_s,
                # judged at the time the record entered Kafka, as the worker saw it: an old topic's events
                # are not "stale" just because the summary runs a month later
                now=record.timestamp_ms / 1000 if record.timestamp_ms > 0 else None,
            )
        except InvalidEvent as exc:
            return f"invalid:{exc.reason.value}"
        return event.event_type

    return classify


def _by_reason(record: TopicRecord) -> str:
    reason = _header(record, "reason")
    return f"reason:{reason}" if reason is not None else "no reason header"


def _sample(record: TopicRecord) -> str:
    try:
        return f"label={Sample.from_json(record.value or b'').label}"
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {"type": "invalid"}
        return f"unparsable:{first['type']}"
    except ValueError as exc:  # pragma: no cover - pydantic raises ValidationError; kept so nothing escapes
        return f"unparsable:{type(exc).__name__}"


def _looks_like_sample(value: bytes | None) -> bool:
    try:
        data = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and "sample_id" in data and "label" in data and "event_type" not in data


def _recognising_classifier(s: Settings) -> Callable[[TopicRecord], str]:
    """Each record by what it is: the headers the worker writes tell dead letters and late clicks apart."""
    event = _event_classifier(s)

    def classify(record: TopicRecord) -> str:
        names = {key for key, _ in record.headers}
        if "reason" in names and "message" in names:  # streaming.records.dead_letter
            return f"deadletter {_by_reason(record)}"
        if "reason" in names and "sample_id" in names:  # streaming.records.late_click
            return f"late {_by_reason(record)}"
        if _looks_like_sample(record.value):
            return f"sample {_sample(record)}"
        return event(record)

    return classify


def classifier(kind: TopicKind, s: Settings) -> Callable[[TopicRecord], str]:
    if kind is TopicKind.events:
        return _event_classifier(s)
    if kind is TopicKind.samples:
        return _sample
    if kind is TopicKind.auto:
        return _recognising_classifier(s)
    return _by_reason


class TopicMissing(LookupError):
    """The broker knows no partition of the topic: zero counts would pretend it is empty."""


async def summarize(s: Settings, topic: str, kind: TopicKind) -> Counter[str]:
    """Counts of the records of ``topic`` from its beginning to its end now, by the classes of ``kind``."""
    ends = await end_offsets(s.kafka, topic)
    if not ends:
        raise TopicMissing(f"topic {topic!r} does not exist at {s.kafka.bootstrap} (`recsys topics` creates ours)")
    classify = classifier(kind, s)
    counts: Counter[str] = Counter()
    async for record in read_topic(s.kafka, topic, stop=ends):
        try:
            label = classify(record)
        except Exception as exc:  # noqa: BLE001 - a reader's bug on one record must not hide the others' counts
            label = f"unreadable:{type(exc).__name__}"
        counts[label] += 1
    return counts
