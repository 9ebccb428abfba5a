"""The stream worker's Feast writer: opened in the background by default, an opening that fails is tried
again, and the cheap reachability check the CLI runs instead of importing Feast before the worker starts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from core.procs import free_port
from core.settings import Settings
from feature_repo.spec import EncodedEntity
from streaming.feature_writer import FeatureWriter
from streaming.records import BatchResult


def _result(user_id: str) -> BatchResult:
    user = EncodedEntity(entity="user", entity_id=user_id, sparse={}, dense={})
    return BatchResult(users={user_id: (user, 1.0)})


def test_the_default_opens_the_store_in_the_background() -> None:
    assert Settings().stream.feature_store_open == "background"
    with pytest.raises(ValueError, match="feature_store_open"):
        Settings().override(stream={"feature_store_open": "later"})


def test_an_unreachable_redis_online_store_is_reported_before_the_worker_starts() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    writer = FeatureWriter(Settings().override(feast={"online_store": "redis", "redis_url": dead}))
    with pytest.raises(redis.ConnectionError):
        writer.check_reachable()
    # the SQLite store is a file the opening creates: nothing to reach
    FeatureWriter(Settings().override(feast={"online_store": "sqlite"})).check_reachable()


def test_an_opening_that_fails_is_tried_again_by_the_next_write(monkeypatch: pytest.MonkeyPatch) -> None:
    writer = FeatureWriter(Settings())
    openings: list[int] = []
    written: list[tuple[str, list[str]]] = []

    def open_store() -> Any:
        openings.append(1)
        if len(openings) == 1:
            raise ConnectionError("redis down")
        return object()

    monkeypatch.setattr(writer, "_open", open_store)
    monkeypatch.setattr(
        writer._online, "_write", lambda entity, rows: written.append((entity, [e.entity_id for e, _ in rows]))
    )
    monkeypatch.setattr(writer._offline, "_write", lambda entity, rows: None)

    async def run() -> None:
        writer.start()  # what the app's start-up task does
        with pytest.raises(ConnectionError, match="redis down"):
            await writer.submit(_result("u1"))
        await writer.submit(_result("u2"))

    asyncio.run(run())
    assert len(openings) == 2
    assert written == [("user", ["u2"])]
