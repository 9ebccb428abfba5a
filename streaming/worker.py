"""The stream worker: batches from the consumer through the processor, and their outputs to Kafka and Feast."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import faust
import orjson
from aiokafka.partitioner import DefaultPartitioner
from faust.types import TP

from core.settings import Settings
from streaming import metrics
from streaming.faust_overrides import aiokafka_producer, committed_offsets, wait_on_metadata
from streaming.feature_writer import FeatureWriter
from streaming.futures import acked, done
from streaming.processor import Processor
from streaming.records import Outgoing, ProcessorConfig
from streaming.tables import Changelog, TableKV

# records by (topic, partition): (key, value, headers)
ByPartition = dict[tuple[str, int], list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]]


class StreamWorker:
    """Glue between Faust and the processor: batches in (processed one after another), outputs and feature
    writes handed on; ``BatchConsumer`` acknowledges a batch once its returned future completes."""

    def __init__(self, app: faust.App, settings: Settings, tables: dict[str, Any]) -> None:
        self.app = app
        self.settings = settings
        self.changelog: Changelog = {}
        kv = {name: TableKV(table, self.changelog) for name, table in tables.items()}
        self.processor = Processor(
            ProcessorConfig.from_settings(settings),
            kv["dedup"],
            kv["joins"],
            kv["users"],
            kv["items"],
            caught_up=self.caught_up,
            home_partition=self.home_partition,
            resolved=kv["resolved"],
        )
        self.features = FeatureWriter(settings)
        self.topics = {
            "samples": settings.kafka.topic_samples,
            "deadletter": settings.kafka.topic_deadletter,
            "late": settings.kafka.topic_late,
            "events": settings.kafka.topic_events,  # events re-published under their user's key
        }
        self._events_metadata = False
        self.lock = asyncio.Lock()
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[tuple[str, bytes | None], int] = {}
        self._changelog_handed: asyncio.Future[Any] | None = None  # the last submit's changelog, once handed over
        # True from the end of table recovery (on_rebalance_complete) to the next rebalance: only then do
        # the tables hold every restored record of the assigned partitions
        self.ready = False

    def caught_up(self, partition: int, next_offset: int) -> bool:
        try:
            highwater = self.app.consumer.highwater(TP(self.settings.kafka.topic_events, partition))
        except Exception:  # not assigned (any more), consumer restarting: not known to be caught up
            return False
        return highwater is not None and next_offset >= highwater

    def home_partition(self, key: bytes) -> int | None:
        """The events partition of ``key`` under Kafka's default partitioner (None while the topic's metadata is
        not known): where the worker owning that user's tables reads."""
        partitions = aiokafka_producer(self.app).client.cluster.partitions_for_topic(self.settings.kafka.topic_events)
        if not partitions:
            return None
        ordered = sorted(partitions)
        return int(self._partitioner(key, ordered, ordered))

    async def handle_batch(self, messages: list[Any]) -> asyncio.Future[Any]:
        """Process a batch and hand its outputs to Kafka; the returned future completes once all are durable."""
        started = time.perf_counter()
        if not self._events_metadata:  # the producer's view of the events topic: where each user's key goes
            await wait_on_metadata(aiokafka_producer(self.app), self.settings.kafka.topic_events)
            self._events_metadata = True
        async with self.lock:
            metrics.RECORDS_IN.inc(len(messages))
            result = self.processor.process_batch(messages)
            # features and outputs are durable before the batch is acknowledged (at-least-once)
            durable = asyncio.gather(self.features.submit(result), await self.submit(result.out))
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        return durable

    async def tick(self) -> None:
        quiet = await self._quiet_partitions()
        async with self.lock:
            for partition, position in quiet:
                self.processor.take_quiet_partition(partition, position)
            sent = await self.submit(self.processor.advance_idle())
        await sent

    async def _quiet_partitions(self) -> list[tuple[int, int]]:
        """Assigned partitions not taken yet whose committed offset is their end: after a restart their
        impressions still wait for windows to close (and their resolved samples for re-emission).

        The committed offset, not the consumer's position: the position moves as soon as the
        consumer thread hands records over, before this worker has processed them, and a
        partition taken as quiet then would close windows from restored state that is ahead of
        the records still to be re-read (the crash test's positives-turned-negatives).
        """
        consumer = self.app.consumer
        if not self.ready or self.app.rebalancing or self.app.in_recovery:
            return []
        quiet = []
        try:
            committed_offset = committed_offsets(consumer)
            for tp in consumer.assignment():
                if tp.topic != self.settings.kafka.topic_events or tp.partition in self.processor.partitions:
                    continue
                committed = committed_offset.get(tp) or 0
                highwater = consumer.highwater(tp)
                if highwater is not None and committed >= highwater:
                    quiet.append((tp.partition, committed))
        except Exception:  # a rebalance under way: try again on the next tick
            return []
        return quiet

    async def submit(self, out: list[Outgoing]) -> asyncio.Future[Any]:
        """Hand the outputs to the producer now, and the queued changelog records once Kafka acknowledged them.

        Returns a future that completes once Kafka acknowledged both. The order is what lets a
        restored worker trust its tables: a changelog record saying an impression is resolved
        is written only after its sample is durable, so recovery never has to re-emit samples
        (or keep them in the table to do so). Changelog records of successive submits are handed
        over in submit order, so a key's older value never lands after a newer one.
        """
        changelog = list(self.changelog.items())
        self.changelog.clear()
        if not out and not changelog:
            return done()
        producer = aiokafka_producer(self.app)
        by_partition: ByPartition = {}
        counts: dict[str, int] = {}
        partitions = self._partitions
        for message in out:
            topic = self.topics[message.kind]
            counts[message.kind] = counts.get(message.kind, 0) + 1
            partition = partitions.get((topic, message.key))
            if partition is None:
                partition = await self._partition_for(producer, topic, message.key)
            by_partition.setdefault((topic, partition), []).append((message.key, message.value, list(message.headers)))
        outputs_acked = await self._send(producer, by_partition)
        for kind, count in counts.items():
            metrics.RECORDS_OUT.labels(kind).inc(count)
        handed = asyncio.ensure_future(self._send_changelog(producer, changelog, outputs_acked, self._changelog_handed))
        self._changelog_handed = handed
        return asyncio.ensure_future(acked(handed))

    async def _send_changelog(
        self,
        producer: Any,
        changelog: list[tuple[tuple[str, str], tuple[int, Any]]],
        outputs_acked: asyncio.Future[Any],
        previous: asyncio.Future[Any] | None,
    ) -> asyncio.Future[Any]:
        """Once ``outputs_acked`` and the previous submit's changelog was handed over: hand these; their acks."""
        await outputs_acked
        if previous is not None:
            await previous
        by_partition: ByPartition = {}
        dumps = orjson.dumps
        for (topic, key), (partition, value) in changelog:
            by_partition.setdefault((topic, partition), []).append(
                (dumps(key), None if value is None else dumps(value), [])
            )
        metrics.RECORDS_OUT.labels("changelog").inc(len(changelog))
        return await self._send(producer, by_partition)

    @staticmethod
    async def _send(producer: Any, by_partition: ByPartition) -> asyncio.Future[Any]:
        """Append the records to aiokafka record batches per partition (a few us a record, against ~30 us
        and a future per ``producer.send``); a future of Kafka's acknowledgement of all of them."""
        futures = []
        for (topic, partition), records in by_partition.items():
            batch = producer.create_batch()
            for key, value, headers in records:
                if batch.append(timestamp=None, key=key, value=value, headers=headers) is None:  # full
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(timestamp=None, key=key, value=value, headers=headers)
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        return asyncio.gather(*futures) if futures else done()

    async def _partition_for(self, producer: Any, topic: str, key: bytes | None) -> int:
        """The partition Kafka's default partitioner gives ``key`` (murmur2), as ``producer.send`` would."""
        cached = self._partitions.get((topic, key)) if key is not None else None
        if cached is not None:
            return cached
        partitions = producer.client.cluster.partitions_for_topic(topic)
        if not partitions:
            await wait_on_metadata(producer, topic)
            partitions = producer.client.cluster.partitions_for_topic(topic)
        available = list(producer.client.cluster.available_partitions_for_topic(topic)) or list(partitions)
        partition = self._partitioner(key, sorted(partitions), available)
        if key is not None:
            if len(self._partitions) > 500_000:
                self._partitions.clear()
            self._partitions[(topic, key)] = partition
        return partition
