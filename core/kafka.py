"""Kafka plumbing shared by every room: topic creation, producers, bounded reads, and ``publish``.

Leaf module (imports nothing of ours), so streaming, training, serving and traffic can all
use it. ``publish`` is the one loop that sends a stream of records: the simulator, replays,
the demo, benchmarks and the synthetic-sample producer all go through it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from core.aiokafka_private import refresh_metadata
from core.settings import KafkaSettings

# where the brokers are: a bootstrap string (plaintext), or the settings, which add their security options
Brokers = str | KafkaSettings

log = logging.getLogger("core.kafka")


def servers(brokers: Brokers) -> str:
    """The bootstrap servers of ``brokers``."""
    return brokers if isinstance(brokers, str) else brokers.bootstrap


def connect_options(brokers: Brokers) -> dict[str, Any]:
    """Keyword arguments of any aiokafka client: the bootstrap servers, and SASL/TLS options from the settings."""
    if isinstance(brokers, str):
        return {"bootstrap_servers": brokers}
    return {"bootstrap_servers": brokers.bootstrap, **brokers.client_options()}


class KafkaUnavailable(RuntimeError):
    """The broker could not be reached; the message says how to fix it."""


def unreachable(bootstrap: str, exc: BaseException) -> KafkaUnavailable:
    return KafkaUnavailable(
        f"Kafka at {bootstrap} is unreachable ({type(exc).__name__}: {exc}). "
        "Start the local broker with `recsys services up` or point RECSYS_KAFKA_BOOTSTRAP at a running one."
    )


async def start_client(client: Any, bootstrap: str, close: Callable[[], Awaitable[Any]]) -> None:
    """Start an aiokafka client, turning connection failures into KafkaUnavailable."""
    try:
        await client.start()
    except (KafkaConnectionError, KafkaError, OSError) as exc:
        await close()
        raise unreachable(bootstrap, exc) from exc


async def ensure_topics(
    bootstrap: Brokers,
    topics: dict[str, int],
    replication: int = 1,
    configs: dict[str, dict[str, str]] | None = None,
    wait_s: float = 30.0,
    reconfigure: bool = False,
) -> list[str]:
    """Create the topics that do not exist yet (name -> partitions, optional per-topic configs);
    return the names created once the broker lists every wanted topic (at most ``wait_s``).

    ``reconfigure``: existing topics get their ``configs`` too (Kafka's AlterConfigs: the topic's other
    dynamic configs return to the broker's defaults), so a changed setting reaches topics made before it."""
    admin = AIOKafkaAdminClient(**connect_options(bootstrap), request_timeout_ms=15000)
    await start_client(admin, servers(bootstrap), admin.close)
    try:
        existing = set(await admin.list_topics())
        if reconfigure and configs:
            await _alter_configs(
                admin, {name: configs[name] for name in topics if name in existing and name in configs}
            )
        wanted = [
            NewTopic(name, partitions, replication, topic_configs=(configs or {}).get(name, {}))
            for name, partitions in topics.items()
            if name not in existing
        ]
        if not wanted:
            return []
        try:
            await admin.create_topics(wanted)
        except TopicAlreadyExistsError:
            pass  # a concurrent creator won; the topic is there, which is all we need
        # a client that subscribes right after creation may otherwise not find the topic in its metadata
        deadline = asyncio.get_running_loop().time() + wait_s
        while not set(topics) <= set(await admin.list_topics()):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        return [topic.name for topic in wanted]
    finally:
        await admin.close()


async def _alter_configs(admin: AIOKafkaAdminClient, configs: dict[str, dict[str, str]]) -> None:
    if not configs:
        return
    resources = [
        ConfigResource(ConfigResourceType.TOPIC, name, topic_configs) for name, topic_configs in configs.items()
    ]
    for response in await admin.alter_configs(resources):
        for error_code, error_message, _type, name in response.resources:
            if error_code:
                # the topic keeps working with its old configs: worth a warning, not a refusal to start
                log.warning("could not set the configs of topic %s: %s (error %s)", name, error_message, error_code)


async def start_producer(bootstrap: Brokers, **options) -> AIOKafkaProducer:
    """A started producer tuned for throughput (batching with a short linger)."""
    config = {"linger_ms": 5, "max_batch_size": 256 * 1024, "request_timeout_ms": 30000, **options}
    producer = AIOKafkaProducer(**connect_options(bootstrap), **config)
    await start_client(producer, servers(bootstrap), producer.stop)
    return producer


@dataclass(frozen=True)
class TopicRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()  # the dead-letter and late topics say why in a "reason" header


async def end_offsets(bootstrap: Brokers, topic: str) -> dict[int, int]:
    """Current end offset of each partition of ``topic``."""
    consumer = AIOKafkaConsumer(**connect_options(bootstrap), enable_auto_commit=False)
    await start_client(consumer, servers(bootstrap), consumer.stop)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await refresh_metadata(consumer)
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        ends = await consumer.end_offsets(tps) if tps else {}
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def commit_group_offsets(bootstrap: Brokers, group: str, topic: str, offsets: Mapping[int, int]) -> None:
    """Commit ``{partition: next offset}`` of ``topic`` for consumer ``group`` (no member joins it): where
    the group's next member starts reading."""
    consumer = AIOKafkaConsumer(**connect_options(bootstrap), group_id=group, enable_auto_commit=False)
    await start_client(consumer, servers(bootstrap), consumer.stop)
    try:
        tps = {TopicPartition(topic, int(p)): int(o) for p, o in offsets.items()}
        consumer.assign(list(tps))
        await consumer.commit(tps)
    finally:
        await consumer.stop()


async def read_topic(
    bootstrap: Brokers,
    topic: str,
    start: dict[int, int] | None = None,
    stop: dict[int, int] | None = None,
    batch_timeout_ms: int = 500,
) -> AsyncIterator[TopicRecord]:
    """Read ``topic`` from ``start`` (default: the beginning) up to ``stop`` (default: the end offsets now).

    A bounded read: it ends once every partition reached its stop offset, so callers
    (training windows, the read-back of the demo, tests) never wait on an idle topic.
    """
    stop = stop if stop is not None else await end_offsets(bootstrap, topic)
    start = start or {}
    remaining = {p: end for p, end in stop.items() if end > start.get(p, 0)}
    if not remaining:
        return
    consumer = AIOKafkaConsumer(
        **connect_options(bootstrap),
        enable_auto_commit=False,
        max_poll_records=5000,
        fetch_max_bytes=16 * 1024 * 1024,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await start_client(consumer, servers(bootstrap), consumer.stop)
    try:
        tps = {p: TopicPartition(topic, p) for p in remaining}
        consumer.assign(list(tps.values()))
        for p, tp in tps.items():
            consumer.seek(tp, start.get(p, 0))
        while remaining:
            batches = await consumer.getmany(*[tps[p] for p in remaining], timeout_ms=batch_timeout_ms)
            for tp, records in batches.items():
                end = remaining.get(tp.partition)
                if end is None:
                    continue
                for record in records:
                    if record.offset >= end:
                        break
                    yield TopicRecord(
                        tp.partition, record.offset, record.key, record.value, record.timestamp, tuple(record.headers)
                    )
            # positions, not the last record's offset: transaction markers occupy offsets too
            for p in list(remaining):
                if await consumer.position(tps[p]) >= remaining[p]:
                    remaining.pop(p)
    finally:
        await consumer.stop()


# Acknowledgements are awaited in windows of this many sends: bounded memory, full batches.
ACK_WINDOW = 20_000


class KeyedRecord(Protocol):
    """A record as traffic/ makes them (``SimRecord``): key and value, and for paced sends a timestamp."""

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes: ...


# (key, value), (key, value, send-at time) or an object with .key/.value (and .timestamp to pace on)
PublishRecord = tuple[bytes | None, bytes] | tuple[bytes | None, bytes, float] | KeyedRecord


@dataclass(frozen=True)
class PublishResult:
    records: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")


def _parts(record: PublishRecord) -> tuple[bytes | None, bytes, float | None]:
    if isinstance(record, tuple):
        return (record[0], record[1], record[2] if len(record) == 3 else None)
    return record.key, record.value, getattr(record, "timestamp", None)


async def _each(records: Iterable[PublishRecord] | AsyncIterable[PublishRecord]) -> AsyncIterator[PublishRecord]:
    if isinstance(records, AsyncIterable):
        async for record in records:
            yield record
    else:
        for record in records:
            yield record


async def publish(
    records: Iterable[PublishRecord] | AsyncIterable[PublishRecord],
    bootstrap: Brokers,
    topic: str,
    rate: float = 0.0,
    total: int | None = None,
    show_progress: bool = False,
    *,
    paced: bool = False,
    clock: Callable[[], float] = time.time,
    label: str = "publishing to",
    ack_window: int = ACK_WINDOW,
) -> PublishResult:
    """Send every record and wait for all acknowledgements; the count sent and the seconds it took.

    ``rate`` > 0 paces sends to that many records per second of wall time; 0 sends as fast
    as the producer takes them. ``paced`` sends each record no earlier than its timestamp on
    ``clock`` (a replay at its event times). The Kafka record timestamp is the send time (the
    broker rejects record timestamps far from its clock, and retention runs on them); event
    time travels in the payload. ``total`` (when known) sizes the progress bar. ``records`` may
    be an async iterable: a live source (the closed-loop simulator's clicks, due one by one) is
    sent as it yields.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    producer = await start_producer(bootstrap)
    progress = Progress(
        TextColumn(f"{label} {{task.fields[topic]}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>9.0f} rec/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not show_progress,
        transient=False,
    )
    sent = 0
    started = time.perf_counter()
    try:
        with progress:
            task = progress.add_task("publish", total=total, topic=topic, rate=0.0)
            window = []
            async for record in _each(records):
                key, value, at = _parts(record)
                if paced and at is not None:
                    ahead = at - clock()
                    if ahead > 0.005:
                        await asyncio.sleep(ahead)
                window.append(await producer.send(topic, value=value, key=key))
                sent += 1
                if rate > 0 and sent % 100 == 0:
                    ahead = sent / rate - (time.perf_counter() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                if len(window) >= ack_window:
                    await asyncio.gather(*window)
                    window.clear()
                if sent % 1000 == 0:
                    elapsed = time.perf_counter() - started
                    progress.update(task, completed=sent, rate=sent / elapsed if elapsed else 0.0)
            await asyncio.gather(*window)
            elapsed = time.perf_counter() - started
            progress.update(task, completed=sent, rate=sent / elapsed if elapsed else 0.0)
    finally:
        await producer.stop()
    return PublishResult(sent, time.perf_counter() - started)


async def produce_all(bootstrap: Brokers, topic: str, records: Iterable[tuple[bytes | None, bytes]]) -> int:
    """``publish`` without progress, returning only the count (the short form the tests use)."""
    return (await publish(records, bootstrap, topic)).records
