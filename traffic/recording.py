"""Recordings of traffic: JSONL files for a later ``recsys replay``, and rebasing their event times.

``recsys replay`` reads two formats, told apart by the file's first non-empty line:

* a recording (``simulate --out``): ``{"key", "timestamp", "kind", "value" | "value_b64"}`` per line, the
  record's bytes kept exactly (malformed records of a bad-fraction run included);
* plain events, as a client logs them: one event object per line (``{"event_type": ..., "timestamp": ...}``),
  keyed like the client keys them (``feature_repo.contract.event_key``).

Publishing them is ``core.kafka.publish`` (records are ``SimRecord``s: key, value, timestamp).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

from feature_repo.contract import event_key
from traffic.simulator import SimRecord


def write_jsonl(records: Iterable[SimRecord], path: Path) -> int:
    """Write records for a later ``recsys replay``: one JSON line each, raw bytes kept exactly.

    A value that is not UTF-8 (a malformed record of a bad-fraction run) is stored base64-encoded.
    """
    count = 0
    with open(path, "wb") as out:
        for record in records:
            line: dict[str, object] = {
                "key": record.key.decode() if record.key else None,
                "timestamp": record.timestamp,
                "kind": record.kind,
            }
            try:
                line["value"] = record.value.decode("utf-8")
            except UnicodeDecodeError:
                line["value_b64"] = base64.b64encode(record.value).decode()
            out.write(orjson.dumps(line) + b"\n")
            count += 1
    return count


def read_jsonl(path: Path, errors: list[str]) -> Iterator[SimRecord]:
    """Records of a replay file; a malformed line is described in ``errors`` and skipped, never fatal."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = orjson.loads(line)
                value = (
                    data["value"].encode("utf-8")
                    if "value" in data
                    else base64.b64decode(data["value_b64"], validate=True)
                )
                key = data["key"].encode() if data.get("key") else None
                yield SimRecord(key, value, float(data["timestamp"]), str(data.get("kind", "replay")))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                errors.append(f"{path}:{number}: not a replay record ({type(exc).__name__}: {exc})")


def is_recording(path: Path) -> bool:
    """Whether ``path`` is in the recording format (else: plain event lines), by its first non-empty line."""
    with open(path, "rb") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                data = orjson.loads(line)
            except orjson.JSONDecodeError:
                return False
            # an event has an event_type; a recording line wraps the bytes in value/value_b64
            return isinstance(data, dict) and "event_type" not in data and ("value" in data or "value_b64" in data)
    return False


def read_events_jsonl(path: Path, errors: list[str]) -> Iterator[SimRecord]:
    """Plain event lines as records; a line that is no event object with a numeric timestamp is reported in
    ``errors`` and skipped (the worker would dead-letter it anyway, and it has no time to rebase)."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = orjson.loads(line)
                if not isinstance(data, dict):
                    raise TypeError(f"expected a JSON object, got {type(data).__name__}")
                timestamp = data.get("timestamp")
                if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
                    raise TypeError("no numeric 'timestamp' field")
                yield SimRecord(event_key(data), line.strip(), float(timestamp), str(data.get("event_type")))
            except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
                errors.append(f"{path}:{number}: not an event line ({type(exc).__name__}: {exc})")


def read_any(path: Path, errors: list[str]) -> Iterator[SimRecord]:
    """The records of a replay file in either format (``is_recording`` tells which)."""
    return read_jsonl(path, errors) if is_recording(path) else read_events_jsonl(path, errors)


def shift_times(records: Iterable[SimRecord], shift: float) -> Iterator[SimRecord]:
    """Move event times by ``shift`` seconds, keeping the gaps.

    Valid JSON objects get their ``timestamp`` field moved too; anything else (the
    malformed records of a bad-fraction run) is sent exactly as it was.
    """
    for record in records:
        value = record.value
        try:
            data = orjson.loads(value)
            if isinstance(data, dict) and isinstance(data.get("timestamp"), (int, float)):
                data["timestamp"] = round(data["timestamp"] + shift, 6)
                value = orjson.dumps(data)
        except orjson.JSONDecodeError:
            pass
        yield SimRecord(record.key, value, record.timestamp + shift, record.kind)


def rebase(records: Iterable[SimRecord], new_start: float) -> Iterator[SimRecord]:
    """Shift event times so the first record happens at ``new_start``, keeping the gaps."""
    iterator = iter(records)
    first = next(iterator, None)
    if first is None:
        return
    shift = new_start - first.timestamp
    yield from shift_times([first], shift)
    yield from shift_times(iterator, shift)


def time_span(records: Iterable[SimRecord]) -> tuple[float, float] | None:
    """(earliest, latest) event time of the records; None when there are none."""
    low = high = None
    for record in records:
        low = record.timestamp if low is None else min(low, record.timestamp)
        high = record.timestamp if high is None else max(high, record.timestamp)
    return None if low is None or high is None else (low, high)
