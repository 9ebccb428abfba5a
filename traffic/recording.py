"""Recordings of traffic: JSONL files for a later ``recsys replay``, and rebasing their event times.

Publishing them is ``core.kafka.publish`` (records are ``SimRecord``s: key, value, timestamp).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

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


def rebase(records: Iterable[SimRecord], new_start: float) -> Iterator[SimRecord]:
    """Shift event times so the first record happens at ``new_start``, keeping the gaps.

    Valid JSON objects get their ``timestamp`` field moved too; anything else (the
    malformed records of a bad-fraction run) is sent exactly as it was.
    """
    shift: float | None = None
    for record in records:
        if shift is None:
            shift = new_start - record.timestamp
        value = record.value
        try:
            data = orjson.loads(value)
            if isinstance(data, dict) and isinstance(data.get("timestamp"), (int, float)):
                data["timestamp"] = round(data["timestamp"] + shift, 6)
                value = orjson.dumps(data)
        except orjson.JSONDecodeError:
            pass
        yield SimRecord(record.key, value, record.timestamp + shift, record.kind)
