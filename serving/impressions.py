"""Impression logging: every served list goes back to ``recsys.events``, never delaying the answer.

A response only puts its impressions into a bounded in-memory buffer; a background task
drains the buffer into an aiokafka producer. When Kafka is slow or down the buffer fills,
and impressions beyond ``serving_impression_buffer`` are dropped and counted (the response
is worth more than its log line). A producer that cannot connect is retried in the
background; buffered impressions wait for it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any

from core.kafka import Brokers, connect_options, servers
from feature_repo.contract import Impression

log = logging.getLogger(__name__)


class ImpressionLogger:
    def __init__(
        self,
        bootstrap: Brokers,
        topic: str,
        capacity: int,
        on_sent: Callable[[int], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
        retry_s: float = 2.0,
    ) -> None:
        self.bootstrap, self.topic, self.capacity = bootstrap, topic, capacity
        self._buffer: collections.deque[tuple[bytes, bytes]] = collections.deque()  # (key, value)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.on_sent, self.on_dropped = on_sent, on_dropped
        self.retry_s = retry_s
        self.sent = 0
        self.dropped = 0
        self.connected = False

    def log(self, impressions: list[Impression]) -> int:
        """Buffer ``impressions`` (call from the event loop); returns how many were dropped."""
        records = []
        for event in impressions:
            try:  # serialised here, so one unencodable event cannot jam the sender
                records.append((event.kafka_key(), event.to_json()))
            except (UnicodeEncodeError, TypeError, ValueError) as exc:
                log.error("impression %s cannot be serialised: %s", event.event_id, exc)
        return self.log_records(records) + len(impressions) - len(records)

    def log_records(self, records: list[tuple[bytes, bytes]]) -> int:
        """Buffer already serialised (key, value) records; returns how many were dropped."""
        room = self.capacity - len(self._buffer)
        keep = records[: max(0, room)]
        self._buffer.extend(keep)
        dropped = len(records) - len(keep)
        if dropped:
            self.dropped += dropped
            if self.on_dropped is not None:
                self.on_dropped(dropped)
        if keep:
            self._wake.set()
        return dropped

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="impression-logger")

    async def close(self, drain_timeout_s: float = 5.0) -> None:
        """Stop; waits up to ``drain_timeout_s`` for buffered impressions to reach Kafka."""
        if self._task is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout_s
        while self._buffer and self.connected and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self._stop.set()
        self._wake.set()
        try:
            await asyncio.wait_for(self._task, timeout=max(0.1, deadline - loop.time()) + 2.0)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()

    async def _send(self, producer: Any, batch: list[tuple[bytes, bytes]]) -> list[asyncio.Future]:
        """Hand ``batch`` to the producer as one record batch per partition; the futures of their acks.

        ``producer.send`` per record costs ~30 us of event-loop time (its own future, partition
        lookup and accumulator step); filling batches directly costs a fraction. Partitions are
        chosen as ``send`` chooses them (the default murmur2 partitioner over the topic's
        partitions), so a user's impressions stay on the partition of that user's clicks.
        """
        from aiokafka.partitioner import DefaultPartitioner

        partitioner = DefaultPartitioner()
        partitions = sorted(await producer.partitions_for(self.topic))
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, value in batch:
            by_partition.setdefault(partitioner(key, partitions, partitions), []).append((key, value))
        futures = []
        for partition, records in by_partition.items():
            builder = producer.create_batch()
            for key, value in records:
                if builder.append(key=key, value=value, timestamp=None) is None:  # full: send it, start another
                    futures.append(await producer.send_batch(builder, self.topic, partition=partition))
                    builder = producer.create_batch()
                    if builder.append(key=key, value=value, timestamp=None) is None:
                        raise ValueError(f"an impression of {len(value)} bytes exceeds the producer's batch size")
            futures.append(await producer.send_batch(builder, self.topic, partition=partition))
        return futures

    async def _run(self) -> None:
        from aiokafka import AIOKafkaProducer

        while not self._stop.is_set():
            producer = AIOKafkaProducer(
                **connect_options(self.bootstrap), linger_ms=5, request_timeout_ms=10000, max_batch_size=256 * 1024
            )
            try:
                await producer.start()
                self.connected = True
                while not self._stop.is_set() or self._buffer:
                    if not self._buffer:
                        self._wake.clear()
                        await self._wake.wait()
                        continue
                    batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), 500))]
                    try:
                        await asyncio.gather(*await self._send(producer, batch))
                    except Exception:
                        # back to the front of the buffer; beyond capacity the newest are dropped, as in log()
                        self._buffer.extendleft(reversed(batch))
                        overflow = len(self._buffer) - self.capacity
                        for _ in range(max(0, overflow)):
                            self._buffer.pop()
                        if overflow > 0:
                            self.dropped += overflow
                            if self.on_dropped is not None:
                                self.on_dropped(overflow)
                        raise
                    self.sent += len(batch)
                    if self.on_sent is not None:
                        self.on_sent(len(batch))
                    if self._stop.is_set() and not self._buffer:
                        break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any broker failure: reconnect, keep buffering
                log.warning(
                    "impression producer (%s): %s; retrying in %.0fs", servers(self.bootstrap), exc, self.retry_s
                )
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=self.retry_s)
                except TimeoutError:
                    pass
            finally:
                self.connected = False
                try:
                    await producer.stop()
                except Exception:  # noqa: BLE001 - a producer that never started
                    pass
