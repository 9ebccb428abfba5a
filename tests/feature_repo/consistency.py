"""One encoding for every declared feature across streaming, the feature store and the training reader.

``check(data_dir, store)`` runs under the process's spec (RECSYS_FEATURE_SPEC): profiles made from the
declaration itself (every vocabulary value and alias, both sides of every bucket boundary, hashed
strings, numbers across each numeric feature's clip, missing values) go through the stream worker's
processor, the Feast online and offline stores and the trainer's reader, and every path must give the
spec's encoding. ``test_feature_store.py`` calls it in process for the default spec and runs
``python -m tests.feature_repo.consistency`` for the others, a process per spec as in a deployment.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson


def _values(feature: Any) -> list[Any]:
    """Raw values that reach every id (or a spread of values) of one declared feature, None included."""
    kind = getattr(feature, "kind", "numeric")  # dense features are all numeric
    if kind == "vocab":
        values: list[Any] = [*feature.vocabulary, *(a for a, _ in feature.aliases), "not-in-the-vocabulary", None]
        if feature.multi_valued:  # lists of two, and an empty list
            pairs = [[v, values[(k + 3) % len(values)]] if v is not None else [] for k, v in enumerate(values)]
            return [[x for x in pair if x is not None] for pair in pairs]
        return values
    if kind == "hash":
        return [f"{k}-{feature.name}" for k in range(5)] + [" MIXED Case ", None]  # distinct even as a prefix
    if kind == "bucketize":
        edges = [v for b in feature.boundaries for v in (b - 1, b)]  # just below and at each boundary
        return [int(v) if float(v).is_integer() else v for v in edges] + [None]
    spread = [feature.center + k * feature.scale for k in (-4, -1, 0, 0.5, 2, 4)]
    if feature.transform == "log1p":
        spread = [max(0.0, 2.718281828459045**v - 1) for v in spread]
    # integers: the MovieLens contract types its numeric attributes (age, year) as integers
    return [int(round(v)) for v in spread] + [None]


def profiles(spec: Any, entity: str, now: float) -> list[dict[str, Any]]:
    """Profile events of one entity whose attributes run through every declared feature's values."""
    columns: dict[str, list[Any]] = {}
    for feature in (*spec.sparse, *spec.dense):
        if feature.entity == entity and feature.source and feature.source not in columns:
            columns[feature.source] = _values(feature)
    n = max((len(v) for v in columns.values()), default=1)
    out = []
    for i in range(n):
        event: dict[str, Any] = {"event_type": f"{entity}_profile", "event_id": f"{entity}-p{i}", "timestamp": now}
        event[f"{entity}_id"] = f"c{entity}{i}"
        for source, values in columns.items():
            value = values[i % len(values)]
            if value is not None:
                event[source] = value
        out.append(event)
    return out


