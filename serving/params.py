"""Embedding rows for serving: the nearest parameter replica, behind an in-process cache keyed by version.

The cache holds the vectors of one parameter version. A background poll reads the replica's
version every ``serving_param_version_poll_s``; a new version starts an empty cache (rows are
never mixed across versions within one cache). A request whose pull comes back at a newer
version than its cache re-reads everything at that version, so one answer is scored with the
rows of one version.

Rows older than what serving needs are never served as if they were current: the reader skips
replicas below its floor (the newest version served, and the champion's rows version passed
with each lookup), and when no replica reaches it the lookup raises ``RowsStale``, which the
ranker answers as a flagged degraded answer (``stale_rows``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Protocol

import numpy as np

from paramserver import ParamServerError, ReplicasBehind, Rows, ShardUnavailable, TableConfig, initial_rows

log = logging.getLogger(__name__)


class RowsUnavailable(RuntimeError):
    """No replica answered; the message lists why."""


class RowsStale(RowsUnavailable):
    """Replicas answered, but none at the version serving needs (restarted empty, or behind the champion)."""


@dataclass
class _Cache:
    version: int
    rows: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    size: int = 0


def _stacked(vecs: list[np.ndarray], dim: int) -> np.ndarray:
    """[len(vecs), dim]; np.array builds it in C, a third of np.stack's cost for ~100 rows."""
    return np.array(vecs, np.float32) if vecs else np.zeros((0, dim), np.float32)


