"""The Faust app: raw ``recsys.events`` in; samples, dead letters, late clicks and Feast rows out.

Run it with ``recsys stream worker`` or ``faust -A streaming.app worker -l info``. Workers with
the same RECSYS_STREAM_APP_ID form one consumer group (the README says what is verified about
running several). Configuration comes from RECSYS_* settings.

One agent reads the events topic in batches (``take_events``); ``Processor`` does the
work, state lives in four Faust tables changelogged to Kafka (``<app id>-<table>-changelog``):

* ``dedup``  event id -> [partition, offset, event time]   (client-retry de-duplication)
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
from collections.abc import Iterable
from typing import Any

import faust
import orjson
from faust.types import TP

from recsys.settings import Settings, get_settings
from streaming import metrics
from streaming.processor import BatchResult, Outgoing, Processor, ProcessorConfig, RawRecord

log = logging.getLogger("streaming.app")


class TableKV:
    """A Faust table as the processor's KV: reads from its store, writes with an explicit changelog partition.

    Changelog records are queued here and sent by ``StreamWorker.send`` with the batch's other
    outputs, all awaited before the batch is acknowledged: Faust's own per-write ``send_soon``
    buffer drains one record at a time and held the worker under 1k events/s.
    """

    def __init__(self, table: Any, pending: dict[tuple[str, bytes], tuple[int, bytes | None]]) -> None:
        self.table = table
        self.topic = table.changelog_topic.get_topic_name()
        self.pending = pending

    @property
    def _data(self) -> Any:
        return self.table.data

    def get(self, key: str) -> Any:
        return self._data.get(key)

    def put(self, partition: int, key: str, value: Any) -> None:
        self._data[key] = value
        # keyed by (topic, key): within a batch only a key's last value reaches the changelog, as compaction would
        self.pending[(self.topic, orjson.dumps(key))] = (partition, orjson.dumps(value))

    def delete(self, partition: int, key: str) -> None:
        try:
            del self._data[key]
        except KeyError:
            return
        self.pending[(self.topic, orjson.dumps(key))] = (partition, None)  # a tombstone

    def items(self) -> Iterable[tuple[str, Any]]:
        return list(self._data.items())

    def __len__(self) -> int:
        return len(self._data)


def processor_config(settings: Settings) -> ProcessorConfig:
    return ProcessorConfig(
        attribution_window_s=settings.stream_attribution_window_s, dedup_window_s=settings.stream_dedup_window_s,
        resolved_retention_s=settings.stream_resolved_retention_s, idle_advance_s=settings.stream_idle_advance_s,
        max_event_bytes=settings.max_event_bytes, max_future_skew_s=settings.max_future_skew_s,
        max_event_age_s=settings.max_event_age_s, source_topic=settings.topic_events)


def data_dir(settings: Settings):
    return settings.stream_data_dir or settings.run_dir / "stream"


class FeatureWriter:
    """Writes each batch's encoded profiles to Feast: one online push and one parquet append per entity.

    Feast (and torch behind it) is imported in a thread at start-up, so the event loop keeps
    heartbeating to Kafka meanwhile.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: asyncio.Future | None = None

    def start(self) -> None:
        if self._store is None:
            self._store = asyncio.get_running_loop().run_in_executor(None, self._open)

    def _open(self) -> Any:
        from feature_repo import store as fs

        s = self.settings
        started = time.perf_counter()
        opened = fs.open_store(s.feast_data_dir, s.feast_online_store, s.feast_redis_url or s.redis_url)
        log.info("feature store ready", extra={"fields": {"online_store": s.feast_online_store,
                                                          "data_dir": str(s.feast_data_dir),
                                                          "seconds": round(time.perf_counter() - started, 2)}})
        return opened

    async def write(self, result: BatchResult) -> None:
        if not result.users and not result.items:
            return
        self.start()
        store = await self._store  # type: ignore[misc]
        await asyncio.get_running_loop().run_in_executor(None, self._write, store, result)

    def _write(self, store: Any, result: BatchResult) -> None:
        from feature_repo import store as fs

        created = time.time()
        for entity, rows in (("user", result.users), ("item", result.items)):
            if not rows:
                continue
            frame = fs.rows_frame(entity, [e for e, _ in rows.values()], [t for _, t in rows.values()], created)
            started = time.perf_counter()
            fs.push_online(store, entity, frame)
            metrics.FEATURE_PUSH_SECONDS.labels("online").observe(time.perf_counter() - started)
            started = time.perf_counter()
            fs.write_offline(self.settings.feast_data_dir, entity, frame)
            metrics.FEATURE_PUSH_SECONDS.labels("offline").observe(time.perf_counter() - started)
            metrics.FEATURE_ROWS.labels(entity, "online").inc(len(frame))
            metrics.FEATURE_ROWS.labels(entity, "offline").inc(len(frame))


