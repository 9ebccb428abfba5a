"""Parameter service on real Redis servers: several shards, two replicas, failover, processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import time
import uuid

import numpy as np
import pytest
import redis

from local_services import services
from paramserver import (
    Conflict,
    FailoverReader,
    LogTrimmed,
    ParamServerError,
    Replicator,
    Rows,
    ShardUnavailable,
    TableConfig,
    TableMismatch,
    open_store,
)
from paramserver.redis_store import RedisStore
from paramserver.replication import replica_status
from paramserver.resp import pack

pytestmark = pytest.mark.integration

USER = TableConfig("user", dim=8, state_dim=1, seed=3, capacity=20_000)
ITEM = TableConfig("item", dim=4, state_dim=2, storage_dtype="float16", capacity=2_000)


def rows_of(config: TableConfig, ids, value: float) -> Rows:
    ids = np.asarray(ids, dtype=np.int64)
    return Rows(
        ids,
        np.full((len(ids), config.dim), value, np.float32),
        np.full((len(ids), config.state_dim), value / 2, np.float32),
    )


@pytest.fixture(scope="module")
def shard_urls(redis_factory) -> list[str]:
    return [redis_factory(f"paramserver-shard-{i}").url for i in range(3)]


@pytest.fixture(scope="module")
def replica_urls(redis_factory) -> list[str]:
    return [redis_factory(f"paramserver-replica-{i}").url for i in range(2)]


@pytest.fixture
def ns() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store(shard_urls, ns):
    with RedisStore(shard_urls, [USER, ITEM], namespace=ns, rows_per_bucket=16) as s:
        yield s


def test_round_trip_across_shards_and_same_init_as_memory_backend(store):
    ids = np.arange(3000, dtype=np.int64) * 7919
    weights = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    state = np.abs(weights[:, :1])
    assert store.push({"user": Rows(ids, weights, state)}) == 1
    got = store.pull("user", ids[::-1])
    np.testing.assert_array_equal(got.weights, weights[::-1])
    np.testing.assert_array_equal(got.state, state[::-1])
    assert got.version == 1
    assert all(v == 1 for v in store.applied_versions())
    unseen = np.array([-1, 2**63 - 1, 12345678901])
    np.testing.assert_array_equal(
        store.pull("user", unseen).weights, open_store("memory", [USER]).pull("user", unseen).weights
    )
    np.testing.assert_array_equal(
        store.pull("item", [1, 2]).weights, open_store("memory", [ITEM]).pull("item", [1, 2]).weights
    )
    assert store.version() == 1  # pulling never-seen ids wrote nothing


def test_rows_are_packed_into_compact_hash_buckets(store, ns, shard_urls):
    store.push({"user": rows_of(USER, np.arange(5000), 1.0)})
    keys, encodings = 0, set()
    for url in shard_urls:
        client = redis.Redis.from_url(url)
        bucket_keys = list(client.scan_iter(match=f"{ns}:b:user:*", count=1000))
        keys += len(bucket_keys)
        encodings |= {client.object("encoding", k) for k in bucket_keys[:50]}
    assert keys < 5000 / 4  # many rows per key, not one key per row
    assert encodings == {b"listpack"}


def test_bad_input_is_rejected_with_nothing_written(store):
    store.push({"user": rows_of(USER, [1, 2], 1.0)})
    bad = Rows(np.array([3]), np.full((1, 8), np.nan, np.float32), np.zeros((1, 1), np.float32))
    with pytest.raises(ParamServerError, match="NaN or Inf"):
        store.push({"item": rows_of(ITEM, [1], 5.0), "user": bad})
    with pytest.raises(ParamServerError, match="shape"):
        store.push({"user": Rows(np.array([3]), np.zeros((1, 9), np.float32), np.zeros((1, 1), np.float32))})
    with pytest.raises(ParamServerError, match="outside int64"):
        store.pull("user", np.array([2**64 - 1], dtype=np.uint64))
    with pytest.raises(ParamServerError, match="unknown table"):
        store.pull("nope", [1])
    assert store.version() == 1
    assert store.changed_since(1) == {}
    assert store.pull("item", [1]).weights[0, 0] != 5.0


def test_layout_mismatch_is_refused(shard_urls, store, ns):
    with pytest.raises(TableMismatch, match="stored as"):
        RedisStore(shard_urls, [TableConfig("user", dim=16)], namespace=ns)
    with pytest.raises(TableMismatch, match="shards"):
        RedisStore(shard_urls[:2], [USER], namespace=ns)
    # a client without table configs uses the ones recorded in the servers
    with RedisStore(shard_urls, [], namespace=ns) as other:
        assert other.tables == {"user": USER, "item": ITEM}


def test_a_shard_down_is_a_clear_error(redis_factory, services_run_dir, ns):
    doomed = redis_factory(f"ps-doomed-{ns}")
    with RedisStore([redis_factory("paramserver-shard-0").url, doomed.url], [USER], namespace=ns, timeout=1.0) as s:
        s.push({"user": rows_of(USER, np.arange(50), 1.0)})
        services.stop(services_run_dir, f"redis-test-ps-doomed-{ns}")
        with pytest.raises(ShardUnavailable, match=str(doomed.port)):
            s.pull("user", np.arange(50))
        with pytest.raises(ShardUnavailable):
            s.push({"user": rows_of(USER, np.arange(50), 2.0)})
    with pytest.raises(ShardUnavailable):
        RedisStore([f"redis://127.0.0.1:{services.free_port()}/0"], [USER], namespace=ns, timeout=0.5)


# --------------------------------------------------------------------------- concurrency across processes


def _writer_process(urls, ns, ids, versions, done):
    with RedisStore(urls, [USER, ITEM], namespace=ns, rows_per_bucket=16) as s:
        for k in range(1, versions + 1):
            s.push({"user": rows_of(USER, ids, float(k)), "item": rows_of(ITEM, ids[:50], float(k))})
            # spread the pushes over ~1 s so a reader on a loaded machine overlaps several of them
            time.sleep(0.015)
    done.set()


def test_concurrent_reader_sees_whole_versions_only(store, shard_urls, ns):
    ids = np.arange(600, dtype=np.int64)
    store.push({"user": rows_of(USER, ids, 0.0), "item": rows_of(ITEM, ids[:50], 0.0)})
    ctx = mp.get_context("spawn")
    done = ctx.Event()
    writer = ctx.Process(target=_writer_process, args=(shard_urls, ns, ids, 60, done))
    writer.start()
    versions = set()
    try:
        while not done.is_set():
            got = store.pull("user", ids)
            values = np.unique(got.weights)
            assert len(values) == 1, f"one pull saw versions {values} across shards"
            assert values[0] == got.version - 1
            versions.add(got.version)
            both = store.pull_many({"user": ids, "item": ids[:50]})
            assert both["user"].version == both["item"].version
            assert np.unique(both["user"].weights).tolist() == [both["user"].version - 1]
            # float16 storage holds these small integers exactly
            assert np.unique(both["item"].weights).tolist() == [both["item"].version - 1]
    finally:
        writer.join(60)
    assert writer.exitcode == 0
    assert store.version() == 61
    assert len(versions) > 1  # the reader really ran while pushes landed


def _delta_process(urls, ns, ids, rounds):
    with RedisStore(urls, [USER], namespace=ns, rows_per_bucket=16) as s:
        for _ in range(rounds):
            s.push_delta("user", ids, np.ones((len(ids), 8), np.float32))


def test_push_delta_from_two_processes_sums(store, shard_urls, ns):
    ids_a = np.arange(0, 300, dtype=np.int64)
    ids_b = np.arange(200, 500, dtype=np.int64)  # 100 rows updated by both
    base = store.pull("user", np.arange(500)).weights
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_delta_process, args=(shard_urls, ns, ids, 20)) for ids in (ids_a, ids_b)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    expected = base.copy()
    expected[ids_a] += 20
    expected[ids_b] += 20
    np.testing.assert_allclose(store.pull("user", np.arange(500)).weights, expected, rtol=1e-5)
    assert store.version() == 40


def test_reader_rolls_forward_when_a_writer_dies_after_commit(store):
    ids = np.arange(400, dtype=np.int64)
    store.push({"user": rows_of(USER, ids, 1.0)})
    raw = store.shards.resp[1]
    real_apply = raw.call_lines

    def die_on_apply(payload, lines):
        raise ShardUnavailable("writer died before applying on shard 1")

    raw.call_lines = die_on_apply
    with pytest.raises(ShardUnavailable):
        store.push({"user": rows_of(USER, ids, 2.0)})
    raw.call_lines = real_apply
    assert store.version() == 2  # committed ...
    assert store.applied_versions()[1] == 1  # ... but not applied on shard 1
    got = store.pull("user", ids)  # the reader finishes the dead writer's work
    assert got.version == 2 and (got.weights == 2.0).all()
    assert store.applied_versions() == [2, 2, 2]
    assert store.push({"user": rows_of(USER, ids[:5], 3.0)}) == 3


def test_reader_finishes_an_apply_that_died_half_way(store):
    ids = np.arange(400, dtype=np.int64)
    store.push({"user": rows_of(USER, ids, 1.0)})
    store.timeout = 0.2  # how long a reader waits for a running apply before finishing it itself
    raw = store.shards.resp[1]
    real_apply = raw.call_lines

    def die_half_way(payload, lines):
        rows = lines - 2
        marker = len(pack(b"SET", store.keys.applied.encode(), b"1>2"))
        final = len(pack(b"SET", store.keys.applied.encode(), b"2"))
        stride = (len(payload) - marker - final) // rows
        real_apply(payload[: marker + rows // 2 * stride], rows // 2 + 1)  # the marker and half the rows
        raise ShardUnavailable("writer died half-way through its apply on shard 1")

    raw.call_lines = die_half_way
    with pytest.raises(ShardUnavailable):
        store.push({"user": rows_of(USER, ids, 2.0)})
    raw.call_lines = real_apply
    assert redis.Redis.from_url(store.urls[1]).get(store.keys.applied) == b"1>2"
    got = store.pull("user", ids)  # waits for the apply, then finishes it from the log
    assert got.version == 2 and (got.weights == 2.0).all()
    assert store.applied_versions() == [2, 2, 2]


# --------------------------------------------------------------------------- log, snapshots


def test_changed_since_and_incremental_snapshot_restore_into_other_shard_count(store, shard_urls, tmp_path, ns):
    store.push({"user": rows_of(USER, np.arange(1000), 1.0), "item": rows_of(ITEM, [1, 2, 3], 1.0)})
    first = store.snapshot(tmp_path / "snap")
    assert first.kind == "full" and first.rows == {"user": 1000, "item": 3}
    store.push({"user": rows_of(USER, [10, 11], 5.0)})
    store.push_delta("item", [2, 4], np.ones((2, 4)))
    changed = store.changed_since(1)
    np.testing.assert_array_equal(changed["user"], [10, 11])
    np.testing.assert_array_equal(changed["item"], [2, 4])
    second = store.snapshot(tmp_path / "snap")
    assert second.kind == "delta" and second.rows == {"user": 2, "item": 2} and second.version == 3
    # restore into a store with another shard count: snapshots are layout-free (this is resharding)
    with RedisStore(shard_urls[:2], [USER, ITEM], namespace=ns + "x") as other:
        assert other.restore(tmp_path / "snap") == 3
        for table, ids in (("user", np.arange(1100)), ("item", np.arange(6))):
            np.testing.assert_array_equal(other.pull(table, ids).weights, store.pull(table, ids).weights)
            np.testing.assert_array_equal(other.pull(table, ids).state, store.pull(table, ids).state)
        assert other.push({"user": rows_of(USER, [1], 7.0)}) == 4


def test_conditional_push_across_processes(store, shard_urls, ns):
    base = store.push({"user": rows_of(USER, np.arange(100), 1.0)})
    ctx = mp.get_context("spawn")
    other = ctx.Process(target=_delta_process, args=(shard_urls, ns, np.array([7, 8]), 1))
    other.start()
    other.join(60)
    assert other.exitcode == 0
    with pytest.raises(Conflict) as excinfo:
        store.push({"user": rows_of(USER, np.arange(10), 2.0)}, unchanged_since=base)
    assert excinfo.value.clashes == {"user": 2}
    assert store.pull("user", [0]).weights[0, 0] == 1.0
    assert store.push({"user": rows_of(USER, np.arange(10, 20), 2.0)}, unchanged_since=base) == base + 2


def test_trimmed_log_is_reported_and_snapshot_falls_back_to_full(shard_urls, ns, tmp_path):
    with RedisStore(shard_urls, [USER], namespace=ns, log_retention_s=0.0) as s:
        s.push({"user": rows_of(USER, np.arange(100), 1.0)})
        s.snapshot(tmp_path)
        for k in range(3):
            s.push({"user": rows_of(USER, [k], 2.0)})
        with pytest.raises(LogTrimmed, match="no longer in the log"):
            s.changed_since(1)
        info = s.snapshot(tmp_path)
        assert info.kind == "full" and info.rows == {"user": 100} and info.version == 4


# --------------------------------------------------------------------------- replicas


def test_replicas_catch_up_and_report_lag(store, replica_urls, ns):
    replicas = [RedisStore([url], [], namespace=ns) for url in replica_urls]
    replicators = [Replicator(store, r, poll_s=0.01) for r in replicas]
    store.push({"user": rows_of(USER, np.arange(500), 1.0)})
    store.push({"user": rows_of(USER, np.arange(100), 2.0), "item": rows_of(ITEM, [7], 3.0)})
    status = replica_status(store, [replica_urls[0]], namespace=ns)
    assert status["version"] == 0 and status["behind"] == 2 and status["lag_s"] >= 0
    for rep in replicators:
        assert rep.step() == 2
    for replica in replicas:
        assert replica.version() == 2
        for table, ids in (("user", np.arange(600)), ("item", np.arange(10))):
            np.testing.assert_array_equal(replica.pull(table, ids).weights, store.pull(table, ids).weights)
    status = replica_status(store, [replica_urls[0]], namespace=ns)
    assert status["behind"] == 0 and status["lag_s"] == 0 and status["apply_delay_s"] >= 0
    # a replica follows with the source's version numbers
    store.push_delta("user", [1], np.ones((1, 8)))
    assert replicators[1].step() == 3 and replicas[1].pull("user", [1]).version == 3
    for r in replicas:
        r.close()


def test_new_replica_bootstraps_from_snapshot_plus_deltas(shard_urls, replica_urls, ns, tmp_path):
    with (
        RedisStore(shard_urls, [USER], namespace=ns, log_retention_s=0.0) as source,
        RedisStore([replica_urls[1]], [], namespace=ns) as replica,
    ):
        source.push({"user": rows_of(USER, np.arange(300), 1.0)})
        source.snapshot(tmp_path)
        source.push({"user": rows_of(USER, [1, 2], 2.0)})
        source.log_retention_s = 300.0
        replicator = Replicator(source, replica, snapshot_dir=tmp_path)
        replicator.step()  # log trimmed past the replica's version 0: bootstrap
        assert replicator.bootstraps == 1
        while replicator.step(wait_s=0) is not None:
            pass
        assert replica.version() == source.version() == 2
        source.push({"user": rows_of(USER, [3], 4.0)})
        assert replicator.step() == 3 and replicator.bootstraps == 1  # then it follows the log
        np.testing.assert_array_equal(
            replica.pull("user", np.arange(310)).weights, source.pull("user", np.arange(310)).weights
        )


def _read_loop(reader, ids, stop, errors, served, versions):
    while not stop.is_set():
        try:
            versions.append(reader.pull("user", ids).version)
            served.append(reader.current)
        except Exception as exc:  # any failed read counts against the failover
            errors.append(repr(exc))
        time.sleep(0.002)


@pytest.mark.slow
def test_failover_to_next_replica_and_back(redis_factory, services_run_dir, shard_urls, ns):
    near, far = redis_factory(f"ps-near-{ns}"), redis_factory(f"ps-far-{ns}")
    run_dir = services_run_dir
    with RedisStore(shard_urls, [USER], namespace=ns) as source:
        source.push({"user": rows_of(USER, np.arange(200), 1.0)})
        targets = [RedisStore([u.url], [], namespace=ns) for u in (near, far)]
        for target in targets:
            Replicator(source, target).step()
        # the timeout only bounds reads of live replicas here (a dead one refuses at once): generous, so that
        # a slow answer on a loaded machine is not taken for a failure
        reader = FailoverReader([[near.url], [far.url]], [], probe_s=0.1, namespace=ns, timeout=2.0)
        assert reader.pull("user", np.arange(200)).version == 1 and reader.current == 0
        stop, errors, served, versions = threading.Event(), [], [], []
        thread = threading.Thread(target=_read_loop, args=(reader, np.arange(200), stop, errors, served, versions))
        thread.start()
        deadline = time.monotonic() + 30
        while len(served) < 5 and thread.is_alive() and time.monotonic() < deadline:  # reads before the kill
            time.sleep(0.01)
        services.stop(run_dir, f"redis-test-ps-near-{ns}")  # the nearest datacenter dies
        deadline = time.monotonic() + 10
        while reader.current != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reader.current == 1 and reader.failovers >= 1
        # it comes back empty (no persistence): not read until re-bootstrapped, then reads return to it
        services.start_redis(run_dir, near.port, name=f"redis-test-ps-near-{ns}")
        time.sleep(0.5)  # several probes see it answer, at version 0
        assert reader.current == 1 and not reader.healthy()[0]
        revived = RedisStore([near.url], [], namespace=ns)
        Replicator(source, revived).step()
        assert revived.version() == 1
        deadline = time.monotonic() + 10
        while reader.current != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        thread.join()
        assert reader.current == 0
        assert errors == [], f"reads failed during failover: {errors[:3]}"
        assert set(versions) == {1}, "a read was served by a replica that had not caught up"
        assert 0 in served and 1 in served
        reader.close()
        revived.close()
        for target in targets:
            target.close()


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def ps_cli_env(monkeypatch, tmp_path):
    from core.settings import get_settings

    ports = [services.free_port() for _ in range(3)]
    monkeypatch.setenv("RECSYS_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("RECSYS_PS_SHARDS", f'["redis://127.0.0.1:{ports[0]}/0", "redis://127.0.0.1:{ports[1]}/0"]')
    monkeypatch.setenv("RECSYS_PS_REPLICAS", f'["redis://127.0.0.1:{ports[2]}/0"]')
    get_settings.cache_clear()
    yield ports
    get_settings.cache_clear()


@pytest.mark.slow
def test_cli_up_status_down(ps_cli_env):
    from typer.testing import CliRunner

    from recsys.cli import app  # `ps up` / `ps down` are mounted by the shell (local services)

    runner = CliRunner()
    shards = [f"redis://127.0.0.1:{p}/0" for p in ps_cli_env[:2]]
    try:
        result = runner.invoke(app, ["ps", "up"])
        assert result.exit_code == 0, result.output
        assert all(services.redis_ping(p) for p in ps_cli_env)
        with RedisStore(shards, [USER]) as store:
            store.push({"user": rows_of(USER, np.arange(100), 1.0)})
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the replicator process started by `up` catches up
                if replica_status(store, [f"redis://127.0.0.1:{ps_cli_env[2]}/0"]).get("version") == 1:
                    break
                time.sleep(0.1)
        result = runner.invoke(app, ["ps", "status", "--json"])
        assert result.exit_code == 0, result.output
        info = json.loads(result.output)
        assert info["version"] == 1 and info["tables"] == ["user"]
        assert [shard["applied"] for shard in info["shards"]] == [1, 1]
        [replica] = info["replicas"]
        assert replica["up"] and replica["version"] == 1 and replica["behind"] == 0 and replica["lag_s"] == 0
        result = runner.invoke(app, ["ps", "status"])
        assert result.exit_code == 0 and "training copy: version 1" in result.output
    finally:
        result = runner.invoke(app, ["ps", "down"])
    assert result.exit_code == 0, result.output
    assert "ps-replicator-0: stopped" in result.output
    assert not any(services.redis_ping(p) for p in ps_cli_env)


def test_cli_up_refuses_remote_urls(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from core.settings import get_settings
    from recsys.cli import app  # `ps up` / `ps down` are mounted by the shell (local services)

    monkeypatch.setenv("RECSYS_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("RECSYS_PS_SHARDS", '["redis://10.1.2.3:6379/0"]')
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["ps", "up"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code != 0
    assert "only starts servers at redis://127.0.0.1" in " ".join(result.output.split())


@pytest.mark.slow
def test_failover_on_timeout_when_the_nearest_replica_hangs(redis_factory, services_run_dir, shard_urls, ns):
    import os
    import signal

    near, far = redis_factory(f"ps-hang-near-{ns}"), redis_factory(f"ps-hang-far-{ns}")
    pids = {e.name: e.pid for e in services.status(services_run_dir)}
    near_pid, far_pid = pids[f"redis-test-ps-hang-near-{ns}"], pids[f"redis-test-ps-hang-far-{ns}"]
    with RedisStore(shard_urls, [USER], namespace=ns) as source:
        source.push({"user": rows_of(USER, np.arange(100), 1.0)})
        for url in (near.url, far.url):
            with RedisStore([url], [], namespace=ns) as target:
                Replicator(source, target).step()
    # a hung replica costs a read this timeout; a live one must answer within it even on a loaded machine
    reader = FailoverReader([[near.url], [far.url]], [], probe_s=0.1, namespace=ns, timeout=1.0)
    try:
        assert reader.pull("user", np.arange(100)).version == 1 and reader.current == 0
        os.kill(near_pid, signal.SIGSTOP)  # it hangs: connections open, nothing answers
        try:
            got = reader.pull("user", np.arange(100))  # times out on the nearest, then reads the next
            assert got.version == 1 and (got.weights == 1.0).all() and reader.current == 1
            os.kill(far_pid, signal.SIGSTOP)
            try:
                with pytest.raises(ShardUnavailable, match="no replica answered"):
                    reader.pull("user", np.arange(100))
            finally:
                os.kill(far_pid, signal.SIGCONT)
        finally:
            os.kill(near_pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # back to the nearest once the probe sees it answer
            reader.pull("user", np.arange(100))
            if reader.current == 0:
                break
            time.sleep(0.05)
        assert reader.current == 0
    finally:
        reader.close()
