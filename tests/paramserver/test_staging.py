"""Staged rows: invisible until promoted, dropped without a trace, rolled back exactly.

The same checks on the in-process backend and on real Redis shards with a replica that
follows the store through the delta-stream replicator (what serving reads).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from paramserver import Conflict, Replicator, Rows, TableConfig, open_store
from paramserver.base import ParamStore
from paramserver.redis_store import RedisStore
from paramserver.rows import BadRows
from paramserver.staging import NothingStaged, StagedView, promote_stage

USER = TableConfig("user", dim=4, state_dim=1, seed=5, capacity=2_000)
ITEM = TableConfig("item", dim=4, state_dim=1, storage_dtype="float16", capacity=2_000)
IDS = np.arange(0, 60, dtype=np.int64)


def noisy(config: TableConfig, ids: np.ndarray, seed: int) -> Rows:
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 1, (len(ids), config.dim)).astype(np.float32)
    if config.storage_dtype == "float16":
        weights = weights.astype(np.float16).astype(np.float32)
    return Rows(ids, weights, rng.random((len(ids), config.state_dim)).astype(np.float32))


def read(store, ids: np.ndarray = IDS) -> dict[str, np.ndarray]:
    return {
        t: np.concatenate([r.weights, r.state], axis=1) for t, r in store.pull_many({"user": ids, "item": ids}).items()
    }


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def store(request) -> Iterator[ParamStore]:
    if request.param == "memory":
        yield open_store("memory", [USER, ITEM])
        return
    server = request.getfixturevalue("redis_factory")("staging")
    opened = RedisStore([server.url], [USER, ITEM], namespace=f"st{uuid.uuid4().hex[:8]}")
    yield opened
    for name in opened.stages():
        opened.drop_stage(name)
    opened.close()


def test_staged_rows_are_invisible_until_promoted_and_promotion_is_one_version(store) -> None:
    store.push({"user": noisy(USER, IDS[:30], 1)})  # a champion's rows for half the ids
    served, version = read(store), store.version()
    store.stage("job-a").push({"user": noisy(USER, IDS[10:50], 2), "item": noisy(ITEM, IDS[:20], 3)})
    assert same(read(store), served) and store.version() == version
    assert "job-a" in store.stages()

    view = StagedView(store, "job-a")
    staged_user = view.pull("user", IDS)
    assert np.array_equal(staged_user.weights[10:50], noisy(USER, IDS[10:50], 2).weights)
    assert np.array_equal(staged_user.weights[:10], store.pull("user", IDS[:10]).weights)

    done = promote_stage(store, "job-a", undo="undo-a", unchanged_since=version)
    assert done.version == version + 1 and done.rows == {"user": 40, "item": 20} and not done.replayed
    assert np.array_equal(store.pull("user", IDS[10:50]).weights, noisy(USER, IDS[10:50], 2).weights)
    assert "job-a" not in store.stages() and "undo-a" in store.stages()

    # rolling back is promoting the undo area: every row reads as before, bit for bit
    back = promote_stage(store, "undo-a", undo="undo-undo-a")
    assert back.version == version + 2
    assert same(read(store), served)


def test_a_dropped_stage_leaves_nothing_behind(store) -> None:
    store.push({"user": noisy(USER, IDS, 1)})
    served, version = read(store), store.version()
    store.stage("job-bad").push({"user": noisy(USER, IDS, 99), "item": noisy(ITEM, IDS, 98)})
    assert store.drop_stage("job-bad") is True
    assert store.drop_stage("job-bad") is False
    assert same(read(store), served) and store.version() == version
    assert store.stage("job-bad").read_all() == {}  # a new area of the same name starts empty
    with pytest.raises(NothingStaged, match="holds no rows"):
        promote_stage(store, "job-bad", undo="u")
    with pytest.raises(NothingStaged, match="no staging area"):
        promote_stage(store, "never-staged", undo="u")


def test_promotion_refuses_rows_changed_since_the_job_pulled_them(store) -> None:
    store.push({"user": noisy(USER, IDS, 1)})
    pulled_at = store.version()
    store.stage("job-late").push({"user": noisy(USER, IDS[:5], 2)})
    store.push({"user": noisy(USER, IDS[3:4], 7)})  # another writer touched one of its rows
    served = read(store)
    with pytest.raises(Conflict):
        promote_stage(store, "job-late", undo="undo-late", unchanged_since=pulled_at)
    assert same(read(store), served)
    assert "job-late" in store.stages() and "undo-late" not in store.stages()


def test_a_retried_promotion_is_reported_as_replayed(store) -> None:
    store.stage("job-r").push({"user": noisy(USER, IDS[:8], 4)})
    first = promote_stage(store, "job-r", undo="undo-r")
    # a crash after the copy, before the stage was dropped: the retry finds the rows in place
    store.stage("job-r").push({"user": noisy(USER, IDS[:8], 4)})
    again = promote_stage(store, "job-r", undo="undo-r")
    assert again.replayed and again.version == first.version == store.version()
    assert "job-r" not in store.stages()


@pytest.mark.parametrize("bad", ["", "-x", "a b", "a/b", "x" * 121, None, 3])
def test_bad_stage_names_are_refused(bad) -> None:
    store = open_store("memory", [USER])
    with pytest.raises(BadRows, match="stage name"):
        store.stage(bad)  # type: ignore[arg-type]


@pytest.mark.integration
def test_a_replica_never_holds_staged_rows_and_follows_promotion_and_rollback(redis_factory) -> None:
    source_url, replica_url = redis_factory("staging-source").url, redis_factory("staging-replica").url
    ns = f"sr{uuid.uuid4().hex[:8]}"
    source = RedisStore([source_url], [USER, ITEM], namespace=ns)
    replica = RedisStore([replica_url], [USER, ITEM], namespace=ns)
    replicator = Replicator(source, replica, poll_s=0.01)
    try:
        source.push({"user": noisy(USER, IDS, 1), "item": noisy(ITEM, IDS, 2)})
        replicator.step()
        champion = read(replica)
        source.stage("job-x").push({"user": noisy(USER, IDS, 50), "item": noisy(ITEM, IDS, 51)})
        for _ in range(3):
            replicator.step(wait_s=0)
        assert same(read(replica), champion), "a staged row reached the replica"
        assert replica.version() == source.version()

        promoted = promote_stage(source, "job-x", undo="undo-x", unchanged_since=source.version())
        replicator.step(wait_s=0)
        assert replica.version() == promoted.version
        assert same(read(replica), read(source)) and not same(read(replica), champion)

        back = promote_stage(source, "undo-x", undo="undo-undo-x")
        replicator.step(wait_s=0)
        assert replica.version() == back.version
        assert same(read(replica), champion)
    finally:
        for name in source.stages():
            source.drop_stage(name)
        source.close()
        replica.close()
