"""Publishing simulated or replayed records to Kafka at a target rate, with progress output."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core.kafka import start_producer
from traffic.simulator import SimRecord

# Acknowledgements are awaited in windows of this many sends: bounded memory, full batches.
ACK_WINDOW = 20_000


@dataclass(frozen=True)
class PublishResult:
    records: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")


async def publish(
    records: Iterable[SimRecord],
    bootstrap: str,
    topic: str,
    rate: float = 0.0,
    total: int | None = None,
    show_progress: bool = True,
) -> PublishResult:
    """Send every record (key, value) and wait for all acknowledgements.

    The Kafka record timestamp is the send time (the broker rejects record timestamps
    far from its clock, and retention runs on them); event time travels in the payload.
    ``rate`` > 0 paces sends to that many records per second of wall time; 0 sends as
    fast as the producer takes them.
    """
    producer = await start_producer(bootstrap)
    progress = Progress(
        TextColumn("publishing to {task.fields[topic]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>9.0f} rec/s"),
        TimeElapsedColumn(),
        disable=not show_progress,
        transient=False,
    )
    sent = 0
    started = time.perf_counter()
    try:
        with progress:
            task = progress.add_task("publish", total=total, topic=topic, rate=0.0)
            window = []
            for record in records:
                window.append(await producer.send(topic, value=record.value, key=record.key))
                sent += 1
                if rate > 0 and sent % 100 == 0:
                    ahead = sent / rate - (time.perf_counter() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                if len(window) >= ACK_WINDOW:
                    await asyncio.gather(*window)
                    window.clear()
                if sent % 2000 == 0:
                    elapsed = time.perf_counter() - started
                    progress.update(task, completed=sent, rate=sent / elapsed if elapsed else 0.0)
            await asyncio.gather(*window)
            elapsed = time.perf_counter() - started
            progress.update(task, completed=sent, rate=sent / elapsed if elapsed else 0.0)
    finally:
        await producer.stop()
    return PublishResult(sent, time.perf_counter() - started)


def write_jsonl(records: Iterable[SimRecord], path: Path) -> int:
    """Write records for a later ``recsys replay``: one JSON line each, raw bytes kept exactly (base64 when not UTF-8)."""
    count = 0
    with open(path, "wb") as out:
        for record in records:
            line: dict = {
                "key": record.key.decode() if record.key else None,
                "timestamp": record.timestamp,
                "kind": record.kind,
            }
            try:
                line["value"] = record.value.decode("utf-8")
            except UnicodeDecodeError:
                import base64

                line["value_b64"] = base64.b64encode(record.value).decode()
            out.write(orjson.dumps(line) + b"\n")
            count += 1
    return count


def read_jsonl(path: Path, errors: list[str]) -> Iterable[SimRecord]:
    """Records of a replay file; a malformed line is described in ``errors`` and skipped, never fatal."""
    import base64

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


def rebase(records: Iterable[SimRecord], new_start: float) -> Iterable[SimRecord]:
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
