"""The parameter service: embedding rows (vector + row-wise optimizer state) by (table, id), versioned.

``open_store("memory", tables)`` for unit tests and single processes, ``open_store("redis",
tables, s.ps)`` for the sharded training copy or an inference replica (``s``: the settings);
``open_reader(s.ps, replica_urls)`` reads the nearest healthy replica and fails over.
Numpy only: no torch import here.
"""

from __future__ import annotations

from core.settings import ParamServerSettings
from paramserver.base import ParamStore, SnapshotInfo
from paramserver.rows import (
    BadRows,
    Conflict,
    LogTrimmed,
    ParamServerError,
    ReplicasBehind,
    Rows,
    ShardUnavailable,
    TableConfig,
    TableMismatch,
    UnknownTable,
    initial_rows,
)

__all__ = [
    "BadRows",
    "Conflict",
    "FailoverReader",
    "LogTrimmed",
    "ParamServerError",
    "ParamStore",
    "ReplicasBehind",
    "Replicator",
    "Rows",
    "ShardUnavailable",
    "SnapshotInfo",
    "TableConfig",
    "TableMismatch",
    "UnknownTable",
    "initial_rows",
    "open_reader",
    "open_store",
]


def open_store(
    backend: str,
    tables: list[TableConfig],
    settings: ParamServerSettings | None = None,
    *,
    shards: list[str] | None = None,
) -> ParamStore:
    """A parameter store: backend ``memory`` (in-process, no options) or ``redis``.

    The redis backend takes its shards (unless ``shards`` names others) and every option from
    ``settings``, the ``ps`` section of the settings (RECSYS_PS_*). With ``tables=[]`` a Redis
    store uses the tables already recorded in its servers.
    """
    if backend == "memory":
        from paramserver.memory import MemoryStore

        return MemoryStore(tables)
    if backend == "redis":
        if settings is None:
            raise TypeError("the redis backend needs the parameter-service settings (Settings.ps)")
        from paramserver.redis_store import RedisStore

        return RedisStore.from_settings(settings, tables, shards=shards)
    raise ValueError(f"unknown parameter-store backend {backend!r}: use 'memory' or 'redis'")


def open_reader(
    settings: ParamServerSettings, replicas: list[str] | None = None, tables: list[TableConfig] | None = None
) -> FailoverReader:
    """A reader over inference replicas, nearest first (default: ``settings.replicas``).

    Each replica is a Redis URL, or several comma-separated URLs for a sharded replica. A read
    attempt waits ``settings.failover_timeout_s`` before moving on; failed nearer replicas are
    probed every ``settings.failover_probe_s``.
    """
    from paramserver.redis_store import store_options

    urls = list(replicas if replicas is not None else settings.replicas)
    options = store_options(settings)
    options["timeout"] = settings.failover_timeout_s
    return FailoverReader([u.split(",") for u in urls], tables or [], probe_s=settings.failover_probe_s, **options)


from paramserver.replication import FailoverReader, Replicator  # noqa: E402  (after open_store: no cycle)