class StreamWorker:
    """Glue between Faust and the processor: batches in, sends and feature writes out, one batch at a time."""

    def __init__(self, app: faust.App, settings: Settings, tables: dict[str, Any]) -> None:
        self.app = app
        self.settings = settings
        self.changelog: dict[tuple[str, bytes], tuple[int, bytes | None]] = {}
        kv = {name: TableKV(table, self.changelog) for name, table in tables.items()}
        self.processor = Processor(processor_config(settings), kv["dedup"], kv["joins"], kv["users"], kv["items"],
                                   caught_up=self.caught_up)
        self.features = FeatureWriter(settings)
        self.topics = {"samples": settings.topic_samples, "deadletter": settings.topic_deadletter,
                       "late": settings.topic_late}
        self.lock = asyncio.Lock()
        # True from the end of table recovery (on_rebalance_complete) to the next rebalance: only then do
        # the tables hold every restored record of the assigned partitions
        self.ready = False

    def caught_up(self, partition: int, next_offset: int) -> bool:
        try:
            highwater = self.app.consumer.highwater(TP(self.settings.topic_events, partition))
        except Exception:  # not assigned (any more), consumer restarting: not known to be caught up
            return False
        return highwater is not None and next_offset >= highwater

    async def handle(self, events: list[Any]) -> None:
        records = [RawRecord(e.message.partition, e.message.offset, e.message.key, e.message.value,
                             e.message.timestamp) for e in events]
        started = time.perf_counter()
        async with self.lock:
            metrics.RECORDS_IN.inc(len(records))
            result = self.processor.process_batch(records)
            # features and outputs are durable before the batch is acknowledged (at-least-once)
            await asyncio.gather(self.features.write(result), self.send(result.out))
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)

    async def tick(self) -> None:
        quiet = await self._quiet_partitions()
        async with self.lock:
            out: list[Outgoing] = []
            for partition, position in quiet:
                out += self.processor.take_quiet_partition(partition, position)
            out += self.processor.advance_idle()
            await self.send(out)

    async def _quiet_partitions(self) -> list[tuple[int, int]]:
        """Assigned partitions not taken yet that have nothing to read: after a restart their impressions
        still wait for windows to close (and their resolved samples for re-emission)."""
        consumer = self.app.consumer
        if not self.ready or self.app.rebalancing or self.app.in_recovery:
            return []
        quiet = []
        try:
            for tp in consumer.assignment():
                if tp.topic != self.settings.topic_events or tp.partition in self.processor.partitions:
                    continue
                position = await consumer.position(tp)
                highwater = consumer.highwater(tp)
                if position is not None and highwater is not None and position >= highwater:
                    quiet.append((tp.partition, position))
        except Exception:  # a rebalance under way: try again on the next tick
            return []
        return quiet

    async def send(self, out: list[Outgoing]) -> None:
        """Send the outputs and the queued changelog records; return once Kafka acknowledged all of them."""
        changelog = list(self.changelog.items())
        self.changelog.clear()
        if not out and not changelog:
            return
        producer = self.app.producer
        futures = []
        for (topic, key), (partition, value) in changelog:
            futures.append(await producer.send(topic, key, value, partition, None, None))
        counts: dict[str, int] = {}
        for message in out:
            topic = self.topics[message.kind]
            counts[message.kind] = counts.get(message.kind, 0) + 1
            futures.append(await producer.send(topic, message.key, message.value, None, None,
                                               list(message.headers) or None))
        await asyncio.gather(*futures)
        for kind, count in counts.items():
            metrics.RECORDS_OUT.labels(kind).inc(count)
        metrics.RECORDS_OUT.labels("changelog").inc(len(changelog))


def create_app(settings: Settings | None = None) -> tuple[faust.App, StreamWorker]:
    s = settings or get_settings()
    brokers = ";".join(f"kafka://{server.strip()}" for server in s.kafka_bootstrap.split(","))
    folder = data_dir(s)
    folder.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        s.stream_app_id, broker=brokers, store="memory://", datadir=str(folder),
        processing_guarantee="at_least_once", topic_partitions=s.topic_partitions, topic_replication_factor=1,
        table_standby_replicas=0, broker_commit_interval=s.stream_commit_interval_s,
        broker_session_timeout=s.stream_session_timeout_s, broker_heartbeat_interval=min(3.0, s.stream_session_timeout_s / 3),
        broker_max_poll_records=s.stream_batch_size, stream_buffer_maxsize=max(4096, 2 * s.stream_batch_size),
        consumer_auto_offset_reset="earliest", producer_linger=0.005, producer_max_batch_size=256 * 1024,
        stream_wait_empty=False, web_enabled=False, worker_redirect_stdouts=False, autodiscover=False,
        key_serializer="raw", value_serializer="raw",
    )
    events = app.topic(s.topic_events, key_serializer="raw", value_serializer="raw", partitions=s.topic_partitions)
    table_options = {"partitions": s.topic_partitions,
                     "schema": faust.Schema(key_serializer="json", value_serializer="json")}
    tables = {
        "dedup": app.Table("dedup", **table_options),
        "joins": app.Table("joins", **table_options),
        "users": app.Table("users", **table_options),
        "items": app.GlobalTable("items", **table_options),
    }
    worker = StreamWorker(app, s, tables)

    @app.agent(events, name="process")
    async def process(stream: faust.StreamT) -> None:
        worker.features.start()
        async for batch in stream.take_events(s.stream_batch_size, within=s.stream_batch_within_s):
            await worker.handle(batch)

    @app.timer(interval=max(0.2, min(1.0, s.stream_idle_advance_s / 2)))
    async def idle_windows() -> None:
        await worker.tick()

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        worker.ready = False
        worker.processor.release_partitions(tp.partition for tp in revoked if tp.topic == s.topic_events)

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