def _evict_least_recent(cache: _Cache, count: int) -> None:
    """Drop about ``count`` least recently used rows, from every table in proportion to its share of the cache.

    A quarter of the bound goes at once, so a full cache does not evict on every request.
    """
    total = sum(len(rows) for rows in cache.rows.values()) or 1
    for rows in cache.rows.values():
        # list(islice(...)) runs in C under the GIL: no other request thread changes the dict meanwhile
        for key in list(itertools.islice(rows, min(len(rows), -(-count * len(rows) // total)))):
            rows.pop(key, None)
    cache.size = sum(len(rows) for rows in cache.rows.values())


class RowReader(Protocol):
    """What serving needs of ``paramserver.FailoverReader`` (the real one in production and tests)."""

    current: int | None  # index of the replica reads go to, None before the first read

    @property
    def tables(self) -> dict[str, TableConfig]: ...
    def pull(self, table: str, ids: np.ndarray) -> Rows: ...
    def version(self) -> int: ...
    def healthy(self) -> list[bool]: ...
    def behind(self) -> list[bool]: ...
    @property
    def floor(self) -> int: ...
    def require_version(self, version: int) -> None: ...
    def close(self) -> None: ...


class RowFetcher:
    def __init__(
        self,
        reader: RowReader,
        max_rows: int,
        poll_s: float,
        on_lookup: Callable[[int, int], None] | None = None,
        reopen: Callable[[], RowReader] | None = None,
        init_std: float = 0.01,
    ) -> None:
        self.reader = reader
        self.reopen = reopen  # a fresh reader sees tables a trainer created after we started
        self.init_std = init_std
        self._wanted: set[str] = set()
        self.max_rows = max_rows
        self.poll_s = poll_s
        self.on_lookup = on_lookup  # (hits, misses), for metrics
        self._cache = _Cache(version=-1)
        self._lock = threading.Lock()
        self._reopen_lock = threading.Lock()
        self._last_reopen = float("-inf")
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.last_version: int | None = None

    def start(self) -> None:
        self._poller = threading.Thread(target=self._poll, name="serving-param-version", daemon=True)
        self._poller.start()

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
        self.reader.close()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self._observe(self.reader.version())
                self._reopen_if_tables_missing()
            except (ParamServerError, OSError) as exc:
                log.debug("parameter version poll failed: %s", exc)
            self._stop.wait(self.poll_s)

    def _reopen_if_tables_missing(self) -> None:
        """Look for tables a request wanted that our reader does not know (at most once per poll period).

        Serving usually starts before any trainer has created its tables: without this, the rows
        of those tables would stay the initial ones until the parameter version next moved.
        """
        reopen = self.reopen
        if reopen is None or self._wanted <= set(self.reader.tables):
            return
        now = time.monotonic()
        if now - self._last_reopen < self.poll_s or not self._reopen_lock.acquire(blocking=False):
            return
        try:
            self._last_reopen = now
            self._reopen(reopen)
        finally:
            self._reopen_lock.release()

    def _reopen(self, reopen: Callable[[], RowReader]) -> None:
        fresh = reopen()
        if set(fresh.tables) == set(self.reader.tables):
            fresh.close()
            return
        fresh.require_version(self.reader.floor)  # what the old reader served stays the floor
        old, self.reader = self.reader, fresh
        log.info("parameter tables now %s", sorted(fresh.tables))
        with self._lock:
            self._cache = _Cache(self._cache.version)
        threading.Timer(5.0, old.close).start()  # requests in flight may still hold the old reader

    def _observe(self, version: int) -> _Cache:
        """The cache of ``version`` (a fresh one when the version moved on)."""
        with self._lock:
            self.last_version = max(version, self.last_version or 0)
            if version > self._cache.version:
                self._cache = _Cache(version)
            return self._cache

    @property
    def version(self) -> int | None:
        return self.last_version

    def refresh_version(self) -> int | None:
        """The replica's version read now (not at the next poll), observed; the last one seen if it cannot be read.

        What a model swap checks: the new champion's rows must be there before its dense part scores.
        """
        try:
            self._observe(self.reader.version())
        except (ParamServerError, OSError) as exc:
            log.debug("parameter version read failed: %s", exc)
        return self.last_version

    def table_configs(self) -> dict[str, TableConfig]:
        return dict(self.reader.tables)

    def knows(self, table: str) -> bool:
        """Whether the replicas hold ``table``; one they do not is looked for again (as a request's would be)."""
        if table not in self.reader.tables:
            self._wanted.add(table)
            self._reopen_if_tables_missing()
        return table in self.reader.tables

    def read(self, table: str, ids: np.ndarray) -> Rows | None:
        """Rows of ``table`` from the replica now, past the cache (the online dense weights); None: no such table."""
        if not self.knows(table):
            return None
        try:
            return self.reader.pull(table, ids)
        except ReplicasBehind as exc:
            raise RowsStale(str(exc)) from None
        except ShardUnavailable as exc:
            raise RowsUnavailable(str(exc)) from None

    def lookup(
        self, ids: dict[str, np.ndarray], dims: dict[str, int] | None = None, min_version: int | None = None
    ) -> tuple[dict[str, np.ndarray], int]:
        """Vectors ([len(ids), dim] per table) of one parameter version, and that version.

        Tables the replicas do not hold (a trainer has not pushed them yet) get the
        deterministic initial rows, exactly what a pull of never-seen ids returns; their dim
        comes from ``dims``. ``min_version`` (the champion's rows) raises the reader's floor.
        Raises RowsStale when replicas answer only below the floor, RowsUnavailable when none answers.
        """
        if min_version is not None:
            self.reader.require_version(min_version)
        for _ in range(3):
            cache = self._cache
            if self.reader.floor > max(cache.version, 0):  # cached rows older than what serving needs now
                cache = self._observe(self.reader.floor)
            try:
                out, version = self._lookup(cache, ids, dims or {})
            except ReplicasBehind as exc:
                raise RowsStale(str(exc)) from None
            except ShardUnavailable as exc:
                raise RowsUnavailable(str(exc)) from None
            if version == cache.version or cache.version < 0 and version <= 0:
                return out, version
            self._observe(version)  # a newer version than the cache: redo at that version
        return out, version

    def _lookup(
        self, cache: _Cache, ids: dict[str, np.ndarray], dims: dict[str, int]
    ) -> tuple[dict[str, np.ndarray], int]:
        if not set(ids) <= self._wanted:
            self._wanted |= set(ids)
        if not self._wanted <= set(self.reader.tables):
            self._reopen_if_tables_missing()
            if self._cache is not cache:  # the reopen started a new cache (same version)
                cache = self._cache
        reader = self.reader
        configs = reader.tables
        out: dict[str, np.ndarray] = {}
        version = cache.version
        hits = misses = 0
        for table, wanted in ids.items():
            config = configs.get(table)
            if config is None:
                dim = dims.get(table) or 0
                if dim <= 0:
                    continue
                # what a pull of never-seen ids would return (the trainer's init_std, seed 0)
                out[table] = initial_rows(
                    TableConfig(table, dim, init_std=self.init_std), np.asarray(wanted, np.int64)
                )[0]
                continue
            table_cache = cache.rows.setdefault(table, {})
            keys = np.asarray(wanted, np.int64).tolist()
            unique = list(dict.fromkeys(keys))  # a few hundred ids: plain dicts beat np.unique's sort
            # popped and put back (below): each table dict stays in least-recently-used order. map() over
            # the dict's own methods runs in C, the per-id Python loop was most of the stage's CPU
            vecs: list[Any] = list(map(table_cache.pop, unique, repeat(None)))
            missing_at = [i for i, vec in enumerate(vecs) if vec is None]
            hits += len(unique) - len(missing_at)
            misses += len(missing_at)
            keep = True  # put every row (back) into the cache
            if missing_at:
                missing = [unique[i] for i in missing_at]
                rows = reader.pull(table, np.array(missing, np.int64))
                if cache.version >= 0 and rows.version != cache.version:
                    version = rows.version
                elif cache.version < 0:
                    version = rows.version
                for i, vec in zip(missing_at, rows.weights):
                    vecs[i] = vec
                if rows.version == cache.version and self.max_rows > 0:
                    if cache.size + len(missing) > self.max_rows:
                        _evict_least_recent(cache, cache.size + len(missing) - self.max_rows + self.max_rows // 4)
                    cache.size += len(missing)
                else:  # rows of another version than the cache's (or no cache): served, not kept
                    keep = False
                    pulled = set(missing_at)
                    table_cache.update((unique[i], vec) for i, vec in enumerate(vecs) if i not in pulled)
            if keep:
                table_cache.update(zip(unique, vecs))  # every None was filled above
            if len(unique) != len(keys):
                vecs_of = dict(zip(unique, vecs))
                vecs = list(map(vecs_of.__getitem__, keys))
            out[table] = _stacked(vecs, config.dim)
        if self.on_lookup is not None:
            self.on_lookup(hits, misses)
        return out, version
