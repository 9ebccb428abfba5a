"""The worker's Faust tables, and the adapter that makes one of them the processor's KV.

State lives in five tables changelogged to Kafka (``<app id>-<table>-changelog``):

* ``dedup``  "partition:first offset" -> event ids first seen in one batch (client-retry de-duplication)
* ``joins``  sample id -> impression and its join status     (the attribution window)
* ``resolved`` "partition:chunk id" -> sample ids resolved in one batch and their labels (one label
  forever: remembered for as long as events are accepted)
* ``users``  user id -> latest encoded user features         (co-partitioned with the events)
* ``items``  item id -> latest encoded item features         (a GlobalTable: items are keyed
  by item id on the topic, impressions by user id, so every worker needs every item)

Writes name their changelog partition explicitly (``TableKV``): inside a batch Faust's
"current event" is the last one of the batch, not the record being handled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import faust
from faust.types import SchemaT

from core.kafka import Brokers, end_offsets, read_topic
from core.settings import StreamSettings
from streaming.faust_overrides import table_dict

Changelog = dict[tuple[str, str], tuple[int, Any]]  # (topic, key) -> (partition, value or None: a tombstone)


TABLES = ("dedup", "joins", "resolved", "users", "items")


def declare_tables(app: faust.App, partitions: int) -> dict[str, Any]:
    """The five tables, by name; JSON keys and values (what the changelog records hold)."""
    schema: SchemaT = faust.Schema(key_serializer="json", value_serializer="json")
    tables = {name: app.Table(name, partitions=partitions, schema=schema) for name in TABLES if name != "items"}
    return {**tables, "items": app.GlobalTable("items", partitions=partitions, schema=schema)}


def changelog_topic(app_id: str, table: str) -> str:
    """Faust's name of a table's changelog topic."""
    return f"{app_id}-{table}-changelog"


async def changelog_sizes(brokers: Brokers, app_id: str) -> dict[str, tuple[int, int]]:
    """Per table: (records its changelog holds now: what a restart reads, records ever written to it).

    The first is counted by reading the topic (compaction leaves gaps in the offsets), the second is
    the sum of its end offsets. Tables whose changelog does not exist yet are left out.
    """
    sizes = {}
    for table in TABLES:
        topic = changelog_topic(app_id, table)
        ends = await end_offsets(brokers, topic)
        if ends:
            held = 0
            async for _ in read_topic(brokers, topic, stop=ends):
                held += 1
            sizes[table] = (held, sum(ends.values()))
    return sizes


def changelog_configs(stream: StreamSettings) -> dict[str, str]:
    """Topic configs of the tables' changelogs: compacted, with segments and cleaner tuned to keep up.

    A restart reads each changelog from its start, and Kafka's cleaner compacts only closed segments
    whose share of superseded records passed ``min.cleanable.dirty.ratio``: with the broker's defaults
    (segments of 7 days or 1 GiB) nothing is compacted for days and a restart replays the whole history.
    The state itself is bounded (every entry is deleted by a tombstone once nothing needs it), so with
    these a restart reads the live entries, the tombstones of the last ``delete.retention.ms`` and the
    records of the open segments.
    """
    configs = {"cleanup.policy": "compact"}
    if stream.changelog_compaction:
        configs |= {
            "segment.ms": str(stream.changelog_segment_ms),
            "segment.bytes": str(stream.changelog_segment_bytes),
            "min.cleanable.dirty.ratio": str(stream.changelog_min_cleanable_dirty_ratio),
            "delete.retention.ms": str(stream.changelog_delete_retention_ms),
        }
    return configs


class TableKV:
    """A Faust table as the processor's KV: reads from its store, writes with an explicit changelog partition.

    Changelog records are queued in ``pending`` and sent by ``StreamWorker.submit`` with the batch's
    other outputs, all awaited before the batch is acknowledged: Faust's own per-write ``send_soon``
    buffer drains one record at a time and held the worker under 1k events/s.
    """

    def __init__(self, table: Any, pending: Changelog) -> None:
        self.table = table
        self.topic = table.changelog_topic.get_topic_name()
        self.pending = pending
        self._dict: MutableMapping[str, Any] | None = None
        # the first lookup puts the dict's own get in its place: later lookups go straight to it (hot path)
        self.get: Callable[[str], Any] = self._first_get

    @property
    def _data(self) -> MutableMapping[str, Any]:
        data = self._dict
        if data is None:
            data = self._dict = table_dict(self.table)
        return data

    def _first_get(self, key: str) -> Any:
        get = self.get = self._data.get
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
