"""The Redis backend: rows in hash buckets on N independent Redis shards, versioned pushes.

Layout (keys start with the namespace, ``ps`` by default):

* every shard: ``ps:b:<table>:<bucket>`` HASH id -> packed row (vector + optimizer state).
  Many rows per hash keep Redis' compact listpack encoding, which is what holds memory per
  row near the raw bytes (one key per row costs ~1.5x). ``ps:applied`` is the last version
  this shard applied; ``ps:log:<version>:<writer>`` holds the rows this shard got in that
  version (a string with a TTL of the log retention): the delta log behind roll-forward,
  ``changed_since``, incremental snapshots and replicas.
* shard 0 (the coordinator) also holds ``ps:version`` (last committed version), ``ps:commits``
  (a stream: version -> writer token and commit time, trimmed to the retention),
  ``ps:floor`` (the log is complete after this version), ``ps:lock`` and ``ps:layout``.

A push (under the lock) stages its rows into every shard's log, commits by bumping
``ps:version`` on the coordinator (a Lua script that checks the writer still holds the lock:
the single commit point), then applies on every shard: ``applied = "4>5"`` (running), the
rows, ``applied = "5"``. A writer that dies after committing leaves its rows in the logs; the
next writer or reader rolls the shard forward from the log. Readers read each shard between
two reads of ``applied`` (a seqlock: equal values, no ">", mean no apply ran) and accept only
when every shard they read is at the same version, waiting or rolling forward otherwise. So a
pull returns the rows of exactly one committed version: all of a push or none of it.

The hot paths (pull, apply) speak RESP over plain sockets, pipelined; found rows are sliced
from the receive buffer with numpy, anything else is parsed by hiredis. The rest uses redis-py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import hiredis
import numpy as np
import redis

from paramserver.base import BaseStore, Encoded
from paramserver.rows import (
    LogTrimmed,
    ParamServerError,
    ShardUnavailable,
    TableConfig,
    TableMismatch,
    latest_per_id,
    route_hash,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

COMMIT_LUA = """
-- KEYS: lock, version, commits, floor   ARGV: token, version, now, source_time, retention_s
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('PSLOCK the push lock was lost before commit (push took longer than the lock lease)')
end
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
local v = tonumber(ARGV[2])
if cur >= v then
  return redis.error_reply('PSVERSION version ' .. v .. ' is not newer than the committed ' .. cur)
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('XADD', KEYS[3], ARGV[2] .. '-0', 'tok', ARGV[1], 't', ARGV[3], 'src_t', ARGV[4])
-- retention: drop commits older than retention_s, a few per commit, never the newest
local cutoff = tonumber(ARGV[3]) - tonumber(ARGV[5])
local old = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 64)
local floor = nil
local keep = nil
for i = 1, #old - 1 do
  local fields = old[i][2]
  local t = nil
  for j = 1, #fields, 2 do if fields[j] == 't' then t = tonumber(fields[j + 1]) end end
  if t == nil or t >= cutoff then break end
  floor = old[i][1]
  keep = old[i + 1][1]
end
if floor then
  redis.call('XTRIM', KEYS[3], 'MINID', keep)
  redis.call('SET', KEYS[4], string.match(floor, '^(%d+)'))