def check(data_dir: Path, store: Any) -> dict[str, Any]:
    import pandas as pd

    from core.settings import Settings
    from feature_repo import store as fs
    from feature_repo.spec import SPEC, encode_item, encode_user, join_features
    from streaming.processor import Processor
    from streaming.records import DictKV, ProcessorConfig, RawRecord
    from training.data import parse_samples, to_columns

    now = time.time()
    user_profiles = profiles(SPEC, "user", now - 100)
    item_profiles = profiles(SPEC, "item", now - 100)
    n = max(len(user_profiles), len(item_profiles))
    user_ids = [p["user_id"] for p in user_profiles]
    item_ids = [p["item_id"] for p in item_profiles]
    pairs = [(user_ids[k % len(user_ids)], item_ids[k % len(item_ids)]) for k in range(n)]
    impressions = [
        {"event_type": "impression", "event_id": f"im{k}", "timestamp": now - 50, "request_id": f"cr{k}"}
        | {"user_id": u, "item_id": i, "position": 0}
        for k, (u, i) in enumerate(pairs)
    ]
    closer = {"event_type": "impression", "event_id": "late", "timestamp": now - 10, "request_id": "x"} | {
        "user_id": pairs[0][0],
        "item_id": pairs[0][1],
        "position": 1,
    }  # closes every window
    events = user_profiles + item_profiles + impressions + [closer]
    records = [RawRecord(0, k, None, orjson.dumps({"schema_version": 1, **e})) for k, e in enumerate(events)]

    # streaming: the worker's processor encodes the profiles and builds the samples
    config = ProcessorConfig.from_settings(Settings().override(stream={"attribution_window_s": 5.0}))
    proc = Processor(config, DictKV(), DictKV(), DictKV(), DictKV())
    result = proc.process_batch(records)
    dead = [orjson.loads(o.value) for o in result.out if o.kind == "deadletter"]
    assert not dead, f"profiles made from the declaration were dead-lettered: {dead[:3]}"
    sample_values = [o.value for o in result.out if o.kind == "samples"]
    assert len(sample_values) == len(pairs)

    # the feature store: the rows the worker pushes, read back online and point-in-time
    for entity, rows in (("user", result.users), ("item", result.items)):
        frame = fs.rows_frame(entity, [e for e, _ in rows.values()], [t for _, t in rows.values()])
        fs.push_online(store, entity, frame)
        fs.write_offline(data_dir, entity, frame)
    online_users = fs.read_online(store, "user", [p["user_id"] for p in user_profiles])
    online_items = fs.read_online(store, "item", [p["item_id"] for p in item_profiles])
    # one timestamp per entity row: Feast's file store keeps one row per (entity, timestamp) of a view,
    # and a user appears in several pairs when the item side has more profiles
    when = [datetime.fromtimestamp(now + k * 1e-3, UTC) for k in range(n)]
    historical = fs.historical(
        store,
        pd.DataFrame({"user_id": [u for u, _ in pairs], "item_id": [i for _, i in pairs], "event_timestamp": when}),
    )

    # the training reader
    samples, stats = parse_samples(sample_values)
    assert stats.samples == len(pairs) and not stats.rejected, stats
    columns = to_columns(samples)

    spec_users = {p["user_id"]: encode_user(p["user_id"], p) for p in user_profiles}
    spec_items = {p["item_id"]: encode_item(p["item_id"], p) for p in item_profiles}
    assert online_users == spec_users
    assert online_items == spec_items
    by_pair = {(r.user_id, r.item_id): r for r in historical.itertuples()}
    by_id = {s.sample_id: s for s in samples}
    for row, sample_id in enumerate(columns.sample_ids):
        sample = by_id[sample_id]
        expected_sparse, expected_dense = join_features(
            spec_users[sample.user_id], spec_items[sample.item_id], sample.user_id, sample.item_id
        )
        assert (sample.sparse, sample.dense) == (expected_sparse, expected_dense)
        hist = by_pair[(sample.user_id, sample.item_id)]
        for name in SPEC.sparse_names:
            _, values = columns.gather(name, [row])
            assert values.tolist() == expected_sparse[name], name  # training
            assert [int(v) for v in getattr(hist, f"sparse_{name}")] == expected_sparse[name], name  # offline store
        for col, name in enumerate(SPEC.dense_names):
            assert abs(columns.dense[row, col] - expected_dense[name]) <= 1e-6 * max(1.0, abs(expected_dense[name]))
            assert getattr(hist, f"dense_{name}") == expected_dense[name], name

    # every declared feature was exercised: small tables in full, hashed and numeric ones spread out
    seen: dict[str, Any] = {}
    for feature in SPEC.sparse:
        ids = {i for s in samples for i in s.sparse[feature.name]}
        seen[feature.name] = len(ids)
        if feature.kind in ("vocab", "bucketize"):
            assert ids == set(range(feature.cardinality)), (feature.name, sorted(ids))
        else:
            assert len(ids - {0}) >= 2 and (feature.kind == "id" or 0 in ids), (feature.name, sorted(ids))
    for col, feature in enumerate(SPEC.dense):
        values = {round(float(v), 6) for v in columns.dense[:, col]}
        seen[feature.name] = len(values)
        assert 0.0 in values and len(values) >= 4, (feature.name, sorted(values))
    return {"spec": SPEC.name, "samples": len(samples), "distinct": seen}


if __name__ == "__main__":
    from feature_repo import store as fs

    folder = Path(sys.argv[1])
    summary = check(folder, fs.open_store(folder))
    sys.stdout.write("CONSISTENT " + orjson.dumps(summary).decode() + "\n")
