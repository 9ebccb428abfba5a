"""Where the worker reaches into Faust and aiokafka: every override and use of their private API, in one file.

Written against faust-streaming 0.15.3 and aiokafka 0.14.0 (``PINNED``; pyproject pins both exactly).
``tests/streaming/test_faust_overrides.py`` fails when the installed versions differ from these, or when a
private method overridden or called here is gone or has another signature: read this file against
the new version's source before moving a pin.

* ``BatchConsumer``: Faust's aiokafka consumer with its fetch loop replaced. It hands every record
  a fetch returned for the events topic to the worker at once and acknowledges them after the
  worker's future completes. Faust's own loop awaits four futures per record (``wait_first``) and a
  stream hop per event, which held a worker that did nothing near 3k events/s on this machine.
  Everything else stays Faust's: the consumer group and rebalances, table changelog recovery
  (changelog records still take the per-record path), and offset commits from acknowledged offsets.
* ``ConsumerThread``: a shorter fetch long-poll than Faust's fixed 1.5 s.
* ``StreamApp``: creates the tables' changelog topics before its consumer and tables start.
* accessors of Faust's and aiokafka's private state that the worker reads (committed offsets, the
  started aiokafka producer, topic metadata, a memory table's dict).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

from core.kafka import Brokers, ensure_topics

PINNED = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0"}

# async (the aiokafka records of one fetch) -> a future that completes once the batch is durable
BatchHandler = Callable[[list[Any]], Awaitable["asyncio.Future[Any]"]]


class StreamApp(faust.App):
    """Faust's App that creates its tables' changelog topics before its consumer and tables start.

    When Faust created them itself on a fresh broker, its consumer sometimes did not find the
    new ``items`` changelog in its metadata, ignored it, and the GlobalTable's recovery never
    finished: the worker never read a record. Created here (compacted, as Faust makes them, and
    listed by the broker before going on; existing ones get the configs of today's settings), both
    ``recsys stream worker`` and ``faust -A streaming.app worker`` get them.
    """

    kafka_brokers: Brokers = ""  # the settings' KafkaSettings, so the changelogs are created with SASL too
    # topic configs of every changelog (``streaming.tables.changelog_configs``): set on existing ones too
    changelog_configs: Mapping[str, str] = {"cleanup.policy": "compact"}

    async def on_first_start(self) -> None:
        await super().on_first_start()
        changelogs = {table.changelog_topic.get_topic_name(): table.partitions for table in self.tables.values()}
        await ensure_topics(
            self.kafka_brokers,
            changelogs,
            configs={name: dict(self.changelog_configs) for name in changelogs},
            reconfigure=True,
        )


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread with a shorter fetch long-poll (Faust fixes it at 1.5 s).

    aiokafka keeps one fetch in flight per broker: while it long-polls for a partition with
    nothing new, the partitions that do have records wait for it. Seen at the end of a
    pre-loaded topic as 1.4 s of idle worker, and possible whenever one partition is quiet.
    """

    fetch_max_wait_ms: int = 100

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms  # read by AIOKafkaConsumer.start()
        return consumer


class BatchConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer whose fetch loop hands the records of ``batch_topics`` over a fetch at a time.

    Records of other topics (table changelogs during recovery) go through Faust's per-record
    callback as before. A batch is acknowledged (so its offsets may be committed) only after
    ``on_batch`` returned, i.e. after its outputs and changelog records were acknowledged by Kafka.
    The class attributes are set on a subclass per app (``install_batch_consumer``).
    """

    batch_topics: frozenset[str] = frozenset()
    on_batch: BatchHandler
    max_in_flight: int = 4  # batches processed whose sends Kafka has not acknowledged yet
    fetch_max_wait_ms: int = 100

    def _new_consumer_thread(self) -> Any:
        thread_class = type("ConsumerThread", (ConsumerThread,), {"fetch_max_wait_ms": self.fetch_max_wait_ms})
        return thread_class(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:  # noqa: C901 (mirrors Faust's loop)
        callback = self.callback
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        batch_topics = self.batch_topics
        # Processing is ordered (one batch after another); only the wait for Kafka's acknowledgements
        # overlaps the next batches. Offsets are acknowledged oldest batch first.
        in_flight: deque[tuple[asyncio.Future[Any], dict[TP, list[int]]]] = deque()
        try:
            while not (self._stopped.is_set() or fetcher._stopped.is_set()):
                # Faust's getmany, a partition at a time instead of a record at a time: the same
                # flow, generation and active-partition checks, and the events stay aiokafka records
                records, active = await self._wait_next_records(1.0)
                generation = self.app.consumer_generation_id
                if records is None or self.should_stop:
                    continue
                if not self.flow_active:
                    await self.perform_seek()  # what Faust's getmany does when flow stopped
                    continue
                batch: list[Any] = []
                offsets: dict[TP, list[int]] = {}
                for tp, tp_records in records.items():
                    if not self.flow_active or self.app.consumer_generation_id != generation:
                        break
                    if active is not None and tp not in active and tp not in self._buffered_partitions:
                        continue
                    self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                    for record in tp_records:
                        offset = record.offset
                        last = read_offset[tp]
                        if last is not None and offset < last:
                            continue  # already read (Faust's loop drops these too)
                        if last and offset - last > 1 and acks_enabled_for(tp.topic):
                            await self._add_gap(tp, last + 1, offset)  # compacted/aborted offsets: nothing to ack
                        if tp.topic in batch_topics:
                            batch.append(record)
                            offsets.setdefault(tp, []).append(offset)
                        else:
                            if self.app.consumer_generation_id != generation:
                                break
                            await callback(self._to_message(tp, record))
                        read_offset[tp] = offset
                if batch:
                    in_flight.append((asyncio.ensure_future(await self.on_batch(batch)), offsets))
                while in_flight and (len(in_flight) >= self.max_in_flight or in_flight[0][0].done()):
                    await self._ack_oldest(in_flight)
                await self.sleep(0)
        finally:
            while in_flight:  # a rebalance or stop: what was processed is still sent and acknowledged
                await self._ack_oldest(in_flight)

    async def _ack_oldest(self, in_flight: deque[tuple[asyncio.Future[Any], dict[TP, list[int]]]]) -> None:
        done, offsets = in_flight[0]
        await asyncio.shield(done)
        in_flight.popleft()
        self._ack_offsets(offsets)
        if self._commit_every is not None and self._n_acked >= self._commit_every:
            self._n_acked = 0
            await self.commit()

    def _ack_offsets(self, offsets: dict[TP, list[int]]) -> None:
        """Faust's ``Consumer.ack`` for a batch of offsets at once: they become committable."""
        with ack_lock:
            for tp, tp_offsets in offsets.items():
                if not self.app.topics.acks_enabled_for(tp.topic):
                    continue
                committed = self._committed_offset[tp]
                index = self._acked_index[tp]
                fresh = [o for o in tp_offsets if (committed is None or o >= committed) and o not in index]
                index.update(fresh)
                self._acked[tp].extend(fresh)
                self._n_acked += len(fresh)
        notify(self._waiting_for_ack)


def install_batch_consumer(
    app: faust.App, batch_topics: frozenset[str], on_batch: BatchHandler, max_in_flight: int, fetch_max_wait_ms: int
) -> None:
    """Make ``app`` read ``batch_topics`` through a ``BatchConsumer``; before its consumer exists (it is created
    when the worker starts)."""
    consumer_class = type(
        "EventsBatchConsumer",
        (BatchConsumer,),
        {
            "batch_topics": batch_topics,
            "on_batch": on_batch,
            "max_in_flight": max_in_flight,
            "fetch_max_wait_ms": fetch_max_wait_ms,
        },
    )
    # Faust declares Transport.Consumer a ClassVar; an instance attribute replaces it for this app's transport only
    app.transport.Consumer = consumer_class  # type: ignore[misc]


def committed_offsets(consumer: Any) -> Mapping[TP, int | None]:
    """Faust's committed offsets per partition, refreshed from Kafka at each assignment."""
    return consumer._committed_offset


def aiokafka_producer(app: faust.App) -> Any:
    """aiokafka's producer under Faust's (started by Faust): its record batches are what the worker sends."""
    producer: Any = app.producer  # the aiokafka driver's Producer (Faust's ProducerT does not declare the method)
    return producer._ensure_producer()


async def wait_on_metadata(producer: Any, topic: str) -> None:
    """Fetch ``topic``'s metadata into the producer's cluster view, as ``producer.send`` does first."""
    await producer.client._wait_on_metadata(topic)


def table_dict(table: Any) -> MutableMapping[str, Any]:
    """A table's values: the memory store's plain dict (``Mapping.get`` through the store cost ~1 us a lookup).

    The store is created once per table and cleared in place on recovery, so the dict may be kept.
    """
    store = table.data
    return getattr(store, "data", store)
