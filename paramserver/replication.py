"""Inference replicas: a delta-stream replicator and a failover reader.

Replication is by our own delta stream, not Redis REPLICAOF: the training copy's per-shard
log already holds every committed version's rows, so the replicator reads the rows changed
since the replica's version and writes them to the replica as ONE version carrying the
source's version number. That keeps each replica a consistent committed version of the
training copy (REPLICAOF would replicate each shard on its own, so a replica could hold half
a push), lets a replica have a different shard count than the training copy, and makes the
replica's applied version and lag directly readable. A replica that is new, or further behind
than the log retention, bootstraps from a snapshot and then follows the log.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.redact import redact_urls
from paramserver.base import read_manifest
from paramserver.redis_store import RedisStore
from paramserver.rows import (
    LogTrimmed,
    ParamServerError,
    ReplicasBehind,
    Rows,
    ShardUnavailable,
    TableConfig,
    UnknownTable,
)

log = logging.getLogger(__name__)


class Replicator:
    """Keeps ``replica`` at the training copy ``source``'s latest committed version."""

    def __init__(
        self, source: RedisStore, replica: RedisStore, poll_s: float = 0.05, snapshot_dir: str | Path | None = None
    ) -> None:
        self.source, self.replica = source, replica
        self.poll_s = poll_s
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        self.bootstraps = 0

    def refresh_tables(self) -> None:
        """Pick up tables the trainers added to the source since we started, and declare them on the replica."""
        known = set(self.source.tables)
        self.source.shards.sync_layout([])
        if set(self.source.tables) != known or set(self.replica.tables) != known:
            self.replica.shards.sync_layout(list(self.source.tables.values()))
            self.replica.shards.configure_servers()

    def bootstrap(self) -> int:
        """Restore the replica from a snapshot of the source (the given folder, or a fresh one)."""
        self.refresh_tables()
        if self.snapshot_dir is not None and read_manifest(self.snapshot_dir) is not None:
            version = self.replica.restore(self.snapshot_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="ps-bootstrap-") as tmp:
                self.source.snapshot(tmp)
                version = self.replica.restore(tmp)
        self.bootstraps += 1
        log.info("replica %s bootstrapped at version %d", self.replica.names, version)
        return version

    def step(self, wait_s: float | None = None) -> int | None:
        """Bring the replica up to date once; waits up to ``wait_s`` for a new commit. Returns the new version."""
        have, latest = self.replica.version(), self.source.version()
        if have > latest:  # the source was restored to an older checkpoint
            self.bootstrap()
            return self.replica.version()
        if have == latest:
            wait = self.poll_s if wait_s is None else wait_s
            if wait > 0:
                self.source.wait_for_commit(latest, wait)
            return None
        self.refresh_tables()
        try:
            upto, changes = self.source.changes(have)
        except LogTrimmed:
            self.bootstrap()
            return self.replica.version()
        if upto <= have:
            return None
        self.replica.write_version(upto, changes, self.source.commit_time(upto) or time.time())
        return upto

    def run(self, stop: threading.Event) -> None:
        """Follow the source until ``stop`` is set; survives source or replica outages by retrying."""
        while not stop.is_set():
            try:
                self.step()
            except (ShardUnavailable, ParamServerError) as exc:
                log.warning("replicator %s: %s; retrying", self.replica.names, exc)
                stop.wait(min(1.0, self.poll_s * 10))


def replica_status(
    source: RedisStore | None, replica_urls: list[str], timeout: float = 1.0, namespace: str = "ps"
) -> dict[str, Any]:
    """Applied version, versions behind and lag (seconds) of one replica against the training copy."""
    entry: dict[str, Any] = {"replica": ",".join(redact_urls(replica_urls)), "up": False}
    try:
        store = RedisStore(replica_urls, [], namespace=namespace, timeout=timeout, configure_servers=False)
    except ShardUnavailable as exc:
        entry["error"] = str(exc)
        return entry
    try:
        info = store.status()
        entry.update(up=all(s["up"] for s in info["shards"]), version=info.get("version", 0))
        if "commit_time" in info and info.get("source_commit_time"):
            entry["apply_delay_s"] = round(info["commit_time"] - info["source_commit_time"], 4)
        if source is not None:
            latest = source.version()
            entry["source_version"] = latest
            entry["behind"] = max(0, latest - entry["version"])
            lag = 0.0
            if latest > entry["version"]:
                first_missing = source.commit_time(entry["version"] + 1)
                lag = max(0.0, time.time() - first_missing) if first_missing else float("nan")
            entry["lag_s"] = round(lag, 4)
    finally:
        store.close()
    return entry


