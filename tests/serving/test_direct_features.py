"""The direct Redis read of the online store returns exactly what Feast's ``get_online_features`` returns.

Real Redis, real Feast pushes (the stream worker's write path): users and items with every
feature filled, partly missing profiles, ids never pushed, and an updated profile. The comparison is
per column against Feast's own ``to_dict`` answer, then per entity through serving's assembly.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from feature_repo import features as defs
from feature_repo import store as fs
from feature_repo.spec import encode_item, encode_user
from serving.features import FeastFeatures, RedisFeatures

pytestmark = pytest.mark.integration


@pytest.fixture
def pushed(redis_factory, tmp_path: Path):
    redis = redis_factory("direct-features")
    store = fs.open_store(tmp_path, "redis", redis.url)
    now = time.time()
    users = [
        encode_user("du0", {"gender": "F", "age": 31, "occupation": "writer", "zip_code": "02139"}),
        encode_user("du1", {"gender": "M"}),  # the rest take the "missing" encoding
        encode_user("du2", {}),
    ]
    items = [
        encode_item("di0", {"genres": ["drama", "war"], "year": 1950}),
        encode_item("di1", {"genres": ["comedy"]}),
        encode_item("di2", {}),
    ]
    fs.push_online(store, "user", fs.rows_frame("user", users, [now - 50] * 3))
    fs.push_online(store, "item", fs.rows_frame("item", items, [now - 50] * 3))
    # a later profile of du1 overwrites the first
    fs.push_online(store, "user", fs.rows_frame("user", [encode_user("du1", {"gender": "F", "age": 60})], [now - 5]))
    reader = fs.RedisOnlineReader(redis.url, timeout_s=2.0)
    yield store, reader
    reader.close()


def test_every_column_equals_get_online_features(pushed):
    store, reader = pushed
    wanted = {"user": ["du0", "du1", "du2", "never-pushed"], "item": ["di2", "nope", "di0", "di1"]}
    direct = reader.read(wanted)
    for entity, ids in wanted.items():
        refs = [f"{entity}_features:{c}" for c in defs.columns(entity)]
        key = defs.JOIN_KEYS[entity]
        feast = store.get_online_features(features=refs, entity_rows=[{key: i} for i in ids]).to_dict()
        for n, entity_id in enumerate(ids):
            row = direct[entity][n]
            if feast[defs.columns(entity)[0]][n] is None:
                assert row is None, entity_id
                continue
            assert row == {c: feast[c][n] for c in defs.columns(entity)}, entity_id
    assert direct["user"][3] is None and direct["item"][1] is None


def test_serving_gets_the_same_entities_through_either_path(pushed):
    store, reader = pushed
    users, items = ["du1", "du0", "ghost"], ["di0", "di1", "di2", "ghost-item"]
    via_feast = FeastFeatures(store).fetch(users, items)
    direct = RedisFeatures(store, reader).fetch(users, items)
    assert direct == via_feast
    assert (
        direct[0]["du1"] is not None and direct[0]["du1"].dense == encode_user("du1", {"gender": "F", "age": 60}).dense
    )
    assert direct[0]["ghost"] is None and direct[1]["ghost-item"] is None


def test_a_down_store_is_features_unavailable(pushed, redis_factory):
    from serving.features import FeaturesUnavailable

    store, _ = pushed
    dead = fs.RedisOnlineReader("redis://127.0.0.1:1/0", timeout_s=0.5)  # nothing listens on port 1
    features = RedisFeatures(store, dead)
    with pytest.raises(FeaturesUnavailable):
        features.fetch(["du0"], ["di0"])
    assert features.healthy() is False
