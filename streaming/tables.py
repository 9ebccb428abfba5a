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

from streaming.faust_overrides import table_dict

Changelog = dict[tuple[str, str], tuple[int, Any]]  # (topic, key) -> (partition, value or None: a tombstone)


def declare_tables(app: faust.App, partitions: int) -> dict[str, Any]:
    """The five tables, by name; JSON keys and values (what the changelog records hold)."""
    schema: SchemaT = faust.Schema(key_serializer="json", value_serializer="json")
    return {
        "dedup": app.Table("dedup", partitions=partitions, schema=schema),
        "joins": app.Table("joins", partitions=partitions, schema=schema),
        "resolved": app.Table("resolved", partitions=partitions, schema=schema),
        "users": app.Table("users", partitions=partitions, schema=schema),
        "items": app.GlobalTable("items", partitions=partitions, schema=schema),
    }


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
