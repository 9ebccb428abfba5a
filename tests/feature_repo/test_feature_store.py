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

from core.settings import PROJECT_ROOT, Settings
from feature_repo.spec import (
    AGE_BOUNDARIES,
    GENDER_ALIASES,
    GENRES,
    OCCUPATIONS,
    SPEC,
    encode_item,
    encode_user,
    join_features,
)
from streaming.processor import Processor
from streaming.records import DictKV, ProcessorConfig, RawRecord

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


def test_every_vocabulary_value_encodes_identically_in_streaming_feature_store_and_training(sqlite_store):
    """Streaming encodes profiles into samples and Feast rows; training reads samples back: all must agree."""
    from training.data import parse_samples, to_columns

    data_dir, store = sqlite_store
    now = time.time()
    genders = list(GENDER_ALIASES) + ["unknown", None]
    ages = sorted({a for b in AGE_BOUNDARIES for a in (b - 1, b)} | {0, 99}) + [None]
    occupations = list(OCCUPATIONS) + ["astronaut", None]
    genres = list(GENRES) + ["unknown-genre"]
    n_users = max(len(genders), len(ages), len(occupations))
    user_profiles = [
        {
            "event_type": "user_profile",
            "event_id": f"up{i}",
            "timestamp": now - 100,
            "user_id": f"cu{i}",
            "gender": genders[i % len(genders)],
            "age": ages[i % len(ages)],
            "occupation": occupations[i % len(occupations)],
            "zip_code": f"{10000 + 37 * i}",
        }
        for i in range(n_users)
    ]
    item_profiles = [
        {
            "event_type": "item_profile",
            "event_id": f"ip{j}",
            "timestamp": now - 100,
            "item_id": f"ci{j}",
            "category": g,
            "genres": [g, genres[(j + 3) % len(genres)]],
            "year": 1900 + 7 * j,
        }
        for j, g in enumerate(genres)
    ]
    pairs = [(f"cu{k % n_users}", f"ci{k % len(genres)}") for k in range(max(n_users, len(genres)))]
    impressions = [
        {
            "event_type": "impression",
            "event_id": f"im{k}",
            "timestamp": now - 50,
            "request_id": f"cr{k}",
            "user_id": u,
            "item_id": i,
            "position": 0,
        }
        for k, (u, i) in enumerate(pairs)
    ]
    stale = {
        "event_type": "impression",
        "event_id": "late",
        "timestamp": now - 10,
        "request_id": "x",
        "user_id": "cu0",
        "item_id": "ci0",
        "position": 1,
    }  # closes every window
    records = [
        RawRecord(0, n, None, orjson.dumps({"schema_version": 1, **e}))
        for n, e in enumerate(user_profiles + item_profiles + impressions + [stale])
    ]

    # streaming: the worker's processor encodes the profiles and builds the samples
    config = ProcessorConfig.from_settings(Settings().override(stream={"attribution_window_s": 5.0}))
    proc = Processor(config, DictKV(), DictKV(), DictKV(), DictKV())
    result = proc.process_batch(records)
    sample_values = [o.value for o in result.out if o.kind == "samples"]
    assert len(sample_values) == len(pairs)

    # the feature store: the same rows the worker pushes, read back online and point-in-time
    for entity, rows in (("user", result.users), ("item", result.items)):
        frame = fs.rows_frame(entity, [e for e, _ in rows.values()], [t for _, t in rows.values()])
        fs.push_online(store, entity, frame)
        fs.write_offline(data_dir, entity, frame)
    online_users = fs.read_online(store, "user", [p["user_id"] for p in user_profiles])
    online_items = fs.read_online(store, "item", [p["item_id"] for p in item_profiles])
    historical = fs.historical(
        store,
        pd.DataFrame(
            {
                "user_id": [u for u, _ in pairs],
                "item_id": [i for _, i in pairs],
                "event_timestamp": [utc(now)] * len(pairs),
            }
        ),
    )

    # the training reader
    samples, stats = parse_samples(sample_values)
    assert stats.samples == len(pairs) and not stats.rejected
    columns = to_columns(samples)

    spec_users = {p["user_id"]: encode_user(p["user_id"], p) for p in user_profiles}
    spec_items = {p["item_id"]: encode_item(p["item_id"], p) for p in item_profiles}
    assert online_users == spec_users
    assert online_items == spec_items
    by_pair = {(r.user_id, r.item_id): r for r in historical.itertuples()}
    for row, sample_id in enumerate(columns.sample_ids):
        sample = next(s for s in samples if s.sample_id == sample_id)
        expected_sparse, expected_dense = join_features(
            spec_users[sample.user_id], spec_items[sample.item_id], sample.user_id, sample.item_id
        )
        assert (sample.sparse, sample.dense) == (expected_sparse, expected_dense)
        hist = by_pair[(sample.user_id, sample.item_id)]
        for name in SPEC.sparse_names:
            lengths, values = columns.gather(name, [row])
            assert values.tolist() == expected_sparse[name]  # training
            assert [int(v) for v in getattr(hist, f"sparse_{name}")] == expected_sparse[name]  # offline store
        for col, name in enumerate(SPEC.dense_names):
            assert columns.dense[row, col] == pytest.approx(expected_dense[name], rel=1e-6)
            assert getattr(hist, f"dense_{name}") == expected_dense[name]
    # every vocabulary value was exercised, each with its own id
    seen_genders = {s.sparse["gender"][0] for s in samples}
    assert seen_genders == {0, 1, 2}
    assert {s.sparse["occupation"][0] for s in samples} == set(range(len(OCCUPATIONS) + 1))
    assert {s.sparse["item_category"][0] for s in samples} == set(range(len(GENRES) + 1))
    assert {s.sparse["age_bucket"][0] for s in samples} == set(range(len(AGE_BOUNDARIES) + 2))
