"""Consumer-group lag from Kafka itself: what a group committed against each partition's end.

Read with aiokafka's public APIs only (``AIOKafkaAdminClient.list_consumer_group_offsets``,
``AIOKafkaConsumer.beginning_offsets``/``end_offsets``), so the stream's progress can be seen
without the worker's metrics port, and without joining (or disturbing) its group.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from core.aiokafka_private import refresh_metadata
from core.kafka import Brokers, KafkaUnavailable, connect_options, servers, start_client

COORDINATOR_ATTEMPTS = 40  # x 0.5 s: the broker creates __consumer_offsets (50 partitions) in a few seconds


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    committed: int | None  # None: the group never committed on this partition
    end: int
    lag: int  # records after the committed offset (after the log start when nothing is committed)


async def group_lag(bootstrap: Brokers, group: str, topic: str) -> list[PartitionLag]:
    """Committed offset, end offset and lag of ``group`` on every partition of ``topic`` (sorted by partition)."""
    consumer = AIOKafkaConsumer(**connect_options(bootstrap), enable_auto_commit=False)
    await start_client(consumer, servers(bootstrap), consumer.stop)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:  # a topic created after the client started is not in its first metadata
            await refresh_metadata(consumer)
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    admin = AIOKafkaAdminClient(**connect_options(bootstrap), request_timeout_ms=15000)
    await start_client(admin, servers(bootstrap), admin.close)
    try:
        # the coordinator lookup fails while the broker creates __consumer_offsets (the first group of a
        # fresh broker) or moves a coordinator: retriable, so retry for a while before saying so
        for attempt in range(COORDINATOR_ATTEMPTS):
            try:
                offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
                break
            except KafkaError as exc:
                if not exc.retriable or attempt == COORDINATOR_ATTEMPTS - 1:
                    raise KafkaUnavailable(
                        f"cannot read the committed offsets of group {group!r} at {servers(bootstrap)}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                await asyncio.sleep(0.5)
    finally:
        await admin.close()
    result = []
    for tp in tps:
        meta = offsets.get(tp)
        # -1: the broker answers for a partition the group has no offset for
        committed = meta.offset if meta is not None and meta.offset >= 0 else None
        start = committed if committed is not None else begins[tp]
        result.append(PartitionLag(tp.partition, committed, ends[tp], max(0, ends[tp] - max(start, begins[tp]))))
    return result
