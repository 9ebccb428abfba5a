"""Feast writes of the stream: each batch's encoded profiles, pushed online and appended offline, in two lanes."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from streaming import metrics
from streaming.futures import done

if TYPE_CHECKING:
    from core.settings import Settings
    from feature_repo.spec import EncodedEntity
    from feature_repo.store import Entity
    from streaming.records import BatchResult

log = logging.getLogger("streaming.feature_writer")

Row = tuple["EncodedEntity", float]  # an encoded profile and its event time


class _WriteLane:
    """Rows waiting for one kind of write, and the single task that writes them, one write at a time.

    ``add`` returns a future of the write that will carry the rows; while a write runs, what
    arrives waits and goes in the next one, so a slow store costs fewer, larger writes rather than
    a queue. ``newest_only``: keep the latest row per id (the online store holds nothing else);
    otherwise every row is kept (the offline store keeps each version for point-in-time joins).
    """

    def __init__(
        self,
        name: str,
        write: Callable[[Entity, list[Row]], None],
        newest_only: bool,
        ready: Callable[[], Awaitable[None]],
    ) -> None:
        self.name = name
        self._write = write
        self._ready = ready
        self.newest_only = newest_only
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"feast-{name}")
        self._latest: dict[Entity, dict[str, Row]] = {}  # newest_only: the latest row per id
        self._every: dict[Entity, list[Row]] = {}  # otherwise: every row
        self._waiters: list[asyncio.Future[None]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def add(self, entity: Entity, rows: dict[str, Row]) -> asyncio.Future[None]:
        if self.newest_only:
            pending = self._latest.setdefault(entity, {})
            for entity_id, row in rows.items():
                current = pending.get(entity_id)
                if current is None or current[1] <= row[1]:
                    pending[entity_id] = row
        else:
            self._every.setdefault(entity, []).extend(rows.values())
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        wake = self._wake
        if wake is None:
            wake = self._wake = asyncio.Event()
            self._task = asyncio.ensure_future(self._run(wake))
        wake.set()
        return future

    async def _run(self, wake: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await wake.wait()
            wake.clear()
            latest, self._latest = self._latest, {}
            every, self._every = self._every, {}
            waiters, self._waiters = self._waiters, []
            try:
                await self._ready()
                batches = [(entity, list(rows.values())) for entity, rows in latest.items()] + list(every.items())
                for entity, rows_list in batches:
                    if rows_list:
                        await loop.run_in_executor(self._executor, self._write, entity, rows_list)
            except Exception as exc:  # noqa: BLE001 - every batch waiting on this write learns of it
                log.error("feature write failed", extra={"fields": {"store": self.name, "error": repr(exc)[:300]}})
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                continue
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


class FeatureWriter:
    """Writes the batches' encoded profiles to Feast: online pushes and offline parquet appends, in two lanes.

    The lanes run side by side (one thread each), so a parquet append never delays the next
    online push: the online store is what serving reads, and its freshness is the figure that
    matters. A batch counts as written once both lanes carried it. The store is opened in a thread
    at start-up (``start``), so the event loop joins the group, restores the tables and processes
    meanwhile and only the feature writes wait for it, or before the worker starts (``open_now``,
    ``RECSYS_STREAM_FEATURE_STORE_OPEN=before_start``). An opening that fails is tried again by the
    next write.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: asyncio.Future[Any] | None = None
        self._opened: Any = None
        self._online = _WriteLane("online", self._write_online, newest_only=True, ready=self._ready)
        self._offline = _WriteLane("offline", self._write_offline, newest_only=False, ready=self._ready)

    def submit(self, result: BatchResult) -> asyncio.Future[Any]:
        futures = []
        entities: tuple[tuple[Entity, dict[str, Row]], ...] = (("user", result.users), ("item", result.items))
        for entity, rows in entities:
            if rows:
                futures += [self._online.add(entity, rows), self._offline.add(entity, rows)]
        return asyncio.gather(*futures) if futures else done()

    def start(self) -> None:
        """Begin opening the store in a thread (a no-op once it is open or opening)."""
        if self._opened is None:
            self._opening()

    def open_now(self) -> None:
        """Open the store before the worker starts (``recsys stream worker`` does): importing Feast and
        torch takes seconds of CPU that would otherwise compete with the first minutes of the stream."""
        self._opened = self._open()

    def check_reachable(self) -> None:
        """Raise if the online store cannot be reached, without importing Feast (a Redis ``PING``; the SQLite
        store is a file under the data dir that the opening creates)."""
        s = self.settings
        if s.feast.online_store == "redis":
            import redis

            client = redis.Redis.from_url(s.feast_redis_url, socket_connect_timeout=5, socket_timeout=5)
            try:
                client.ping()
            finally:
                client.close()

    def _opening(self) -> asyncio.Future[Any]:
        if self._store is None:
            self._store = asyncio.get_running_loop().run_in_executor(None, self._open)
        return self._store

    def _open(self) -> Any:
        from feature_repo import store as fs

        s = self.settings
        started = time.perf_counter()
        opened = fs.open_store(s.feast.data_dir, s.feast.online_store, s.feast_redis_url)
        # what Feast and torch left is long-lived: out of the cyclic GC's way, as the CLI does before it starts
        gc.freeze()
        log.info(
            "feature store ready",
            extra={
                "fields": {
                    "online_store": s.feast.online_store,
                    "data_dir": str(s.feast.data_dir),
                    "seconds": round(time.perf_counter() - started, 2),
                }
            },
        )
        return opened

    async def _ready(self) -> None:
        if self._opened is None:
            try:
                self._opened = await self._opening()
            except Exception:
                self._store = None  # the next write tries to open it again (Redis back, registry mended)
                raise

    def _frame(self, entity: Entity, rows: list[Row]) -> Any:
        from feature_repo import store as fs

        return fs.rows_frame(entity, [e for e, _ in rows], [t for _, t in rows], time.time())

    def _write_online(self, entity: Entity, rows: list[Row]) -> None:
        from feature_repo import store as fs

        frame = self._frame(entity, rows)
        started = time.perf_counter()
        fs.push_online(self._opened, entity, frame)
        metrics.FEATURE_PUSH_SECONDS.labels("online").observe(time.perf_counter() - started)
        metrics.FEATURE_ROWS.labels(entity, "online").inc(len(frame))

    def _write_offline(self, entity: Entity, rows: list[Row]) -> None:
        from feature_repo import store as fs

        frame = self._frame(entity, rows)
        started = time.perf_counter()
        fs.write_offline(self.settings.feast.data_dir, entity, frame)
        metrics.FEATURE_PUSH_SECONDS.labels("offline").observe(time.perf_counter() - started)
        metrics.FEATURE_ROWS.labels(entity, "offline").inc(len(frame))
