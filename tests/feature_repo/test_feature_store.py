"""The Feast repository: `feast apply`, online push/read (SQLite and Redis), point-in-time joins,
and one encoding for every vocabulary value across streaming, the feature store and the training reader."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pandas as pd
import pytest

from core.settings import PROJECT_ROOT
from feature_repo import spec as spec_module
from feature_repo.spec import SPEC, encode_item, encode_user

pytestmark = pytest.mark.integration

from feature_repo import store as fs  # noqa: E402 - imports Feast (~10 s); a locked dependency, never skipped


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("feast")
    return data_dir, fs.open_store(data_dir)


def test_feast_apply_cli_succeeds_on_the_repo(tmp_path: Path):
    env = {**os.environ, "RECSYS_FEAST_DATA_DIR": str(tmp_path)}
    feast = Path(sys.executable).with_name("feast")
    done = subprocess.run(
        [str(feast), "apply"], cwd=PROJECT_ROOT / "feature_repo", env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "user_features" in done.stdout and "item_features" in done.stdout
    assert (tmp_path / "registry.db").exists() and (tmp_path / "online.db").exists()


def test_online_push_and_read_back_sqlite(sqlite_store):
    data_dir, store = sqlite_store
    users = [
        encode_user(f"pu{i}", {"gender": "F", "age": 20 + i, "occupation": "writer", "zip_code": "02139"})
        for i in range(3)
    ]
    fs.push_online(store, "user", fs.rows_frame("user", users, [time.time() - 5] * 3))
    got = fs.read_online(store, "user", ["pu0", "pu2", "never-seen"])
    assert got == {"pu0": users[0], "pu2": users[2], "never-seen": None}


def test_online_push_and_read_back_redis(redis_factory, tmp_path: Path):
    redis = redis_factory("feast-store")
    store = fs.open_store(tmp_path, "redis", redis.url)
    items = [encode_item(f"ri{j}", {"genres": ["drama", "war"], "year": 1950 + j}) for j in range(3)]
    fs.push_online(store, "item", fs.rows_frame("item", items, [time.time() - 5] * 3))
    assert fs.read_online(store, "item", ["ri1", "nope"]) == {"ri1": items[1], "nope": None}


def test_point_in_time_join_returns_the_features_valid_at_each_timestamp(sqlite_store):
    data_dir, store = sqlite_store
    t0 = time.time() - 3600
    old = encode_user("hu1", {"gender": "M", "age": 20})
    new = encode_user("hu1", {"gender": "F", "age": 60})
    fs.write_offline(data_dir, "user", fs.rows_frame("user", [old], [t0]))
    fs.write_offline(data_dir, "user", fs.rows_frame("user", [new], [t0 + 100]))
    entity_df = pd.DataFrame(
        {"user_id": ["hu1", "hu1", "hu1"], "event_timestamp": [utc(t0 + 50), utc(t0 + 150), utc(t0 - 10)]}
    )
    frame = fs.historical(store, entity_df)
    rows = {round(ts.timestamp()): row for ts, row in zip(frame["event_timestamp"], frame.itertuples())}
    # after the first profile: the old one; after the update: the new one
    assert list(rows[round(t0 + 50)].sparse_gender) == old.sparse["gender"]
    assert list(rows[round(t0 + 150)].sparse_gender) == new.sparse["gender"]
    assert rows[round(t0 + 150)].dense_user_age == new.dense["user_age"]
    # before any profile there is nothing to join: Feast's file store leaves the row out or empty
    before = rows.get(round(t0 - 10))
    assert (
        before is None
        or before.sparse_gender is None
        or not isinstance(before.sparse_gender, (list, tuple))
        and pd.isna(before.sparse_gender)
    )


@pytest.mark.parametrize("declaration", ["movielens", "ecommerce"])
def test_every_declared_feature_encodes_identically_in_streaming_feature_store_and_training(
    sqlite_store, tmp_path: Path, declaration: str
):
    """Streaming encodes profiles into samples and Feast rows; training reads samples back: all must agree,
    for every feature of every shipped declaration (tests/feature_repo/consistency.py)."""
    from tests.feature_repo import consistency

    if SPEC.name == declaration:  # the process's own spec: in process, on the module's store
        data_dir, store = sqlite_store
        summary = consistency.check(data_dir, store)
    else:  # another spec needs a process of its own (the spec is chosen once per process)
        from tests.feature_repo.declared_loop import run_with_spec

        done = run_with_spec(declaration, "tests.feature_repo.consistency", str(tmp_path / "feast"))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        summary = orjson.loads(done.stdout.rpartition("CONSISTENT ")[2])
    assert summary["spec"] == declaration
    declared = spec_module.load_spec(declaration)
    assert set(summary["distinct"]) == {f.name for f in (*declared.sparse, *declared.dense)}
