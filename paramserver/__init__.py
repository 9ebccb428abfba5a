"""The parameter service: embedding rows (vector + row-wise optimizer state) by (table, id), versioned.

``open_store("memory", tables)`` for unit tests and single processes, ``open_store("redis",
tables, shards=[...])`` for the sharded training copy or an inference replica;
``open_reader(replica_urls, tables)`` reads the nearest healthy replica and fails over.
Numpy only: no torch import here.
"""

from __future__ import annotations

from paramserver.base import ParamStore, SnapshotInfo
from paramserver.rows import (
    BadRows,
    Conflict,
    LogTrimmed,
    ParamServerError,
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


def open_store(backend: str, tables: list[TableConfig], shards: list[str] | None = None, **kw: object) -> ParamStore:
    """A parameter store: backend ``memory`` (in-process) or ``redis`` (``shards``: Redis URLs).

    Redis options default to the settings (RECSYS_PS_*): namespace, rows_per_bucket, timeout,
    lock_ttl_s, lock_wait_s, log_retention_s. With ``tables=[]`` a Redis store uses the tables
    already recorded in its servers.
    """
    if backend == "memory":
        if kw:
            raise TypeError(f"the memory backend takes no options, got {sorted(kw)}")
        from paramserver.memory import MemoryStore

        return MemoryStore(tables)
    if backend == "redis":
        from paramserver.redis_store import RedisStore

        options = _redis_defaults()
        options.update(kw)
        if shards is None:
            from core.settings import get_settings

            shards = get_settings().ps.shards
        return RedisStore(list(shards), tables, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown parameter-store backend {backend!r}: use 'memory' or 'redis'")


def _redis_defaults() -> dict[str, object]:
    from core.settings import get_settings

    s = get_settings()
    return {
        "namespace": s.ps.namespace,
        "rows_per_bucket": s.ps.rows_per_bucket,
        "timeout": s.ps.timeout_s,
        "lock_ttl_s": s.ps.lock_ttl_s,
        "lock_wait_s": s.ps.lock_wait_s,
        "log_retention_s": s.ps.log_retention_s,
    }


def open_reader(
    replicas: list[str] | None = None, tables: list[TableConfig] | None = None, **kw: object
) -> FailoverReader:
    """A reader over inference replicas, nearest first (default: settings.ps.replicas).

    Each replica is a Redis URL, or several comma-separated URLs for a sharded replica.
    """
    from core.settings import get_settings

    s = get_settings()
    urls = list(replicas if replicas is not None else s.ps.replicas)
    options = _redis_defaults()
    options["timeout"] = s.ps.failover_timeout_s
    options.update(kw)
    probe_s = float(options.pop("probe_s", s.ps.failover_probe_s))  # type: ignore[arg-type]
    return FailoverReader([u.split(",") for u in urls], tables or [], probe_s=probe_s, **options)


from paramserver.replication import FailoverReader, Replicator  # noqa: E402  (after open_store: no cycle)
