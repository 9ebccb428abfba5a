"""The N independent Redis servers of one store: connections, the table layout, and where a row lives.

``Shards`` opens two kinds of connections per server (redis-py's pool for the rare commands, a
``RespPool`` for the hot paths; both let concurrent callers proceed side by side), records and
checks the table layout on shard 0 (which tables exist and how many hash buckets each has per
shard), routes ids to (shard, bucket), scans and deletes the rows, and raises the servers'
listpack limits so buckets stay compact. It knows nothing of versions: that is ``redis_store``.

redis-py annotates its synchronous and asyncio clients alike (every command returns
``Awaitable[Any] | Any``), so ``RedisClient`` and ``RedisPipeline`` declare the calls we make
with the types the synchronous client returns; ``connect`` is the one place that casts.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar, cast

import numpy as np
import redis
from redis.commands.core import Script

from core.redact import redact_urls
from paramserver.redis_format import Keys
from paramserver.resp import RespPool, hash_commands, pack, parse_url
from paramserver.rows import ParamServerError, ShardUnavailable, TableConfig, TableMismatch, route_hash

log = logging.getLogger(__name__)
T = TypeVar("T")

# what a table's layout must agree on between every client of a store (capacity only sizes new buckets)
LAYOUT_KEYS = ("dim", "state_dim", "storage_dtype", "init_std", "seed")
StreamEntry = tuple[bytes, dict[bytes, bytes]]


class RedisPipeline(Protocol):
    """The redis-py pipeline calls of this package (``get`` answers at once while watching)."""

    def __enter__(self) -> RedisPipeline: ...
    def __exit__(self, *exc: object) -> None: ...
    def watch(self, *names: str) -> None: ...
    def unwatch(self) -> None: ...
    def multi(self) -> None: ...
    def get(self, name: str) -> bytes | None: ...
    def set(self, name: str, value: bytes | str) -> object: ...
    def hset(self, name: bytes, key: bytes, value: bytes) -> object: ...
    def hgetall(self, name: bytes) -> object: ...
    def execute(self) -> list[Any]: ...


class RedisClient(Protocol):
    """The redis-py client calls of this package, typed as the synchronous client returns them."""

    def get(self, name: str) -> bytes | None: ...
    def set(self, name: str, value: bytes | str | int) -> object: ...
    def mget(self, keys: list[bytes]) -> list[bytes | None]: ...
    def delete(self, *names: str) -> int: ...
    def unlink(self, *names: bytes) -> int: ...
    def exists(self, *names: str) -> int: ...
    def sadd(self, name: str, *values: str) -> int: ...
    def srem(self, name: str, *values: str) -> int: ...
    def smembers(self, name: str) -> AbstractSet[bytes]: ...
    def dbsize(self) -> int: ...
    def info(self, section: str) -> dict[str, Any]: ...
    def config_get(self, pattern: str) -> dict[str, str]: ...
    def config_set(self, name: str, value: int) -> object: ...
    def scan_iter(self, match: str, count: int) -> Iterator[bytes]: ...
    def xadd(self, name: str, fields: dict[str, str], id: str) -> bytes: ...
    def xlen(self, name: str) -> int: ...
    def xrange(self, name: str, min: str, max: str, count: int | None = None) -> list[StreamEntry]: ...
    def xrevrange(self, name: str, max: str, min: str, count: int | None = None) -> list[StreamEntry]: ...
    def xread(self, streams: dict[str, str], count: int, block: int) -> object: ...
    def pipeline(self, transaction: bool = True) -> RedisPipeline: ...
    def register_script(self, script: str) -> Script: ...
    def close(self) -> None: ...


def connect(url: str, timeout: float) -> RedisClient:
    return cast(RedisClient, redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout))


class Shards:
    """Connections to the shards of one store (shard 0 coordinates) and the layout of its tables."""

    def __init__(
        self, urls: list[str], namespace: str, rows_per_bucket: int, timeout: float, connections_per_server: int
    ) -> None:
        self.urls = list(urls)
        self.names = redact_urls(self.urls)  # what messages name: never a password
        self.keys = Keys(namespace)
        self.rows_per_bucket = rows_per_bucket
        for url in self.urls:
            parse_url(url)
        self.clients = [connect(u, timeout) for u in self.urls]
        self.resp = [RespPool(u, timeout, connections_per_server) for u in self.urls]
        # as many threads as concurrent reads may use: a read spanning shards must not queue behind others
        self._pool = (
            ThreadPoolExecutor(max_workers=len(self.urls) * connections_per_server, thread_name_prefix="ps-shard")
            if len(self.urls) > 1
            else None
        )
        self.tables: dict[str, TableConfig] = {}
        self.buckets: dict[str, int] = {}

    @contextlib.contextmanager
    def guard(self, shard: int) -> Iterator[None]:
        """redis-py's errors as ours: ShardUnavailable for a connection problem, ParamServerError otherwise."""
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise ShardUnavailable(f"shard {self.names[shard]} unavailable: {exc}") from None
        except redis.ResponseError as exc:
            raise ParamServerError(f"shard {self.names[shard]}: {exc}") from None

    def each(self, fn: Callable[[int], T], shards: Sequence[int]) -> list[T]:
        """``fn`` of every shard in ``shards``, in parallel when there are several."""
        if self._pool is None or len(shards) <= 1:
            return [fn(s) for s in shards]
        return list(self._pool.map(fn, shards))

    def close(self) -> None:
        for raw in self.resp:
            raw.close()
        for client in self.clients:
            client.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def ping(self, shard: int = 0) -> bool:
        try:
            return self.resp[shard].call(pack(b"PING"), 1)[0] in (b"PONG", "PONG")
        except ShardUnavailable:
            return False

    def commands(
        self, verb: bytes, table: str, buckets: np.ndarray, ids: np.ndarray, data: np.ndarray | None = None
    ) -> bytes:
        """``HGET`` (or, with ``data``, ``HSET``) of every row of ``table``, pipelined (see ``hash_commands``)."""
        return hash_commands(verb, self.keys.bucket_prefix(table), buckets, ids, data)

    def route(self, config: TableConfig, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The shard and the bucket of every id."""
        h = route_hash(config.name, ids)
        shard = (h % np.uint64(len(self.urls))).astype(np.int64)
        bucket = ((h >> np.uint64(32)) % np.uint64(self.buckets[config.name])).astype(np.int64)
        return shard, bucket

    def scan(self, config: TableConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every stored row of ``config``'s table, bucket by bucket (not necessarily of one version)."""
        for shard, client in enumerate(self.clients):
            with self.guard(shard):
                keys = list(client.scan_iter(match=self.keys.buckets_of(config.name), count=1000))
                for start in range(0, len(keys), 256):
                    with client.pipeline(transaction=False) as pipe:
                        for key in keys[start : start + 256]:
                            pipe.hgetall(key)
                        buckets = pipe.execute()
                    fields = b"".join(f for bucket in buckets for f in bucket)
                    if fields:
                        ids = np.frombuffer(fields, "<i8").astype(np.int64)
                        data = b"".join(v for bucket in buckets for v in bucket.values())
                        yield ids, np.frombuffer(data, np.uint8).reshape(len(ids), config.row_bytes)

    def delete_rows(self) -> None:
        """Delete every row and log entry of this namespace (a restore starts from nothing)."""
        self.unlink_matching(self.keys.all_buckets, self.keys.all_logs)

    def unlink_matching(self, *patterns: str) -> None:
        """Delete every key matching one of the SCAN ``patterns`` on every shard, in batches."""
        for shard, client in enumerate(self.clients):
            with self.guard(shard):
                batch = []
                for key in itertools.chain(*(client.scan_iter(match=pattern, count=1000) for pattern in patterns)):
                    batch.append(key)
                    if len(batch) >= 1000:
                        client.unlink(*batch)
                        batch = []
                if batch:
                    client.unlink(*batch)

    def sync_layout(self, tables: list[TableConfig]) -> None:
        """Record ``tables`` in the layout on shard 0 (checked against what is recorded) and load them.

        With ``tables=[]`` every recorded table is loaded: how a reader or replicator learns the tables.
        """
        mine: dict[str, dict[str, Any]] = {}
        for cfg in tables:
            if cfg.name in mine and mine[cfg.name] != cfg:
                raise TableMismatch(f"table {cfg.name} given twice with different configs")
            buckets = max(1, -(-cfg.capacity // (self.rows_per_bucket * len(self.urls))))
            mine[cfg.name] = {**cfg.to_dict(), "buckets": buckets}
        with self.guard(0), self.clients[0].pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.keys.layout)
                    raw = pipe.get(self.keys.layout)
                    layout: dict[str, Any] = json.loads(raw) if raw else {"shards": len(self.urls), "tables": {}}
                    if layout["shards"] != len(self.urls):
                        raise TableMismatch(
                            f"the store in {self.names[0]} (namespace {self.keys.namespace}) has {layout['shards']} "
                            f"shards, this client has {len(self.urls)}: resharding goes through snapshot + restore"
                        )
                    changed = False
                    for name, spec in mine.items():
                        have = layout["tables"].get(name)
                        if have is None:
                            layout["tables"][name] = spec
                            changed = True
                            continue
                        if any(have[k] != spec[k] for k in LAYOUT_KEYS):
                            raise TableMismatch(
                                f"table {name} is stored as {[have[k] for k in LAYOUT_KEYS]}, this client asks for "
                                f"{[spec[k] for k in LAYOUT_KEYS]} ({', '.join(LAYOUT_KEYS)})"
                            )
                    if changed:
                        pipe.multi()
                        pipe.set(self.keys.layout, json.dumps(layout))
                        pipe.execute()
                    else:
                        pipe.unwatch()
                    break
                except redis.WatchError:
                    continue
        for name, spec in layout["tables"].items():
            if tables and name not in mine:
                continue
            fields = {k: spec[k] for k in ("name", "dim", "state_dim", "storage_dtype", "init_std", "seed", "capacity")}
            self.tables[name] = TableConfig(**fields)
            self.buckets[name] = int(spec["buckets"])

    def configure_servers(self) -> None:
        """Raise the listpack limits so buckets stay compact (Redis' defaults: 64-byte values, 128 entries)."""
        if not self.tables:
            return
        need_value = max(cfg.row_bytes for cfg in self.tables.values()) + 16
        need_entries = max(512, 8 * self.rows_per_bucket)
        for shard, client in enumerate(self.clients):
            try:
                current = client.config_get("hash-max-listpack-*")
                if int(current.get("hash-max-listpack-value", 0)) < need_value:
                    client.config_set("hash-max-listpack-value", need_value)
                if int(current.get("hash-max-listpack-entries", 0)) < need_entries:
                    client.config_set("hash-max-listpack-entries", need_entries)
            except redis.ResponseError as exc:
                log.warning(
                    "shard %s: cannot raise hash-max-listpack-* (%s); rows will use more memory", self.names[shard], exc
                )
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                raise ShardUnavailable(f"shard {self.names[shard]} unavailable: {exc}") from None
