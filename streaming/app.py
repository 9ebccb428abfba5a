"""The Faust app: raw ``recsys.events`` in; samples, dead letters, late clicks and Feast rows out.

Run it with ``recsys stream worker`` or ``faust -A streaming.app worker -l info``. Workers with
the same RECSYS_STREAM_APP_ID form one consumer group (the README says what is verified about
running several). Configuration comes from RECSYS_* settings.

The events topic is read in whole fetches, not event by event: ``BatchConsumer`` (Faust's
aiokafka consumer with its fetch loop replaced) hands every record a fetch returned for the
events topic to ``StreamWorker.handle_batch`` at once and acknowledges them after it returns.
Faust's own loop awaits four futures per record (``wait_first``) and a stream hop per event,
which held a worker that did nothing near 3k events/s on this machine. Everything else stays
Faust's: the consumer group and rebalances, table changelog recovery (changelog records still
take the per-record path), and offset commits from acknowledged offsets.

``Processor`` does the work; state lives in four Faust tables changelogged to Kafka
(``<app id>-<table>-changelog``):

* ``dedup``  "partition:first offset" -> event ids first seen in one batch (client-retry de-duplication)
* ``joins``  sample id -> impression and its join status     (the attribution window)
* ``users``  user id -> latest encoded user features         (co-partitioned with the events)
* ``items``  item id -> latest encoded item features         (a GlobalTable: items are keyed
  by item id on the topic, impressions by user id, so every worker needs every item)

Writes name their changelog partition explicitly (``TableKV``): inside a batch Faust's
"current event" is the last one of the batch, not the record being handled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
import orjson
from aiokafka.partitioner import DefaultPartitioner
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

from core.kafka import ensure_topics
from core.settings import Settings, get_settings
from feature_repo.spec import EncodedEntity
from streaming import metrics
from streaming.processor import BatchResult, Outgoing, Processor, ProcessorConfig

log = logging.getLogger("streaming.app")


class StreamApp(faust.App):
    """Faust's App that creates its tables' changelog topics before its consumer and tables start.

    When Faust created them itself on a fresh broker, its consumer sometimes did not find the
    new ``items`` changelog in its metadata, ignored it, and the GlobalTable's recovery never
    finished: the worker never read a record. Created here (compacted, as Faust makes them, and
    listed by the broker before going on), both ``recsys stream worker`` and
    ``faust -A streaming.app worker`` get them.
    """

    kafka_bootstrap: str = ""

    async def on_first_start(self) -> None:
        await super().on_first_start()
        changelogs = {table.changelog_topic.get_topic_name(): table.partitions for table in self.tables.values()}
        await ensure_topics(
            self.kafka_bootstrap, changelogs, configs={name: {"cleanup.policy": "compact"} for name in changelogs}
        )


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
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
    """

    batch_topics: frozenset[str] = frozenset()  # set by create_app on a subclass per app
    on_batch: Any = None  # async (list of aiokafka records) -> awaitable that completes once the batch is durable
    max_in_flight: int = 4  # batches processed whose sends Kafka has not acknowledged yet
    fetch_max_wait_ms: int = 100

    def _new_consumer_thread(self) -> Any:
        thread_class = type("ConsumerThread", (_ConsumerThread,), {"fetch_max_wait_ms": self.fetch_max_wait_ms})
        return thread_class(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:  # noqa: C901 (mirrors Faust's loop)
        callback = self.callback
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        batch_topics = self.batch_topics
        # Processing is ordered (one batch after another); only the wait for Kafka's acknowledgements
        # overlaps the next batches. Offsets are acknowledged oldest batch first.
        in_flight: deque[tuple[asyncio.Future, dict[TP, list[int]]]] = deque()
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

    async def _ack_oldest(self, in_flight: deque[tuple[asyncio.Future, dict[TP, list[int]]]]) -> None:
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


class TableKV:
    """A Faust table as the processor's KV: reads from its store, writes with an explicit changelog partition.

    Changelog records are queued here and sent by ``StreamWorker.submit`` with the batch's other
    outputs, all awaited before the batch is acknowledged: Faust's own per-write ``send_soon``
    buffer drains one record at a time and held the worker under 1k events/s.
    """

    def __init__(self, table: Any, pending: dict[tuple[str, str], tuple[int, Any]]) -> None:
        self.table = table
        self.topic = table.changelog_topic.get_topic_name()
        self.pending = pending
        self._dict: Any = None

    @property
    def _data(self) -> Any:
        data = self._dict
        if data is None:
            store = self.table.data  # created once per table, cleared in place on recovery
            # the memory store's plain dict: Mapping.get through the store cost ~1 us a lookup
            data = self._dict = getattr(store, "data", store)
        return data

    def get(self, key: str) -> Any:
        get = self._data.get
        self.get = get  # type: ignore[method-assign]  # later lookups go straight to the dict (hot path)
        return get(key)

    def put(self, partition: int, key: str, value: Any) -> None:
        self._data[key] = value
        # keyed by (topic, key): within a batch only a key's last value reaches the changelog, as compaction
        # would; serialised when sent, so a key written twice in a batch is serialised once
        self.pending[(self.topic, key)] = (partition, value)

    def delete(self, partition: int, key: str) -> None:
        try:
            del self._data[key]
        except KeyError:
            return
        self.pending[(self.topic, key)] = (partition, None)  # a tombstone

    def items(self) -> Iterable[tuple[str, Any]]:
        return list(self._data.items())

    def __len__(self) -> int:
        return len(self._data)


def processor_config(settings: Settings) -> ProcessorConfig:
    return ProcessorConfig(
        attribution_window_s=settings.stream.attribution_window_s,
        dedup_window_s=settings.stream.dedup_window_s,
        resolved_retention_s=settings.stream.resolved_retention_s,
        idle_advance_s=settings.stream.idle_advance_s,
        max_event_bytes=settings.events.max_event_bytes,
        max_future_skew_s=settings.events.max_future_skew_s,
        max_event_age_s=settings.events.max_event_age_s,
        source_topic=settings.kafka.topic_events,
    )


def data_dir(settings: Settings):
    return settings.stream_data_dir


class _WriteLane:
    """Rows waiting for one kind of write, and the single task that writes them, one write at a time.

    ``add`` returns a future of the write that will carry the rows; while a write runs, what
    arrives waits and goes in the next one, so a slow store costs fewer, larger writes rather than
    a queue. ``newest_only``: keep the latest row per id (the online store holds nothing else);
    otherwise every row is kept (the offline store keeps each version for point-in-time joins).
    """

    def __init__(
        self,
        name: str,
        write: Callable[[str, list[tuple[EncodedEntity, float]]], None],
        newest_only: bool,
        ready: Callable[[], Awaitable[None]],
    ) -> None:
        self.name = name
        self._write = write
        self._ready = ready
        self.newest_only = newest_only
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"feast-{name}")
        self._pending: dict[str, dict[str, tuple[EncodedEntity, float]] | list[tuple[EncodedEntity, float]]] = {}
        self._waiters: list[asyncio.Future] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def add(self, entity: str, rows: dict[str, tuple[EncodedEntity, float]]) -> asyncio.Future:
        if self.newest_only:
            pending = self._pending.setdefault(entity, {})
            for entity_id, row in rows.items():
                current = pending.get(entity_id)  # type: ignore[union-attr]
                if current is None or current[1] <= row[1]:
                    pending[entity_id] = row  # type: ignore[index]
        else:
            self._pending.setdefault(entity, []).extend(rows.values())  # type: ignore[union-attr]
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.ensure_future(self._run())
        self._wake.set()  # type: ignore[union-attr]
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()  # type: ignore[union-attr]
            self._wake.clear()  # type: ignore[union-attr]
            pending, self._pending = self._pending, {}
            waiters, self._waiters = self._waiters, []
            try:
                await self._ready()
                for entity, rows in pending.items():
                    rows_list = list(rows.values()) if isinstance(rows, dict) else rows
                    if rows_list:
                        await loop.run_in_executor(self._executor, self._write, entity, rows_list)
            except Exception as exc:  # noqa: BLE001 - every batch waiting on this write learns of it
                log.error("feature write failed", extra={"fields": {"store": self.name, "error": repr(exc)[:300]}})
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                continue
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


