"""The Redis backend's version protocol: rows of one committed version, all of a push or none of it.

Where rows live (shards, hash buckets, the table layout) is ``redis_shards``; what the keys and
values look like is ``redis_format``; the hot-path wire client is ``resp``. This module is the
protocol on top of them.

A push (under the lock) stages its rows into every shard's log, commits by bumping
``ps:version`` on the coordinator (a Lua script that checks the writer still holds the lock:
the single commit point), then applies on every shard: ``applied = "4>5"`` (running), the
rows, ``applied = "5"``. A writer that dies after committing leaves its rows in the logs; the
next writer or reader rolls the shard forward from the log. Readers read each shard between
two reads of ``applied`` (a seqlock: equal values, no ">", mean no apply ran) and accept only
when every shard they read is at the same version, waiting or rolling forward otherwise. So a
pull returns the rows of exactly one committed version: all of a push or none of it.

The hot paths (pull, apply) speak RESP over plain sockets, pipelined; the rest uses redis-py.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import redis

from core.settings import ParamServerSettings
from paramserver.base import BaseStore, Encoded
from paramserver.redis_format import (
    COMMIT_LUA,
    UNLOCK_LUA,
    Keys,
    applied_marker,
    applying_marker,
    pack_entry,
    parse_applied,
    unpack_entry,
)
from paramserver.redis_shards import Shards
from paramserver.resp import check_replies, pack
from paramserver.rows import (
    LogTrimmed,
    ParamServerError,
    TableConfig,
    TableMismatch,
    check_stage_name,
    latest_per_id,
)


def _default(name: str) -> Any:
    """The default of a RECSYS_PS_* setting: core/settings.py is the one place defaults are written."""
    return ParamServerSettings.model_fields[name].default


class StoreOptions(TypedDict):
    namespace: str
    rows_per_bucket: int
    timeout: float
    lock_ttl_s: float
    lock_wait_s: float
    log_retention_s: float
    connections_per_server: int


def store_options(settings: ParamServerSettings) -> StoreOptions:
    """The ``RedisStore`` options of the settings: the one place they are read from ``ParamServerSettings``."""
    return StoreOptions(
        namespace=settings.namespace,
        rows_per_bucket=settings.rows_per_bucket,
        timeout=settings.timeout_s,
        lock_ttl_s=settings.lock_ttl_s,
        lock_wait_s=settings.lock_wait_s,
        log_retention_s=settings.log_retention_s,
        connections_per_server=settings.connections_per_server,
    )


@dataclass(frozen=True)
class _Lock:
    token: str
    version: int  # the committed version when the lock was taken


class RedisStore(BaseStore):
    """A parameter store on N Redis shards (``shards``: their URLs, shard 0 coordinates).

    ``timeout`` is the socket timeout and how long a reader waits for a running apply before
    finishing it itself; the lock and retention options are those of ``ParamServerSettings``.
    """

    def __init__(
        self,
        shards: list[str],
        tables: list[TableConfig] | None = None,
        *,
        namespace: str = _default("namespace"),
        rows_per_bucket: int = _default("rows_per_bucket"),
        timeout: float = _default("timeout_s"),
        lock_ttl_s: float = _default("lock_ttl_s"),
        lock_wait_s: float = _default("lock_wait_s"),
        log_retention_s: float = _default("log_retention_s"),
        connections_per_server: int = _default("connections_per_server"),
        configure_servers: bool = True,
    ) -> None:
        if not shards:
            raise ParamServerError("the redis backend needs at least one shard URL")
        self.shards = Shards(shards, namespace, rows_per_bucket, timeout, connections_per_server)
        self.connections_per_server = connections_per_server
        self.urls = self.shards.urls
        self.names = self.shards.names
        self.keys: Keys = self.shards.keys
        self.timeout = timeout
        self.lock_ttl_s, self.lock_wait_s, self.log_retention_s = lock_ttl_s, lock_wait_s, log_retention_s
        self._commit_script = self.shards.clients[0].register_script(COMMIT_LUA)
        self._unlock_script = self.shards.clients[0].register_script(UNLOCK_LUA)
        # the layout's tables and bucket counts: the same dicts, kept current by shards.sync_layout
        self.tables = self.shards.tables
        self.buckets = self.shards.buckets
        self.shards.sync_layout(tables or [])
        if configure_servers:
            self.shards.configure_servers()

    @classmethod
    def from_settings(
        cls,
        settings: ParamServerSettings,
        tables: list[TableConfig] | None = None,
        *,
        shards: list[str] | None = None,
        timeout: float | None = None,
        configure_servers: bool = True,
    ) -> RedisStore:
        """The store of the settings' shards (or ``shards``), with every option from ``settings``."""
        options = store_options(settings)
        if timeout is not None:
            options["timeout"] = timeout
        return cls(
            list(settings.shards if shards is None else shards), tables, configure_servers=configure_servers, **options
        )

    def close(self) -> None:
        self.shards.close()

    def ping(self, shard: int = 0) -> bool:
        return self.shards.ping(shard)

    # ------------------------------------------------------------------ versions
    def version(self) -> int:
        with self.shards.guard(0):
            return int(self.shards.clients[0].get(self.keys.version) or 0)

    def applied_versions(self) -> list[int]:
        """The last version each shard applied completely."""

        def one(s: int) -> int:
            with self.shards.guard(s):
                return parse_applied(self.shards.clients[s].get(self.keys.applied))[0]

        return self.shards.each(one, range(len(self.urls)))

    # ------------------------------------------------------------------ reads
    def _read_shard(self, shard: int, body: bytes, n: int, row_bytes: int) -> tuple[int, np.ndarray, np.ndarray]:
        get_applied = pack(b"GET", self.keys.applied.encode())
        payload = get_applied + body + get_applied
        waited = 0.0
        for attempt in range(1000):
            before, rows, found, after = self.shards.resp[shard].call_rows(payload, n, row_bytes)
            version, pending = parse_applied(before)
            if before == after and pending is None:  # no apply ran during the read: one version
                return version, rows, found
            if pending is not None:  # an apply is running: wait for it, or finish it if its writer is gone
                if waited > max(1.0, self.timeout):
                    self._roll_forward(shard, pending)
                pause = min(0.0005 * (attempt + 1), 0.01)
                time.sleep(pause)
                waited += pause
        raise ParamServerError(f"shard {self.names[shard]}: could not read between applies after 1000 tries")

    def _read(self, config: TableConfig, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        shard_of, bucket_of = self.shards.route(config, ids)
        groups: dict[int, tuple[np.ndarray, bytes]] = {}
        for shard in np.unique(shard_of).tolist():
            idx = np.flatnonzero(shard_of == shard)
            groups[shard] = (idx, self.shards.commands(b"HGET", config.name, bucket_of[idx], ids[idx]))

        def read(shard: int) -> tuple[int, np.ndarray, np.ndarray]:
            return self._read_shard(shard, groups[shard][1], len(groups[shard][0]), config.row_bytes)

        shards = list(groups)
        results = dict(zip(shards, self.shards.each(read, shards)))
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
            results.update(zip(behind, self.shards.each(read, behind)))
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
        payload = pack(b"SET", self.keys.lock.encode(), token.encode(), b"NX", b"PX", lease_ms) + pack(
            b"GET", self.keys.version.encode()
        )
        while True:
            taken, version = self.shards.resp[0].call(payload, 2)
            check_replies([taken, version], self.names[0])
            if taken is not None:
                break
            if time.monotonic() > deadline:
                raise ParamServerError(
                    f"push lock busy for more than {self.lock_wait_s:.0f}s (another writer holds {self.keys.lock})"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        try:
            yield _Lock(token, int(version or 0))
        finally:
            with contextlib.suppress(ParamServerError), self.shards.guard(0):
                self._unlock_script(keys=[self.keys.lock], args=[token])

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
            shard_of, bucket_of = self.shards.route(self.tables[name], ids)
            for shard in np.unique(shard_of).tolist():
                idx = np.flatnonzero(shard_of == shard)
                per_shard[shard].append((name, ids[idx], bucket_of[idx], data[idx]))
        token = lock.token.encode()

        log_ttl_ms = b"%d" % int(1000 * max(self.log_retention_s, 2 * self.lock_ttl_s, 60.0))

        def stage(shard: int) -> None:
            # the log entry: this shard's rows of the new version, under a key naming version and writer
            blob = pack_entry([(name, ids, data) for name, ids, _, data in per_shard[shard]])
            payload = pack(b"GET", self.keys.applied.encode()) + pack(
                b"SET", self.keys.log(new, token), blob, b"PX", log_ttl_ms
            )
            applied, entry = self.shards.resp[shard].call(payload, 2)
            check_replies([applied, entry], self.names[shard])
            done, pending = parse_applied(applied)
            if done < committed or pending is not None:  # a writer died during or before its apply: finish it
                self._roll_forward(shard, committed)

        self.shards.each(stage, range(len(self.urls)))
        with self.shards.guard(0):
            try:
                self._commit_script(
                    keys=[self.keys.lock, self.keys.version, self.keys.commits, self.keys.floor],
                    args=[lock.token, new, repr(time.time()), repr(source_time), self.log_retention_s],
                )
            except redis.ResponseError as exc:
                raise ParamServerError(f"push not committed, nothing written: {exc}") from None

        def apply(shard: int) -> None:
            # a seqlock instead of MULTI/EXEC (which costs ~40% more): "committed>new" marks the apply
            # as running, readers retry until the plain "new" is back; if this writer dies half-way,
            # the marker stays and the next reader or writer re-applies the version from the log
            cmds = [pack(b"SET", self.keys.applied.encode(), applying_marker(committed, new))]
            count = 0
            for name, ids, buckets, data in per_shard[shard]:
                cmds.append(self.shards.commands(b"HSET", name, buckets, ids, data))
                count += len(ids)
            cmds.append(pack(b"SET", self.keys.applied.encode(), applied_marker(new)))
            self.shards.resp[shard].call_lines(b"".join(cmds), count + 2)  # +OK, n HSET integers, +OK

        self.shards.each(apply, range(len(self.urls)))
        return new

    def write_version(self, version: int, encoded: Encoded, source_time: float) -> int:
        """Apply rows as the given (newer) version: how a replica mirrors its source's versions."""
        with self._locked() as lock:
            return self._write(lock, encoded, version=version, source_time=source_time)

    # ------------------------------------------------------------------ log
    def _commit_tokens(self, after: int, upto: int) -> dict[int, bytes]:
        with self.shards.guard(0):
            entries = self.shards.clients[0].xrange(self.keys.commits, f"{after + 1}-0", f"{upto}-0")
        return {int(eid.split(b"-")[0]): fields[b"tok"] for eid, fields in entries}

    def _log_entries(self, shard: int, tokens: dict[int, bytes]) -> dict[int, bytes]:
        """The log entries (packed rows) of a shard for the committed versions in ``tokens`` that it still holds."""
        versions = sorted(tokens)
        found: dict[int, bytes] = {}
        with self.shards.guard(shard):
            for start in range(0, len(versions), 64):
                chunk = versions[start : start + 64]
                values = self.shards.clients[shard].mget([self.keys.log(v, tokens[v]) for v in chunk])
                found.update((v, blob) for v, blob in zip(chunk, values) if blob is not None)
        return found

    def _catch_up(self, version: int) -> None:
        for shard in range(len(self.urls)):
            self._roll_forward(shard, version)

    def _roll_forward(self, shard: int, target: int) -> None:
        """Apply committed versions up to ``target`` that ``shard`` has not applied (their writer stalled or died)."""
        client = self.shards.clients[shard]
        with self.shards.guard(shard):
            while True:
                raw_applied = client.get(self.keys.applied)
                applied, pending = parse_applied(raw_applied)
                if pending is not None:
                    target = max(target, pending)
                elif applied >= target:
                    return
                tokens = self._commit_tokens(applied, target)
                if not tokens:
                    raise ParamServerError(f"shard {self.names[shard]}: no commit record after version {applied}")
                v = min(tokens)
                entry = self._log_entries(shard, {v: tokens[v]}).get(v)
                if entry is None:
                    raise ParamServerError(
                        f"shard {self.names[shard]}: the log entry of committed version {v} "
                        "is missing; restore from a snapshot"
                    )
                with client.pipeline() as pipe:
                    try:
                        pipe.watch(self.keys.applied)
                        if pipe.get(self.keys.applied) != raw_applied:
                            continue
                        pipe.multi()
                        for name, ids, data in self._parse_entry(entry):
                            _, buckets = self.shards.route(self.tables[name], ids)
                            for i, b, row in zip(ids.tolist(), buckets.tolist(), data):
                                pipe.hset(
                                    self.keys.bucket(name, b), i.to_bytes(8, "little", signed=True), row.tobytes()
                                )
                        pipe.set(self.keys.applied, applied_marker(v))
                        pipe.execute()
                    except redis.WatchError:
                        continue

    def _parse_entry(self, blob: bytes) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for name, ids, data in unpack_entry(blob):
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
        with self.shards.guard(0):
            floor = int(self.shards.clients[0].get(self.keys.floor) or 0)
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
                raise LogTrimmed(f"shard {self.names[shard]}: log entries of versions {missing[:5]} are gone")
            for v in sorted(entries):
                for name, ids, data in self._parse_entry(entries[v]):
                    per_table.setdefault(name, []).append((ids, data))
        out: Encoded = {}
        for name, chunks in per_table.items():
            out[name] = latest_per_id(np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]))
        return upto, out

    # ------------------------------------------------------------------ scan and load
    def _scan(self, config: TableConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.shards.scan(config)

    def _load(self, version: int, encoded: Encoded) -> None:
        """Replace every row (restore). Readers during a restore may see a mix: restore offline."""
        with self._locked():
            self.shards.delete_rows()
            for name, (ids, data) in encoded.items():
                shard_of, bucket_of = self.shards.route(self.tables[name], ids)
                for shard in np.unique(shard_of).tolist():
                    idx = np.flatnonzero(shard_of == shard)
                    for start in range(0, len(idx), 5000):
                        chunk = idx[start : start + 5000]
                        body = self.shards.commands(b"HSET", name, bucket_of[chunk], ids[chunk], data[chunk])
                        check_replies(self.shards.resp[shard].call(body, len(chunk)), self.names[shard])
            for shard, client in enumerate(self.shards.clients):
                with self.shards.guard(shard):
                    client.set(self.keys.applied, applied_marker(version))
            with self.shards.guard(0):
                client0 = self.shards.clients[0]
                client0.delete(self.keys.commits)
                client0.xadd(
                    self.keys.commits,
                    {"tok": "restore", "t": repr(time.time()), "src_t": "0"},
                    id=f"{max(version, 1)}-0",
                )
                client0.set(self.keys.version, version)
                client0.set(self.keys.floor, version)

    # ------------------------------------------------------------------ staging areas
    def stage(self, name: str) -> RedisStore:
        name = check_stage_name(name)
        with self.shards.guard(0):
            self.shards.clients[0].sadd(self.keys.stages, name)
        return RedisStore(
            self.urls,
            list(self.tables.values()),
            namespace=self.keys.stage_namespace(name),
            rows_per_bucket=self.shards.rows_per_bucket,
            timeout=self.timeout,
            lock_ttl_s=self.lock_ttl_s,
            lock_wait_s=self.lock_wait_s,
            log_retention_s=self.log_retention_s,
            connections_per_server=self.connections_per_server,
            configure_servers=False,
        )

    def stages(self) -> list[str]:
        with self.shards.guard(0):
            return sorted(m.decode() for m in self.shards.clients[0].smembers(self.keys.stages))

    def drop_stage(self, name: str) -> bool:
        name = check_stage_name(name)
        self.shards.unlink_matching(f"{self.keys.stage_namespace(name)}:*")
        with self.shards.guard(0):
            return bool(self.shards.clients[0].srem(self.keys.stages, name))

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        """Version, log floor, log versions, lock, staging areas, and per shard: applied version, memory, keys."""
        shards = []
        for shard, client in enumerate(self.shards.clients):
            entry: dict[str, Any] = {"url": self.names[shard], "up": False}
            try:
                info = client.info("memory")
                entry.update(
                    up=True,
                    applied=parse_applied(client.get(self.keys.applied))[0],
                    used_memory=int(info["used_memory"]),
                    keys=int(client.dbsize()),
                )
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                entry["error"] = str(exc)
            shards.append(entry)
        result: dict[str, Any] = {"shards": shards, "tables": sorted(self.tables)}
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, OSError):
            client0 = self.shards.clients[0]
            result.update(
                version=int(client0.get(self.keys.version) or 0),
                floor=int(client0.get(self.keys.floor) or 0),
                locked=bool(client0.exists(self.keys.lock)),
                log_versions=int(client0.xlen(self.keys.commits)),
                stages=sorted(m.decode() for m in client0.smembers(self.keys.stages)),
            )
            last = client0.xrevrange(self.keys.commits, "+", "-", count=1)
            if last:
                result["commit_time"] = float(last[0][1][b"t"])
                result["source_commit_time"] = float(last[0][1].get(b"src_t", b"0"))
        return result

    def commit_time(self, version: int) -> float | None:
        """When ``version`` (or the first commit after it) was committed in this store."""
        with self.shards.guard(0):
            entries = self.shards.clients[0].xrange(self.keys.commits, f"{version}-0", "+", count=1)
        return float(entries[0][1][b"t"]) if entries else None

    def wait_for_commit(self, after: int, timeout_s: float) -> None:
        """Return once a version after ``after`` is committed, or after about ``timeout_s`` (a replicator's wait)."""
        with contextlib.suppress(redis.TimeoutError), self.shards.guard(0):
            self.shards.clients[0].xread(
                {self.keys.commits: f"{after}-0"}, count=1, block=max(1, int(timeout_s * 1000))
            )
