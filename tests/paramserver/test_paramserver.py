"""Parameter service, pure logic on the in-process (memory) backend: no servers involved."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from paramserver import (
    BadRows,
    Conflict,
    LogTrimmed,
    Rows,
    TableConfig,
    TableMismatch,
    UnknownTable,
    initial_rows,
    open_store,
)
from paramserver.rows import latest_per_id, route_hash

USER = TableConfig("user", dim=8, state_dim=1, init_std=0.01, seed=7)
ITEM = TableConfig("item", dim=4, state_dim=2, storage_dtype="float16")


def rows_of(config: TableConfig, ids, value: float) -> Rows:
    ids = np.asarray(ids, dtype=np.int64)
    return Rows(
        ids,
        np.full((len(ids), config.dim), value, np.float32),
        np.full((len(ids), config.state_dim), value / 2, np.float32),
    )


@pytest.fixture
def store():
    return open_store("memory", [USER, ITEM])


def test_push_then_pull_round_trips_vectors_and_state(store):
    ids = np.array([3, 1, 2**62, -5], dtype=np.int64)
    weights = np.arange(32, dtype=np.float32).reshape(4, 8)
    state = np.array([[0.5], [1.5], [2.5], [3.5]], np.float32)
    version = store.push({"user": Rows(ids, weights, state)})
    assert version == 1 == store.version()
    got = store.pull("user", np.array([-5, 3, 2**62]))
    np.testing.assert_array_equal(got.weights, weights[[3, 0, 2]])
    np.testing.assert_array_equal(got.state, state[[3, 0, 2]])
    assert got.version == 1 and got.ids.dtype == np.int64


def test_pull_keeps_order_and_duplicates(store):
    store.push({"user": rows_of(USER, [1, 2], 1.0)})
    got = store.pull("user", [2, 1, 2, 9])
    assert got.weights[0, 0] == got.weights[2, 0] == 1.0 and got.weights.shape == (4, 8)
    np.testing.assert_array_equal(got.weights[3], initial_rows(USER, np.array([9]))[0][0])


def test_initial_rows_are_deterministic_and_not_written(store):
    ids = np.array([10, 20, 30, 10])
    first = store.pull("user", ids)
    again = open_store("memory", [USER]).pull("user", ids)
    np.testing.assert_array_equal(first.weights, again.weights)
    np.testing.assert_array_equal(first.weights[0], first.weights[3])
    assert not np.array_equal(first.weights[0], first.weights[1])
    assert (first.state == 0).all()
    assert store.version() == 0 and store.changed_since(0) == {}
    # seeded by table and seed: another table or seed gives other rows
    other_seed = TableConfig("user", dim=8, seed=8)
    other_table = TableConfig("usr", dim=8, seed=7)
    assert not np.array_equal(initial_rows(other_seed, ids)[0], first.weights)
    assert not np.array_equal(initial_rows(other_table, ids)[0], first.weights)


def test_initial_rows_follow_normal_with_init_std():
    config = TableConfig("t", dim=64, init_std=0.05)
    weights, _ = initial_rows(config, np.arange(2000, dtype=np.int64))
    assert abs(float(weights.mean())) < 0.002
    assert 0.048 < float(weights.std()) < 0.052


def test_float16_storage_rounds_vectors_but_keeps_state_float32(store):
    w = np.array([[0.1, 0.2, 0.3, 1000.123]], np.float32)
    s = np.array([[0.1, 1e-8]], np.float32)
    store.push({"item": Rows(np.array([5]), w, s)})
    got = store.pull("item", [5])
    np.testing.assert_array_equal(got.weights, w.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got.state, s)
    init = store.pull("item", [6]).weights
    np.testing.assert_array_equal(init, init.astype(np.float16).astype(np.float32))
    assert ITEM.row_bytes == 4 * 2 + 2 * 4


def test_push_of_several_tables_is_one_version(store):
    version = store.push({"user": rows_of(USER, [1, 2], 1.0), "item": rows_of(ITEM, [1], 1.0)})
    assert version == 1
    assert store.changed_since(0).keys() == {"user", "item"}
    assert store.push({"user": rows_of(USER, [1], 2.0)}) == 2
    np.testing.assert_array_equal(store.changed_since(1)["user"], [1])


@pytest.mark.parametrize(
    "make_update, message",
    [
        (lambda: {"nope": rows_of(USER, [1], 1.0)}, "unknown table"),
        (lambda: {"user": Rows(np.array([1]), np.zeros((1, 7), np.float32), np.zeros((1, 1), np.float32))}, "shape"),
        (lambda: {"user": Rows(np.array([1]), np.zeros((1, 8), np.float32), np.zeros((1, 2), np.float32))}, "shape"),
        (
            lambda: {
                "user": Rows(
                    np.array([1, 2]), np.array([[0] * 8, [np.nan] * 8], np.float32), np.zeros((2, 1), np.float32)
                )
            },
            "NaN or Inf",
        ),
        (
            lambda: {"user": Rows(np.array([1]), np.zeros((1, 8), np.float32), np.array([[np.inf]], np.float32))},
            "NaN or Inf",
        ),
        (
            lambda: {
                "user": Rows(
                    np.array([2**64 - 1], dtype=np.uint64), np.zeros((1, 8), np.float32), np.zeros((1, 1), np.float32)
                )
            },
            "outside int64",
        ),
        (lambda: {"user": Rows([2**63], np.zeros((1, 8), np.float32), np.zeros((1, 1), np.float32))}, "outside int64"),
        (
            lambda: {"user": Rows(np.array([1.5]), np.zeros((1, 8), np.float32), np.zeros((1, 1), np.float32))},
            "integers",
        ),
        (lambda: {"user": rows_of(USER, [4, 4], 1.0)}, "more than once"),
        (
            lambda: {"item": Rows(np.array([1]), np.full((1, 4), 1e6, np.float32), np.zeros((1, 2), np.float32))},
            "float16",
        ),
        (lambda: {"user": "not rows"}, "paramserver.Rows"),
    ],
)
def test_bad_push_is_rejected_and_writes_nothing(store, make_update, message):
    store.push({"user": rows_of(USER, [1], 1.0)})
    update = make_update()
    # a good table beside the bad one must not be written either
    update = {"item": rows_of(ITEM, [9], 3.0), **update} if "item" not in update else update
    with pytest.raises((BadRows, UnknownTable)) as excinfo:
        store.push(update)
    assert message in str(excinfo.value)
    assert store.version() == 1
    assert store.pull("user", [1]).weights[0, 0] == 1.0
    assert store.changed_since(1) == {}


@pytest.mark.parametrize("ids", [np.array([[1, 2]]), np.array([1.0]), ["a"], [None], [2**70], [-(2**63) - 1]])
def test_bad_ids_on_pull(store, ids):
    with pytest.raises(BadRows):
        store.pull("user", ids)


def test_unknown_table_on_every_operation(store):
    with pytest.raises(UnknownTable, match="unknown table 'nope'"):
        store.pull("nope", [1])
    with pytest.raises(UnknownTable):
        store.push_delta("nope", [1], np.zeros((1, 8)))


def test_push_delta_adds_sums_duplicates_and_starts_from_initial_rows(store):
    store.push({"user": rows_of(USER, [1], 1.0)})
    init2 = store.pull("user", [2]).weights[0]
    version = store.push_delta("user", np.array([1, 2, 1]), np.ones((3, 8), np.float32))
    assert version == 2
    got = store.pull("user", [1, 2])
    np.testing.assert_allclose(got.weights[0], 3.0)
    np.testing.assert_allclose(got.weights[1], init2 + 1.0, rtol=1e-6)
    assert got.state[0, 0] == 0.5  # vector-only delta leaves the state alone
    store.push_delta("user", np.array([1]), np.concatenate([np.zeros((1, 8)), [[0.25]]], axis=1))
    assert store.pull("user", [1]).state[0, 0] == 0.75


def test_bad_push_delta_writes_nothing(store):
    with pytest.raises(BadRows, match="expected shape"):
        store.push_delta("user", [1], np.ones((1, 5)))
    with pytest.raises(BadRows, match="NaN or Inf"):
        store.push_delta("user", [1], np.full((1, 8), np.nan))
    with pytest.raises(BadRows, match="float16"):
        store.push_delta("item", [1], np.full((1, 4), 70000.0))
    assert store.version() == 0


def test_concurrent_push_delta_threads_all_count(store):
    ids = np.arange(20)
    base = store.pull("user", ids).weights

    def worker():
        for _ in range(25):
            store.push_delta("user", ids, np.ones((20, 8), np.float32))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_allclose(store.pull("user", ids).weights, base + 100.0, rtol=1e-5)
    assert store.version() == 100


def test_reader_sees_whole_pushes_only(store):
    ids = np.arange(200)
    store.push({"user": rows_of(USER, ids, 0.0)})
    stop = threading.Event()
    seen = []

    def writer():
        for k in range(1, 200):
            store.push({"user": rows_of(USER, ids, float(k))})
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not stop.is_set():
        got = store.pull("user", ids)
        assert len(np.unique(got.weights)) == 1, "a pull mixed two versions"
        assert got.weights[0, 0] == got.version - 1
        seen.append(got.version)
    thread.join()
    assert len(seen) > 1


def test_pull_many_reads_one_version_across_tables(store):
    ids = np.arange(50)
    store.push({"user": rows_of(USER, ids, 0.0), "item": rows_of(ITEM, ids, 0.0)})
    done = threading.Event()

    def writer():
        for k in range(1, 150):
            store.push({"user": rows_of(USER, ids, float(k)), "item": rows_of(ITEM, ids, float(k))})
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        got = store.pull_many({"user": ids, "item": ids[:10]})
        assert got["user"].version == got["item"].version
        assert got["user"].weights[0, 0] == got["item"].weights[0, 0] == got["user"].version - 1
    thread.join()
    with pytest.raises(UnknownTable):
        store.pull_many({"user": ids, "nope": ids})


def test_conditional_push_refuses_rows_changed_meanwhile(store):
    base = store.push({"user": rows_of(USER, [1, 2, 3], 1.0)})
    store.push({"user": rows_of(USER, [3], 5.0)})  # another trainer
    with pytest.raises(Conflict) as excinfo:
        store.push({"user": rows_of(USER, [2, 3], 9.0), "item": rows_of(ITEM, [1], 9.0)}, unchanged_since=base)
    assert excinfo.value.clashes == {"user": 1}
    assert store.version() == 2 and store.pull("user", [2]).weights[0, 0] == 1.0
    assert store.push({"user": rows_of(USER, [1, 2], 9.0)}, unchanged_since=base) == 3


def test_snapshot_is_incremental_and_restores(tmp_path, store):
    store.push({"user": rows_of(USER, np.arange(100), 1.0), "item": rows_of(ITEM, [1, 2], 2.0)})
    first = store.snapshot(tmp_path / "snap")
    assert first.kind == "full" and first.rows == {"user": 100, "item": 2}
    store.push({"user": rows_of(USER, [5, 6], 9.0)})
    store.push_delta("item", [3], np.ones((1, 4)))
    second = store.snapshot(tmp_path / "snap")
    assert second.kind == "delta" and second.rows == {"user": 2, "item": 1} and second.version == 3
    assert store.snapshot(tmp_path / "snap").rows == {}  # nothing changed since

    copy = open_store("memory", [USER, ITEM])
    assert copy.restore(tmp_path / "snap") == 3
    assert copy.version() == 3
    for table, ids in (("user", np.arange(120)), ("item", np.arange(5))):
        np.testing.assert_array_equal(copy.pull(table, ids).weights, store.pull(table, ids).weights)
        np.testing.assert_array_equal(copy.pull(table, ids).state, store.pull(table, ids).state)
    # history before the restore point is not known to the copy
    with pytest.raises(LogTrimmed):
        copy.changed_since(1)


def test_restore_rejects_other_layouts(tmp_path, store):
    store.push({"user": rows_of(USER, [1], 1.0)})
    store.snapshot(tmp_path)
    with pytest.raises(TableMismatch, match="differs"):
        open_store("memory", [TableConfig("user", dim=16), ITEM]).restore(tmp_path)
    with pytest.raises(UnknownTable):
        open_store("memory", [ITEM]).restore(tmp_path)
    with pytest.raises(TableMismatch, match="no snapshot"):
        store.restore(tmp_path / "empty")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(name="", dim=4),
        dict(name="a:b", dim=4),
        dict(name="t", dim=0),
        dict(name="t", dim=4, storage_dtype="int8"),
        dict(name="t", dim=4, init_std=-1),
        dict(name="t", dim=4, capacity=0),
    ],
)
def test_table_config_validation(kwargs):
    with pytest.raises(ValueError):
        TableConfig(**kwargs)


def test_open_store_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown parameter-store backend"):
        open_store("cassandra", [USER])


def test_latest_per_id_keeps_last_occurrence():
    ids, vals = latest_per_id(np.array([1, 2, 1, 3, 2]), np.array([10, 20, 11, 30, 21]))
    assert dict(zip(ids.tolist(), vals.tolist())) == {1: 11, 2: 21, 3: 30}


def test_routing_spreads_ids_evenly():
    shards = route_hash("user", np.arange(40_000, dtype=np.int64)) % np.uint64(4)
    counts = np.bincount(shards.astype(np.int64), minlength=4)
    assert counts.min() > 9_000


# --------------------------------------------------------------------------- the Redis backend's pure parts


def test_open_store_redis_needs_the_settings():
    with pytest.raises(TypeError, match="settings"):
        open_store("redis", [USER])


def test_redis_store_defaults_and_options_are_the_settings():
    import inspect

    from core.settings import ParamServerSettings
    from paramserver.redis_store import RedisStore, store_options

    defaults = ParamServerSettings.model_construct()  # the declared defaults, no environment
    signature = inspect.signature(RedisStore.__init__).parameters
    options = store_options(defaults)
    assert options == {name: signature[name].default for name in options}
    custom = ParamServerSettings.model_construct(namespace="x", timeout_s=1.5, lock_ttl_s=2.0, log_retention_s=0.0)
    assert store_options(custom)["namespace"] == "x" and store_options(custom)["timeout"] == 1.5
    assert store_options(custom)["lock_ttl_s"] == 2.0 and store_options(custom)["log_retention_s"] == 0.0


def test_redis_store_rejects_a_bad_url_before_connecting():
    from paramserver import ParamServerError
    from paramserver.redis_store import RedisStore

    with pytest.raises(ParamServerError, match="expected a redis://"):
        RedisStore(["http://127.0.0.1:1/0"], [USER])


def test_hash_commands_are_the_commands_one_by_one():
    import hiredis

    from paramserver.redis_format import Keys
    from paramserver.resp import hash_commands, pack

    keys = Keys("ns")
    ids = np.array([5, -1, 2**40], np.int64)
    buckets = np.array([0, 7, 65536], np.int64)
    rows = np.arange(3 * 6, dtype=np.uint8).reshape(3, 6)
    fields = [int(i).to_bytes(8, "little", signed=True) for i in ids.tolist()]
    gets = b"".join(pack(b"HGET", keys.bucket("user", b), f) for b, f in zip(buckets.tolist(), fields))
    sets = b"".join(
        pack(b"HSET", keys.bucket("user", b), f, r.tobytes()) for b, f, r in zip(buckets.tolist(), fields, rows)
    )
    assert hash_commands(b"HGET", keys.bucket_prefix("user"), buckets, ids) == gets
    assert hash_commands(b"HSET", keys.bucket_prefix("user"), buckets, ids, rows) == sets
    reader = hiredis.Reader()
    reader.feed(sets)
    assert reader.gets() == [b"HSET", b"ns:b:user:\x00\x00\x00\x00", fields[0], rows[0].tobytes()]


def test_log_entries_and_applied_markers_round_trip():
    from paramserver.redis_format import Keys, applied_marker, applying_marker, pack_entry, parse_applied, unpack_entry

    ids = np.array([3, 1, 2], np.int64)
    data = np.arange(3 * 5, dtype=np.uint8).reshape(3, 5)
    [(name, got_ids, got_data)] = list(unpack_entry(pack_entry([("user", ids, data)])))
    assert name == "user" and got_ids.tolist() == [3, 1, 2] and (got_data == data).all()
    assert list(unpack_entry(pack_entry([]))) == []
    assert parse_applied(None) == (0, None)
    assert parse_applied(applied_marker(5)) == (5, None)
    assert parse_applied(applying_marker(4, 5)) == (4, 5)
    assert Keys("ps").log(5, b"tok") == b"ps:log:5:tok" and Keys("ps").applied == "ps:applied"


def test_typed_redis_calls_exist_in_redis_py():
    """RedisClient/RedisPipeline declare redis-py calls with their synchronous types: they must stay real calls."""
    import redis
    from redis.client import Pipeline

    from paramserver.redis_shards import RedisClient, RedisPipeline

    for protocol, cls in ((RedisClient, redis.Redis), (RedisPipeline, Pipeline)):
        declared = [name for name in vars(protocol) if callable(getattr(protocol, name)) and not name.startswith("_")]
        assert declared, protocol
        missing = [name for name in declared if not callable(getattr(cls, name, None))]
        assert missing == [], f"{protocol.__name__} declares calls {cls.__name__} lacks: {missing}"