end
return 1
"""

UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _parse_url(url: str) -> tuple[str, int, int, str | None]:
    parsed = urlparse(url)
    if parsed.scheme != "redis" or not parsed.hostname:
        raise ParamServerError(f"expected a redis://host:port[/db] URL, got {url!r}")
    db = int(parsed.path.lstrip("/") or 0) if parsed.path.lstrip("/").isdigit() or not parsed.path.lstrip("/") else -1
    if db < 0:
        raise ParamServerError(f"bad database number in {url!r}")
    return parsed.hostname, parsed.port or 6379, db, unquote(parsed.password) if parsed.password else None


def _pack(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


class _Raw:
    """One RESP connection for pipelined hot-path traffic; replies parsed by hiredis."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.host, self.port, self.db, self.password = _parse_url(url)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self.lock = threading.Lock()

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None

    def _connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._reader = sock, hiredis.Reader()
        setup = []
        if self.password:
            setup.append(_pack(b"AUTH", self.password.encode()))
        if self.db:
            setup.append(_pack(b"SELECT", str(self.db).encode()))
        if setup:
            for reply in self._exchange(b"".join(setup), len(setup)):
                if isinstance(reply, hiredis.ReplyError):
                    raise ShardUnavailable(f"shard {self.url}: {reply}")

    def _send(self, payload: bytes) -> socket.socket:
        """Send ``payload`` on the connection, opening it first if needed (the caller holds the lock)."""
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        self._sock.sendall(payload)
        return self._sock

    def _exchange(self, payload: bytes, count: int) -> list:
        assert self._sock is not None
        self._sock.sendall(payload)
        replies: list = []
        reader = self._reader
        while len(replies) < count:
            data = self._sock.recv(1 << 20)
            if not data:
                raise ConnectionError("connection closed by the server")
            reader.feed(data)
            while True:
                reply = reader.gets()
                if reply is False:
                    break
                replies.append(reply)
        return replies

    def call_rows(self, payload: bytes, n: int, row_bytes: int) -> tuple[Any, np.ndarray, np.ndarray, Any]:
        """Run ``GET x; HGET ... (n times); GET x`` and return (first reply, rows, found mask, last reply).

        Fast path: when every HGET finds a row of ``row_bytes`` bytes the replies are fixed-size
        records, checked and sliced with numpy straight from the receive buffer (no Python
        object per row). Anything else (a missing row, an error reply) falls back to hiredis.
        """
        head = b"$%d\r\n" % row_bytes
        stride = len(head) + row_bytes + 2
        with self.lock:
            try:
                sock = self._send(payload)
                buf = bytearray(n * stride + 512)
                view = memoryview(buf)
                filled = 0
                start = -1  # offset of the first HGET reply, once the first reply is parsed
                first: Any = None
                checked = 0
                while True:
                    if filled == len(buf):
                        break  # more data than rows of this size can be: not the fast path
                    got = sock.recv_into(view[filled:])
                    if not got:
                        raise ConnectionError("connection closed by the server")
                    filled += got
                    if start < 0:
                        parsed = _parse_bulk(buf, 0, filled)
                        if parsed is None:
                            continue
                        if parsed is False:
                            break
                        first, start = parsed
                    complete = min(n, (filled - start) // stride)
                    if complete > checked:
                        block = np.frombuffer(buf, np.uint8, count=complete * stride, offset=start).reshape(
                            complete, stride
                        )
                        fresh = block[checked:]
                        ok = bool(
                            (fresh[:, : len(head)] == np.frombuffer(head, np.uint8)).all()
                            and (fresh[:, -2:] == np.frombuffer(b"\r\n", np.uint8)).all()
                        )
                        del block, fresh
                        if not ok:
                            break
                        checked = complete
                    if checked < n:  # the reply being received must begin like a row of this size
                        at = start + checked * stride
                        partial = bytes(view[at : min(filled, at + len(head))])
                        if not head.startswith(partial):
                            break
                        continue
                    if checked == n:
                        parsed = _parse_bulk(buf, start + n * stride, filled)
                        if parsed is None:
                            continue
                        if parsed is False or parsed[1] != filled:
                            break
                        rows = np.frombuffer(bytes(view[start : start + n * stride]), np.uint8).reshape(n, stride)
                        return first, rows[:, len(head) : len(head) + row_bytes], np.ones(n, dtype=bool), parsed[0]
                # slow path: let hiredis parse what came so far and the rest
                reader = self._reader
                reader.feed(bytes(view[:filled]))
                del view
                replies: list = []
                while True:
                    reply = reader.gets()
                    if reply is False:
                        if len(replies) >= n + 2:
                            break
                        data = sock.recv(1 << 20)
                        if not data:
                            raise ConnectionError("connection closed by the server")
                        reader.feed(data)
                        continue
                    replies.append(reply)
                    if len(replies) == n + 2:
                        break
            except (OSError, ConnectionError, hiredis.ProtocolError) as exc:
                self.close()
                raise ShardUnavailable(f"shard {self.url} unavailable: {exc or type(exc).__name__}") from None
        _check(replies, self.url)
        found = np.array([r is not None for r in replies[1:-1]], dtype=bool)
        rows = np.zeros((n, row_bytes), np.uint8)
        if found.any():
            blob = b"".join(r for r in replies[1:-1] if r is not None)
            if len(blob) != int(found.sum()) * row_bytes:
                raise ParamServerError(f"shard {self.url}: stored rows are not {row_bytes} bytes long")
            rows[found] = np.frombuffer(blob, np.uint8).reshape(-1, row_bytes)
        return replies[0], rows, found, replies[-1]

    def call_lines(self, payload: bytes, lines: int) -> None:
        """Run commands whose replies are all one-line (status, integer, error) and expect ``lines`` of them.

        n pipelined HSETs answer with n short lines; counting CRLFs in C is far
        cheaper than building a Python object per reply. An error line fails the call and
        drops the connection, so a half-read reply stream cannot confuse the next call.
        """
        with self.lock:
            try:
                sock = self._send(payload)
                buf = bytearray()
                seen = 0
                while seen < lines:
                    data = sock.recv(1 << 20)
                    if not data:
                        raise ConnectionError("connection closed by the server")
                    scan_from = max(0, len(buf) - 1)
                    buf += data
                    seen += buf.count(b"\r\n", scan_from)
                    if buf[:1] == b"-" or b"\r\n-" in buf[max(0, scan_from - 1) :]:
                        at = 0 if buf[:1] == b"-" else buf.find(b"\r\n-", max(0, scan_from - 1)) + 2
                        message = bytes(buf[at + 1 : buf.find(b"\r\n", at)]).decode(errors="replace")
                        self.close()
                        raise ParamServerError(f"shard {self.url}: {message}")
                if seen != lines or not buf.endswith(b"\r\n"):
                    self.close()
                    raise ParamServerError(f"shard {self.url}: unexpected reply ({seen} lines, expected {lines})")
            except (OSError, ConnectionError, hiredis.ProtocolError) as exc:
                self.close()
                raise ShardUnavailable(f"shard {self.url} unavailable: {exc or type(exc).__name__}") from None

    def call(self, payload: bytes, count: int) -> list:
        """Send pipelined commands, return their ``count`` replies (errors as hiredis.ReplyError values)."""
        with self.lock:
            try:
                if self._sock is None:
                    self._connect()
                return self._exchange(payload, count)
            except (OSError, ConnectionError, hiredis.ProtocolError) as exc:
                self.close()
                raise ShardUnavailable(f"shard {self.url} unavailable: {exc or type(exc).__name__}") from None


def _parse_bulk(buf: bytearray, pos: int, end: int) -> tuple[bytes | None, int] | None | bool:
    """One RESP bulk string at ``pos``: (value, next position), None when incomplete, False when not a bulk."""
    if end - pos < 1:
        return None
    if buf[pos] != 0x24:  # "$"
        return False
    line_end = buf.find(b"\r\n", pos, end)
    if line_end < 0:
        return None
    length = int(buf[pos + 1 : line_end])
    if length < 0:
        return None, line_end + 2
    stop = line_end + 2 + length
    if stop + 2 > end:
        return None
    return bytes(buf[line_end + 2 : stop]), stop + 2


def _pack_entry(tables: list[tuple[str, np.ndarray, np.ndarray]]) -> bytes:
    """One shard's rows of one version: per table, name length, name, row count, row size, ids, rows."""
    parts = []
    for name, ids, data in tables:
        encoded = name.encode()
        parts += [
            len(encoded).to_bytes(2, "little"),
            encoded,
            len(ids).to_bytes(4, "little"),
            data.shape[1].to_bytes(4, "little"),
            ids.astype("<i8").tobytes(),
            data.tobytes(),
        ]
    return b"".join(parts)


def _unpack_entry(blob: bytes) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    pos = 0
    while pos < len(blob):
        size = int.from_bytes(blob[pos : pos + 2], "little")
        name = blob[pos + 2 : pos + 2 + size].decode()
        pos += 2 + size
        n = int.from_bytes(blob[pos : pos + 4], "little")
        row_bytes = int.from_bytes(blob[pos + 4 : pos + 8], "little")
        pos += 8
        ids = np.frombuffer(blob, "<i8", count=n, offset=pos).astype(np.int64)
        pos += 8 * n
        yield name, ids, np.frombuffer(blob, np.uint8, count=n * row_bytes, offset=pos).reshape(n, row_bytes)
        pos += n * row_bytes


def _applied(value: bytes | None) -> tuple[int, int | None]:
    """A shard's ``applied`` value: (last complete version, version being applied or None)."""
    if not value:
        return 0, None
    done, sep, pending = value.partition(b">")
    return int(done), (int(pending) if sep else None)


def _check(replies: Sequence[Any], url: str) -> None:
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise ParamServerError(f"shard {url}: {reply}")
        if isinstance(reply, list):
            _check(reply, url)


@dataclass(frozen=True)
class _Lock:
    token: str
    version: int  # the committed version when the lock was taken


class RedisStore(BaseStore):
    def __init__(
        self,
        shards: list[str],
        tables: list[TableConfig] | None = None,
        *,
        namespace: str = "ps",
        rows_per_bucket: int = 24,
        timeout: float = 5.0,
        lock_ttl_s: float = 30.0,
        lock_wait_s: float = 60.0,
        log_retention_s: float = 300.0,
        configure_servers: bool = True,
    ) -> None:
        if not shards:
            raise ParamServerError("the redis backend needs at least one shard URL")
        self.urls = list(shards)
        self.ns = namespace
        self.rows_per_bucket = rows_per_bucket
        self.timeout = timeout
        self.lock_ttl_s, self.lock_wait_s, self.log_retention_s = lock_ttl_s, lock_wait_s, log_retention_s
        for url in self.urls:
            _parse_url(url)
        self._clients = [
            redis.Redis.from_url(u, socket_timeout=timeout, socket_connect_timeout=timeout) for u in self.urls
        ]
        self._raw = [_Raw(u, timeout) for u in self.urls]
        self._pool = (
            ThreadPoolExecutor(max_workers=len(self.urls), thread_name_prefix="ps-shard")
            if len(self.urls) > 1
            else None
        )
        self.k_applied = f"{namespace}:applied"
        self.k_version = f"{namespace}:version"
        self.k_commits = f"{namespace}:commits"
        self.k_lock = f"{namespace}:lock"
        self.k_layout = f"{namespace}:layout"
        self.k_floor = f"{namespace}:floor"
        self._commit_script = self._clients[0].register_script(COMMIT_LUA)
        self._unlock_script = self._clients[0].register_script(UNLOCK_LUA)
        self.tables = {}
        self.buckets: dict[str, int] = {}
        self._sync_layout(tables or [])
        if configure_servers:
            self._configure_servers()

    # ------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def _guard(self, shard: int) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise ShardUnavailable(f"shard {self.urls[shard]} unavailable: {exc}") from None
        except redis.ResponseError as exc:
            raise ParamServerError(f"shard {self.urls[shard]}: {exc}") from None

    def _each(self, fn: Callable[[int], T], shards: Sequence[int]) -> list[T]:
        if self._pool is None or len(shards) <= 1:
            return [fn(s) for s in shards]
        return list(self._pool.map(fn, shards))

    def close(self) -> None:
        for raw in self._raw:
            raw.close()
        for client in self._clients:
            client.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def ping(self, shard: int = 0) -> bool:
        try:
            return self._raw[shard].call(_pack(b"PING"), 1)[0] in (b"PONG", "PONG")
        except ShardUnavailable:
            return False

    def _bucket_key(self, table: str, bucket: int) -> bytes:
        return f"{self.ns}:b:{table}:".encode() + int(bucket).to_bytes(4, "big")

    def _commands(
        self, verb: bytes, table: str, buckets: np.ndarray, ids: np.ndarray, data: np.ndarray | None = None
    ) -> bytes:
        """``HGET key field`` (or ``HSET key field row``) for every row, built in one vectorized pass.

        Keys are ``<ns>:b:<table>:`` + the bucket as 4 big-endian bytes and fields the id as 8
        little-endian bytes: every command has the same length, so numpy lays them out at once
        (formatting thousands of commands in Python costs more than Redis takes to run them).
        A binary 8-byte field takes the same listpack space as Redis' integer encoding.
        """
        prefix = f"{self.ns}:b:{table}:".encode()
        nargs = 3 if data is None else 4
        head = b"*%d\r\n$4\r\n%b\r\n$%d\r\n%b" % (nargs, verb, len(prefix) + 4, prefix)
        mid = b"\r\n$8\r\n"
        fields = [("head", f"S{len(head)}"), ("bucket", ">u4"), ("mid", f"S{len(mid)}"), ("id", "<i8")]
        if data is None:
            fields.append(("end", "S2"))
        else:
            row_head = b"\r\n$%d\r\n" % data.shape[1]
            fields += [("rowhead", f"S{len(row_head)}"), ("row", "u1", (data.shape[1],)), ("end", "S2")]
        cmds = np.empty(len(ids), dtype=np.dtype(fields))
        cmds["head"], cmds["bucket"], cmds["mid"], cmds["id"], cmds["end"] = head, buckets, mid, ids, b"\r\n"
        if data is not None:
            cmds["rowhead"], cmds["row"] = row_head, data
        return cmds.tobytes()

    def _route(self, config: TableConfig, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = route_hash(config.name, ids)
        shard = (h % np.uint64(len(self.urls))).astype(np.int64)
        bucket = ((h >> np.uint64(32)) % np.uint64(self.buckets[config.name])).astype(np.int64)
        return shard, bucket

    # ------------------------------------------------------------------ layout
    def _sync_layout(self, tables: list[TableConfig]) -> None:
        mine = {}
        for cfg in tables:
            if cfg.name in mine and mine[cfg.name] != cfg:
                raise TableMismatch(f"table {cfg.name} given twice with different configs")
            buckets = max(1, -(-cfg.capacity // (self.rows_per_bucket * len(self.urls))))
            mine[cfg.name] = {**cfg.to_dict(), "buckets": buckets}
        with self._guard(0), self._clients[0].pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.k_layout)
                    raw = pipe.get(self.k_layout)
                    layout = json.loads(raw) if raw else {"shards": len(self.urls), "tables": {}}
                    if layout["shards"] != len(self.urls):
                        raise TableMismatch(
                            f"the store in {self.urls[0]} (namespace {self.ns}) has {layout['shards']} shards, "
                            f"this client has {len(self.urls)}: resharding goes through snapshot + restore"
                        )
                    changed = False
                    for name, spec in mine.items():
                        have = layout["tables"].get(name)
                        if have is None:
                            layout["tables"][name] = spec
                            changed = True
                            continue
                        keys = ("dim", "state_dim", "storage_dtype", "init_std", "seed")
                        if any(have[k] != spec[k] for k in keys):
                            raise TableMismatch(
                                f"table {name} is stored as {[have[k] for k in keys]}, this client asks for "
                                f"{[spec[k] for k in keys]} ({', '.join(keys)})"
                            )
                    if changed:
                        pipe.multi()
                        pipe.set(self.k_layout, json.dumps(layout))
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

    def _configure_servers(self) -> None:
        """Raise the listpack limits so buckets stay compact (Redis' defaults: 64-byte values, 128 entries)."""
        if not self.tables:
            return
        need_value = max(cfg.row_bytes for cfg in self.tables.values()) + 16
        need_entries = max(512, 8 * self.rows_per_bucket)
        for shard, client in enumerate(self._clients):
            try:
                current = client.config_get("hash-max-listpack-*")
                if int(current.get("hash-max-listpack-value", 0)) < need_value:
                    client.config_set("hash-max-listpack-value", need_value)
                if int(current.get("hash-max-listpack-entries", 0)) < need_entries:
                    client.config_set("hash-max-listpack-entries", need_entries)
            except redis.ResponseError as exc:
                log.warning(
                    "shard %s: cannot raise hash-max-listpack-* (%s); rows will use more memory", self.urls[shard], exc
                )
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                raise ShardUnavailable(f"shard {self.urls[shard]} unavailable: {exc}") from None

    # ------------------------------------------------------------------ versions
    def version(self) -> int:
        with self._guard(0):
            return int(self._clients[0].get(self.k_version) or 0)

    def applied_versions(self) -> list[int]:
        """The last version each shard applied completely."""

        def one(s: int) -> int:
            with self._guard(s):
                return _applied(self._clients[s].get(self.k_applied))[0]

        return self._each(one, range(len(self.urls)))

    # ------------------------------------------------------------------ reads
    def _read_shard(self, shard: int, body: bytes, n: int, row_bytes: int) -> tuple[int, np.ndarray, np.ndarray]:
        get_applied = _pack(b"GET", self.k_applied.encode())
        payload = get_applied + body + get_applied
        waited = 0.0
        for attempt in range(1000):
            before, rows, found, after = self._raw[shard].call_rows(payload, n, row_bytes)
            version, pending = _applied(before)
            if before == after and pending is None:  # no apply ran during the read: one version
                return version, rows, found
            if pending is not None:  # an apply is running: wait for it, or finish it if its writer is gone
                if waited > max(1.0, self.timeout):
                    self._roll_forward(shard, pending)
                pause = min(0.0005 * (attempt + 1), 0.01)
                time.sleep(pause)
                waited += pause
        raise ParamServerError(f"shard {self.urls[shard]}: could not read between applies after 1000 tries")

    def _read(self, config: TableConfig, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        shard_of, bucket_of = self._route(config, ids)
        groups: dict[int, tuple[np.ndarray, bytes]] = {}
        for shard in np.unique(shard_of).tolist():
            idx = np.flatnonzero(shard_of == shard)
            groups[shard] = (idx, self._commands(b"HGET", config.name, bucket_of[idx], ids[idx]))

        def read(shard: int) -> tuple[int, np.ndarray, np.ndarray]:
            return self._read_shard(shard, groups[shard][1], len(groups[shard][0]), config.row_bytes)

        shards = list(groups)
        results = dict(zip(shards, self._each(read, shards)))
        for attempt in range(40):
            target = max(r[0] for r in results.values())
            behind = [s for s, r in results.items() if r[0] < target]
            if not behind:
                break
            if attempt < 6:  # the writer is most likely applying right now: give it a moment
                time.sleep(0.001 * (2**attempt))
            else:
                for shard in behind:
                    self._roll_forward(shard, target)
            results.update(zip(behind, self._each(read, behind)))
        else:
            raise ParamServerError("could not read one consistent version across shards (writes too frequent)")
        if len(groups) == 1:
            _, rows, found = results[shards[0]]
            return rows, found, target
        data = np.empty((len(ids), config.row_bytes), np.uint8)
        found_all = np.empty(len(ids), dtype=bool)
        for shard, (idx, _) in groups.items():
            _, rows, found = results[shard]
            data[idx] = rows
            found_all[idx] = found
        return data, found_all, target

    # ------------------------------------------------------------------ writes
    @contextlib.contextmanager
    def _locked(self) -> Iterator[_Lock]:
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self.lock_wait_s
        pause = 0.001
        # take the lock and read the committed version in one round trip
        lease_ms = b"%d" % int(self.lock_ttl_s * 1000)
        payload = _pack(b"SET", self.k_lock.encode(), token.encode(), b"NX", b"PX", lease_ms) + _pack(
            b"GET", self.k_version.encode()
        )
        while True:
            taken, version = self._raw[0].call(payload, 2)
            _check([taken, version], self.urls[0])
            if taken is not None:
                break
            if time.monotonic() > deadline:
                raise ParamServerError(
                    f"push lock busy for more than {self.lock_wait_s:.0f}s (another writer holds {self.k_lock})"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        try:
            yield _Lock(token, int(version or 0))
        finally:
            with contextlib.suppress(ParamServerError), self._guard(0):
                self._unlock_script(keys=[self.k_lock], args=[token])

    def _write(self, lock: _Lock, encoded: Encoded, version: int | None = None, source_time: float = 0.0) -> int:
        committed = lock.version  # read with the lock: only lock holders change it
        new = committed + 1 if version is None else int(version)
        if new <= committed:
            raise ParamServerError(f"version {new} is not newer than the committed {committed}")
        # split rows by shard
        per_shard: list[list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in self.urls]
        for name, (ids, data) in encoded.items():
            if len(ids) == 0:
                continue
            shard_of, bucket_of = self._route(self.tables[name], ids)
            for shard in np.unique(shard_of).tolist():
                idx = np.flatnonzero(shard_of == shard)
                per_shard[shard].append((name, ids[idx], bucket_of[idx], data[idx]))
        token = lock.token.encode()

        log_ttl_ms = b"%d" % int(1000 * max(self.log_retention_s, 2 * self.lock_ttl_s, 60.0))

        def stage(shard: int) -> None:
            # the log entry: this shard's rows of the new version, under a key naming version and writer
            blob = _pack_entry([(name, ids, data) for name, ids, _, data in per_shard[shard]])
            payload = _pack(b"GET", self.k_applied.encode()) + _pack(
                b"SET", self._log_key(new, token), blob, b"PX", log_ttl_ms
            )
            applied, entry = self._raw[shard].call(payload, 2)
            _check([applied, entry], self.urls[shard])
            done, pending = _applied(applied)
            if done < committed or pending is not None:  # a writer died during or before its apply: finish it
                self._roll_forward(shard, committed)

        self._each(stage, range(len(self.urls)))
        with self._guard(0):
            try:
                self._commit_script(
                    keys=[self.k_lock, self.k_version, self.k_commits, self.k_floor],
                    args=[lock.token, new, repr(time.time()), repr(source_time), self.log_retention_s],
                )
            except redis.ResponseError as exc:
                raise ParamServerError(f"push not committed, nothing written: {exc}") from None

        def apply(shard: int) -> None:
            # a seqlock instead of MULTI/EXEC (which costs ~40% more): "committed>new" marks the apply
            # as running, readers retry until the plain "new" is back; if this writer dies half-way,
            # the marker stays and the next reader or writer re-applies the version from the log
            cmds = [_pack(b"SET", self.k_applied.encode(), b"%d>%d" % (committed, new))]
            count = 0
            for name, ids, buckets, data in per_shard[shard]:
                cmds.append(self._commands(b"HSET", name, buckets, ids, data))
                count += len(ids)
            cmds.append(_pack(b"SET", self.k_applied.encode(), b"%d" % new))
            self._raw[shard].call_lines(b"".join(cmds), count + 2)  # +OK, n HSET integers, +OK

        self._each(apply, range(len(self.urls)))
        return new

    def write_version(self, version: int, encoded: Encoded, source_time: float) -> int:
        """Apply rows as the given (newer) version: how a replica mirrors its source's versions."""
        with self._locked() as lock:
            return self._write(lock, encoded, version=version, source_time=source_time)

    # ------------------------------------------------------------------ log
    def _commit_tokens(self, after: int, upto: int) -> dict[int, bytes]:
        with self._guard(0):
            entries = self._clients[0].xrange(self.k_commits, f"{after + 1}-0", f"{upto}-0")
        return {int(eid.split(b"-")[0]): fields[b"tok"] for eid, fields in entries}

    def _log_key(self, version: int, token: bytes) -> bytes:
        return b"%b:log:%d:%b" % (self.ns.encode(), version, token)

    def _log_entries(self, shard: int, tokens: dict[int, bytes]) -> dict[int, bytes]:
        """The log entries (packed rows) of a shard for the committed versions in ``tokens`` that it still holds."""
        versions = sorted(tokens)
        found: dict[int, bytes] = {}
        with self._guard(shard):
            for start in range(0, len(versions), 64):
                chunk = versions[start : start + 64]
                values = self._clients[shard].mget([self._log_key(v, tokens[v]) for v in chunk])
                found.update((v, blob) for v, blob in zip(chunk, values) if blob is not None)
        return found

    def _catch_up(self, version: int) -> None:
        for shard in range(len(self.urls)):
            self._roll_forward(shard, version)

    def _roll_forward(self, shard: int, target: int) -> None:
        """Apply committed versions up to ``target`` that ``shard`` has not applied (their writer stalled or died)."""
        client = self._clients[shard]
        with self._guard(shard):
            while True:
                raw_applied = client.get(self.k_applied)
                applied, pending = _applied(raw_applied)
                if pending is not None:
                    target = max(target, pending)
                elif applied >= target:
                    return
                tokens = self._commit_tokens(applied, target)
                if not tokens:
                    raise ParamServerError(f"shard {self.urls[shard]}: no commit record after version {applied}")
                v = min(tokens)
                entry = self._log_entries(shard, {v: tokens[v]}).get(v)
                if entry is None:
                    raise ParamServerError(
                        f"shard {self.urls[shard]}: the log entry of committed version {v} "
                        "is missing; restore from a snapshot"
                    )
                with client.pipeline() as pipe:
                    try:
                        pipe.watch(self.k_applied)
                        if pipe.get(self.k_applied) != raw_applied:
                            continue
                        pipe.multi()
                        for name, ids, data in self._parse_entry(entry):
                            _, buckets = self._route(self.tables[name], ids)
                            for i, b, row in zip(ids.tolist(), buckets.tolist(), data):
                                pipe.hset(
                                    self._bucket_key(name, b), i.to_bytes(8, "little", signed=True), row.tobytes()
                                )
                        pipe.set(self.k_applied, v)
                        pipe.execute()
                    except redis.WatchError:
                        continue

    def _parse_entry(self, blob: bytes) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for name, ids, data in _unpack_entry(blob):
            if name in self.tables:
                if data.shape[1] != self.tables[name].row_bytes:
                    raise TableMismatch(
                        f"log rows of {name} have {data.shape[1]} bytes, expected {self.tables[name].row_bytes}"
                    )
                yield name, ids, data

    def _changes(self, since: int) -> tuple[int, Encoded]:
        upto = self.version()
        if since >= upto:
            return upto, {}
        with self._guard(0):
            floor = int(self._clients[0].get(self.k_floor) or 0)
        if since < floor:
            raise LogTrimmed(
                f"changes since version {since} are no longer in the log (it starts after version "
                f"{floor}; retention {self.log_retention_s:.0f}s): take a full snapshot"
            )
        tokens = self._commit_tokens(since, upto)
        per_table: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for shard in range(len(self.urls)):
            entries = self._log_entries(shard, tokens)
            missing = sorted(set(tokens) - set(entries))
            if missing:
                raise LogTrimmed(f"shard {self.urls[shard]}: log entries of versions {missing[:5]} are gone")
            for v in sorted(entries):
                for name, ids, data in self._parse_entry(entries[v]):
                    per_table.setdefault(name, []).append((ids, data))
        out: Encoded = {}
        for name, chunks in per_table.items():
            out[name] = latest_per_id(np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]))
        return upto, out

    # ------------------------------------------------------------------ scan and load
    def _scan(self, config: TableConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for shard, client in enumerate(self._clients):
            with self._guard(shard):
                keys = list(client.scan_iter(match=f"{self.ns}:b:{config.name}:*", count=1000))
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

    def _delete_rows(self) -> None:
        for shard, client in enumerate(self._clients):
            with self._guard(shard):
                batch = []
                for key in itertools.chain(
                    client.scan_iter(match=f"{self.ns}:b:*", count=1000),
                    client.scan_iter(match=f"{self.ns}:log:*", count=1000),
                ):
                    batch.append(key)
                    if len(batch) >= 1000:
                        client.unlink(*batch)
                        batch = []
                if batch:
                    client.unlink(*batch)

    def _load(self, version: int, encoded: Encoded) -> None:
        """Replace every row (restore). Readers during a restore may see a mix: restore offline."""
        with self._locked():
            self._delete_rows()
            for name, (ids, data) in encoded.items():
                shard_of, bucket_of = self._route(self.tables[name], ids)
                for shard in np.unique(shard_of).tolist():
                    idx = np.flatnonzero(shard_of == shard)
                    for start in range(0, len(idx), 5000):
                        chunk = idx[start : start + 5000]
                        body = self._commands(b"HSET", name, bucket_of[chunk], ids[chunk], data[chunk])
                        _check(self._raw[shard].call(body, len(chunk)), self.urls[shard])
            for shard, client in enumerate(self._clients):
                with self._guard(shard):
                    client.set(self.k_applied, version)
            with self._guard(0):
                client0 = self._clients[0]
                client0.delete(self.k_commits)
                client0.xadd(
                    self.k_commits, {"tok": "restore", "t": repr(time.time()), "src_t": "0"}, id=f"{max(version, 1)}-0"
                )
                client0.set(self.k_version, version)
                client0.set(self.k_floor, version)

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        """Version, log floor, retained log versions, lock, and per shard: applied version, memory, keys."""
        shards = []
        for shard, client in enumerate(self._clients):
            entry: dict[str, Any] = {"url": self.urls[shard], "up": False}
            try:
                info = client.info("memory")
                entry.update(
                    up=True,
                    applied=_applied(client.get(self.k_applied))[0],
                    used_memory=int(info["used_memory"]),
                    keys=int(client.dbsize()),
                )
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                entry["error"] = str(exc)
            shards.append(entry)
        result: dict[str, Any] = {"shards": shards, "tables": sorted(self.tables)}
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, OSError):
            client0 = self._clients[0]
            result.update(
                version=int(client0.get(self.k_version) or 0),
                floor=int(client0.get(self.k_floor) or 0),
                locked=bool(client0.exists(self.k_lock)),
                log_versions=int(client0.xlen(self.k_commits)),
            )
            last = client0.xrevrange(self.k_commits, "+", "-", count=1)
            if last:
                result["commit_time"] = float(last[0][1][b"t"])
                result["source_commit_time"] = float(last[0][1].get(b"src_t", b"0"))
        return result

    def commit_time(self, version: int) -> float | None:
        """When ``version`` (or the first commit after it) was committed in this store."""
        with self._guard(0):
            entries = self._clients[0].xrange(self.k_commits, f"{version}-0", "+", count=1)
        return float(entries[0][1][b"t"]) if entries else None