class FeatureWriter:
    """Writes the batches' encoded profiles to Feast: online pushes and offline parquet appends, in two lanes.

    The lanes run side by side (one thread each), so a parquet append never delays the next
    online push: the online store is what serving reads, and its freshness is the figure that
    matters. A batch counts as written once both lanes carried it. The store is opened before
    the worker starts (``open_now``) or, under ``faust -A ... worker``, in a thread at start-up
    so the event loop keeps heartbeating to Kafka meanwhile.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: asyncio.Future | None = None
        self._opened: Any = None
        self._online = _WriteLane("online", self._write_online, newest_only=True, ready=self._ready)
        self._offline = _WriteLane("offline", self._write_offline, newest_only=False, ready=self._ready)

    def submit(self, result: BatchResult) -> asyncio.Future:
        futures = []
        for entity, rows in (("user", result.users), ("item", result.items)):
            if rows:
                futures += [self._online.add(entity, rows), self._offline.add(entity, rows)]
        return asyncio.gather(*futures) if futures else _done()

    def start(self) -> None:
        if self._store is None and self._opened is None:
            self._store = asyncio.get_running_loop().run_in_executor(None, self._open)

    def open_now(self) -> None:
        """Open the store before the worker starts (``recsys stream worker`` does): importing Feast and
        torch takes seconds of CPU that would otherwise compete with the first minutes of the stream."""
        self._opened = self._open()

    def _open(self) -> Any:
        from feature_repo import store as fs

        s = self.settings
        started = time.perf_counter()
        opened = fs.open_store(s.feast.data_dir, s.feast.online_store, s.feast_redis_url)
        log.info(
            "feature store ready",
            extra={
                "fields": {
                    "online_store": s.feast.online_store,
                    "data_dir": str(s.feast.data_dir),
                    "seconds": round(time.perf_counter() - started, 2),
                }
            },
        )
        return opened

    async def _ready(self) -> None:
        if self._opened is None:
            self.start()
            self._opened = await self._store  # type: ignore[misc]

    def _frame(self, entity: str, rows: list[tuple[EncodedEntity, float]]) -> Any:
        from feature_repo import store as fs

        return fs.rows_frame(entity, [e for e, _ in rows], [t for _, t in rows], time.time())

    def _write_online(self, entity: str, rows: list[tuple[EncodedEntity, float]]) -> None:
        from feature_repo import store as fs

        frame = self._frame(entity, rows)
        started = time.perf_counter()
        fs.push_online(self._opened, entity, frame)
        metrics.FEATURE_PUSH_SECONDS.labels("online").observe(time.perf_counter() - started)
        metrics.FEATURE_ROWS.labels(entity, "online").inc(len(frame))

    def _write_offline(self, entity: str, rows: list[tuple[EncodedEntity, float]]) -> None:
        from feature_repo import store as fs

        frame = self._frame(entity, rows)
        started = time.perf_counter()
        fs.write_offline(self.settings.feast.data_dir, entity, frame)
        metrics.FEATURE_PUSH_SECONDS.labels("offline").observe(time.perf_counter() - started)
        metrics.FEATURE_ROWS.labels(entity, "offline").inc(len(frame))


class StreamWorker:
    """Glue between Faust and the processor: batches in (processed one after another), outputs and feature
    writes handed on; ``BatchConsumer`` acknowledges a batch once its returned future completes."""

    def __init__(self, app: faust.App, settings: Settings, tables: dict[str, Any]) -> None:
        self.app = app
        self.settings = settings
        self.changelog: dict[tuple[str, str], tuple[int, Any]] = {}  # (topic, key) -> (partition, value or None)
        kv = {name: TableKV(table, self.changelog) for name, table in tables.items()}
        self.processor = Processor(
            processor_config(settings), kv["dedup"], kv["joins"], kv["users"], kv["items"], caught_up=self.caught_up
        )
        self.features = FeatureWriter(settings)
        self.topics = {
            "samples": settings.kafka.topic_samples,
            "deadletter": settings.kafka.topic_deadletter,
            "late": settings.kafka.topic_late,
        }
        self.lock = asyncio.Lock()
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[tuple[str, bytes], int] = {}
        self._changelog_handed: asyncio.Future | None = None  # the last submit's changelog, once handed over
        # True from the end of table recovery (on_rebalance_complete) to the next rebalance: only then do
        # the tables hold every restored record of the assigned partitions
        self.ready = False

    def caught_up(self, partition: int, next_offset: int) -> bool:
        try:
            highwater = self.app.consumer.highwater(TP(self.settings.kafka.topic_events, partition))
        except Exception:  # not assigned (any more), consumer restarting: not known to be caught up
            return False
        return highwater is not None and next_offset >= highwater

    async def handle_batch(self, messages: list[Any]) -> asyncio.Future:
        """Process a batch and hand its outputs to Kafka; the returned future completes once all are durable."""
        started = time.perf_counter()
        async with self.lock:
            metrics.RECORDS_IN.inc(len(messages))
            result = self.processor.process_batch(messages)
            # features and outputs are durable before the batch is acknowledged (at-least-once)
            done = asyncio.gather(self.features.submit(result), await self.submit(result.out))
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        return done

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
            committed_offsets = consumer._committed_offset  # Faust's: refreshed from Kafka at each assignment
            for tp in consumer.assignment():
                if tp.topic != self.settings.kafka.topic_events or tp.partition in self.processor.partitions:
                    continue
                committed = committed_offsets.get(tp) or 0
                highwater = consumer.highwater(tp)
                if highwater is not None and committed >= highwater:
                    quiet.append((tp.partition, committed))
        except Exception:  # a rebalance under way: try again on the next tick
            return []
        return quiet

    async def submit(self, out: list[Outgoing]) -> asyncio.Future:
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
            return _done()
        producer = self.app.producer._ensure_producer()  # aiokafka's producer, started by Faust
        by_partition: dict[tuple[str, int], list[tuple[bytes | None, bytes | None, list]]] = {}
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
        return asyncio.ensure_future(_acked(handed))

    async def _send_changelog(
        self,
        producer: Any,
        changelog: list[tuple[tuple[str, str], tuple[int, Any]]],
        outputs_acked: asyncio.Future,
        previous: asyncio.Future | None,
    ) -> asyncio.Future:
        """Once ``outputs_acked`` and the previous submit's changelog was handed over: hand these; their acks."""
        await outputs_acked
        if previous is not None:
            await previous
        by_partition: dict[tuple[str, int], list[tuple[bytes | None, bytes | None, list]]] = {}
        dumps = orjson.dumps
        for (topic, key), (partition, value) in changelog:
            by_partition.setdefault((topic, partition), []).append(
                (dumps(key), None if value is None else dumps(value), [])
            )
        metrics.RECORDS_OUT.labels("changelog").inc(len(changelog))
        return await self._send(producer, by_partition)

    @staticmethod
    async def _send(
        producer: Any, by_partition: dict[tuple[str, int], list[tuple[bytes | None, bytes | None, list]]]
    ) -> asyncio.Future:
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
        return asyncio.gather(*futures) if futures else _done()

    async def _partition_for(self, producer: Any, topic: str, key: bytes | None) -> int:
        """The partition Kafka's default partitioner gives ``key`` (murmur2), as ``producer.send`` would."""
        cached = self._partitions.get((topic, key)) if key is not None else None
        if cached is not None:
            return cached
        partitions = producer.client.cluster.partitions_for_topic(topic)
        if not partitions:
            await producer.client._wait_on_metadata(topic)
            partitions = producer.client.cluster.partitions_for_topic(topic)
        available = list(producer.client.cluster.available_partitions_for_topic(topic)) or list(partitions)
        partition = self._partitioner(key, sorted(partitions), available)
        if key is not None:
            if len(self._partitions) > 500_000:
                self._partitions.clear()
            self._partitions[(topic, key)] = partition
        return partition