class FailoverReader:
    """Reads rows from the nearest healthy replica at an acceptable version; otherwise moves to the next.

    Each attempt is bounded by the store timeout (``ps_failover_timeout_s``) for the whole call,
    and concurrent reads use connections of their own (``RespPool``), so a frozen replica costs
    each read in flight at most one timeout; the first failure marks it down and later reads go
    to the next replica at once. A replica is *acceptable* when the version it answers with is at
    least ``floor``: the newest version this reader served, and what the caller requires
    (``require_version``, e.g. the champion's rows). A replica below it (one restarted empty
    answers version 0 with initial rows) is skipped like a down one; when none is acceptable the
    read raises ``ReplicasBehind``, never returns the older rows. A background probe re-checks
    skipped replicas every ``probe_s`` and returns reads to them once they answer at the floor.
    """

    def __init__(
        self, replicas: list[list[str]], tables: list[TableConfig], probe_s: float = 0.5, **store_options: Any
    ) -> None:
        if not replicas:
            raise ParamServerError("no inference replicas configured (RECSYS_PS_REPLICAS)")
        self.replicas = replicas
        self._tables = tables
        self._options = store_options
        self._stores: list[RedisStore | None] = [None] * len(replicas)
        self._down: list[bool] = [False] * len(replicas)
        self._behind: list[bool] = [False] * len(replicas)  # down because it answered below the floor
        self._lock = threading.Lock()
        self.current: int | None = None
        self.failovers = 0
        self.last_version = 0  # the newest version served; a recovered replica must reach it first
        self.min_version = 0  # what the caller requires besides (require_version)
        for i in range(len(replicas)):
            self._open(i)
        self._stop = threading.Event()
        self._probe_s = probe_s
        self._prober = threading.Thread(target=self._probe_loop, name="ps-failover-probe", daemon=True)
        self._prober.start()

    @property
    def tables(self) -> dict[str, TableConfig]:
        for store in self._stores:
            if store is not None:
                return store.tables
        return {cfg.name: cfg for cfg in self._tables}

    @property
    def floor(self) -> int:
        """The lowest version a replica may answer with to be read."""
        return max(self.last_version, self.min_version)

    def require_version(self, version: int) -> None:
        """Read no replica below ``version`` from now on (monotonic: a lower value changes nothing)."""
        if version > self.min_version:
            with self._lock:
                self.min_version = max(self.min_version, version)

    def _open(self, i: int) -> RedisStore | None:
        if self._stores[i] is not None:
            return self._stores[i]
        try:
            store = RedisStore(self.replicas[i], self._tables, configure_servers=False, **self._options)
        except ShardUnavailable:
            self._down[i] = True
            return None
        self._stores[i] = store
        return store

    def _order(self) -> list[int]:
        with self._lock:
            healthy = [i for i in range(len(self.replicas)) if not self._down[i]]
            down = [i for i in range(len(self.replicas)) if self._down[i]]
        return healthy + down  # failed replicas stay a last resort

    def _mark_down(self, i: int, behind: bool) -> None:
        with self._lock:
            self._down[i], self._behind[i] = True, behind

    def _call(self, what: str, fn: Any, serves_rows: bool = True) -> Any:
        errors = []
        behind = False
        for i in self._order():
            store = self._open(i)
            if store is None:
                errors.append(f"{self.replicas[i]}: not reachable")
                continue
            floor = self.floor
            try:
                result = fn(store)
            except ShardUnavailable as exc:
                self._mark_down(i, behind=False)
                errors.append(str(exc))
                continue
            version = _version_of(result)
            if version is not None and version < floor:
                self._mark_down(i, behind=True)
                errors.append(f"{','.join(self.replicas[i])}: holds version {version}, below {floor}")
                behind = True
                continue
            with self._lock:
                self._down[i] = self._behind[i] = False
                if self.current is not None and self.current != i:
                    self.failovers += 1
                    log.warning("parameter reads moved from replica %d to %d", self.current, i)
                self.current = i
                if serves_rows and version is not None:
                    self.last_version = max(self.last_version, version)
            return result
        error = ReplicasBehind if behind else ShardUnavailable
        raise error(f"{what}: no replica answered at version >= {self.floor}: " + "; ".join(errors))

    def pull(self, table: str, ids: np.ndarray) -> Rows:
        if table not in self.tables:
            raise UnknownTable(f"unknown table {table!r}; the replicas hold {sorted(self.tables)}")
        return self._call("pull", lambda store: store.pull(table, ids))

    def pull_many(self, requests: dict[str, np.ndarray]) -> dict[str, Rows]:
        """Rows of several tables from one replica, all of one version."""
        unknown = sorted(set(requests) - set(self.tables))
        if unknown:
            raise UnknownTable(f"unknown tables {unknown}; the replicas hold {sorted(self.tables)}")
        return self._call("pull_many", lambda store: store.pull_many(requests))

    def version(self) -> int:
        """The committed version of the replica reads go to (one below the floor is skipped)."""
        return int(self._call("version", lambda store: store.version(), serves_rows=False))

    def healthy(self) -> list[bool]:
        """Per replica: read now (not down, not behind the floor)."""
        with self._lock:
            return [not d for d in self._down]

    def behind(self) -> list[bool]:
        """Per replica: skipped because it answered below the floor (restarted empty, or lagging)."""
        with self._lock:
            return list(self._behind)

    def _probe_loop(self) -> None:
        while not self._stop.wait(self._probe_s):
            for i in range(len(self.replicas)):
                if not self._down[i]:
                    continue
                store = self._open(i)
                if store is None or not all(store.ping(s) for s in range(len(store.urls))):
                    continue
                try:
                    version = store.version()
                except ParamServerError:
                    continue
                with self._lock:
                    # a replica that restarted empty waits for its bootstrap: reads never go back before
                    self._behind[i] = version < self.floor
                    self._down[i] = self._behind[i]

    def close(self) -> None:
        self._stop.set()
        for store in self._stores:
            if store is not None:
                store.close()

    def __enter__(self) -> FailoverReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _version_of(result: object) -> int | None:
    """The parameter version a read answered with (rows, rows of several tables, or a version number)."""
    if isinstance(result, Rows):
        return result.version
    if isinstance(result, dict):
        return max((rows.version for rows in result.values()), default=None)
    if isinstance(result, int):
        return result
    return None