async def _acked(handed: Awaitable[asyncio.Future]) -> None:
    await (await handed)


def _done() -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def create_app(settings: Settings | None = None) -> tuple[faust.App, StreamWorker]:
    s = settings or get_settings()
    brokers = ";".join(f"kafka://{server.strip()}" for server in s.kafka.bootstrap.split(","))
    folder = data_dir(s)
    folder.mkdir(parents=True, exist_ok=True)
    app = StreamApp(
        s.stream.app_id,
        broker=brokers,
        store="memory://",
        datadir=str(folder),
        processing_guarantee="at_least_once",
        topic_partitions=s.kafka.topic_partitions,
        topic_replication_factor=1,
        table_standby_replicas=0,
        broker_commit_interval=s.stream.commit_interval_s,
        broker_session_timeout=s.stream.session_timeout_s,
        broker_heartbeat_interval=min(3.0, s.stream.session_timeout_s / 3),
        broker_max_poll_records=s.stream.batch_size,
        stream_buffer_maxsize=max(4096, 2 * s.stream.batch_size),
        consumer_max_fetch_size=8 * 1024**2,
        consumer_auto_offset_reset="earliest",
        producer_linger=0.005,
        producer_max_batch_size=256 * 1024,
        stream_wait_empty=False,
        web_enabled=False,
        worker_redirect_stdouts=False,
        autodiscover=False,
        key_serializer="raw",
        value_serializer="raw",
    )
    app.kafka_bootstrap = s.kafka.bootstrap
    events = app.topic(
        s.kafka.topic_events, key_serializer="raw", value_serializer="raw", partitions=s.kafka.topic_partitions
    )
    table_options = {
        "partitions": s.kafka.topic_partitions,
        "schema": faust.Schema(key_serializer="json", value_serializer="json"),
    }
    tables = {
        "dedup": app.Table("dedup", **table_options),
        "joins": app.Table("joins", **table_options),
        "users": app.Table("users", **table_options),
        "items": app.GlobalTable("items", **table_options),
    }
    worker = StreamWorker(app, s, tables)

    # subscribed, with acknowledgements, but read by BatchConsumer rather than through an agent's stream;
    # set before the consumer exists (Faust creates it when the worker starts)
    app.topics.add(events)
    app.transport.Consumer = type(
        "EventsBatchConsumer",
        (BatchConsumer,),
        {
            "batch_topics": frozenset({s.kafka.topic_events}),
            "on_batch": worker.handle_batch,
            "max_in_flight": s.stream.max_in_flight_batches,
            "fetch_max_wait_ms": s.stream.fetch_max_wait_ms,
        },
    )

    @app.timer(interval=max(0.2, min(1.0, s.stream.idle_advance_s / 2)))
    async def idle_windows() -> None:
        await worker.tick()

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        worker.ready = False
        worker.processor.release_partitions(tp.partition for tp in revoked if tp.topic == s.kafka.topic_events)

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
        worker.ready = False

    @app.on_rebalance_complete.connect
    async def on_rebalance_complete(sender: Any, **kwargs: Any) -> None:
        worker.ready = True

    @app.task
    async def open_feature_store() -> None:
        worker.features.start()

    return app, worker


app, worker = create_app()
