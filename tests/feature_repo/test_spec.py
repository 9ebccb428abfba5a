"""The feature spec: deterministic, equal raw values encode equally, unknowns map to 0."""

from __future__ import annotations

import subprocess
import sys

import pytest

from feature_repo.spec import (
    AGE_BOUNDARIES,
    GENRES,
    OCCUPATIONS,
    SPEC,
    encode_item,
    encode_record,
    encode_user,
    hash_id,
    join_features,
    validate_encoded,
    vocab_index,
)


def test_encoding_is_deterministic_and_equal_for_equal_raw_values() -> None:
    a = encode_user("u1", {"gender": "F", "age": 31, "occupation": "writer", "zip_code": "94110"})
    b = encode_user("u1", {"gender": "female", "age": 31, "occupation": " Writer ", "zip_code": "94117"})
    assert a.sparse == b.sparse  # aliases, case and whitespace normalise; same 3-digit zip prefix
    assert a.dense == b.dense
    assert (
        encode_item("i9", {"genres": ["war", "drama"]}).sparse
        == encode_item("i9", {"genres": ["War", " Drama"]}).sparse
    )


def test_hash_ids_are_stable_across_processes() -> None:
    """Python's hash() is salted per process; ours must not be."""
    code = "from feature_repo.spec import hash_id; print(hash_id('user_id', 'u42'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert int(other) == hash_id("user_id", "u42")
    assert hash_id("user_id", "u42") != hash_id("item_id", "u42")  # namespaces separate tables
    assert 0 <= hash_id("user_id", "u42") < 1 << 62


@pytest.mark.parametrize(
    "feature, vocabulary",
    [("gender", ("male", "female")), ("occupation", OCCUPATIONS), ("item_category", GENRES), ("genres", GENRES)],
)
def test_vocabularies_are_dense_and_reserve_zero(feature: str, vocabulary: tuple[str, ...]) -> None:
    indices = [vocab_index(feature, value) for value in vocabulary]
    assert indices == list(range(1, len(vocabulary) + 1))
    assert vocab_index(feature, None) == 0
    assert vocab_index(feature, "no-such-value") == 0
    assert SPEC.sparse_feature(feature).cardinality == len(vocabulary) + 1


def test_age_buckets_follow_the_boundaries() -> None:
    age_bucket = SPEC.sparse_feature("age_bucket").index
    assert [age_bucket(a) for a in (None, -1, 0, 17, 18, 24, 25, 49, 50, 55, 56, 99)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        5,
        6,
        6,
        7,
        7,
    ]
    assert SPEC.sparse_feature("age_bucket").cardinality == len(AGE_BOUNDARIES) + 2
    assert age_bucket(True) == 0 and age_bucket(float("nan")) == 0


def test_dense_features_are_standardised_and_clipped() -> None:
    assert encode_user("u", {"age": 35}).dense["user_age"] == 0.0
    assert encode_user("u", {"age": 150}).dense["user_age"] == 3.0
    assert encode_user("u").dense["user_age"] == 0.0  # missing -> 0
    assert encode_item("i", {"year": 2005}).dense["item_year"] == pytest.approx(1.0)


def test_join_gives_every_feature_of_the_spec_even_without_profiles() -> None:
    sparse, dense = join_features(None, None, "u-new", "i-new")
    assert list(sparse) == SPEC.sparse_names and list(dense) == SPEC.dense_names
    assert sparse["user_id"] == [hash_id("user_id", "u-new")]
    assert sparse["gender"] == [0] and sparse["genres"] == [0]
    validate_encoded(sparse, dense)


def test_encode_record_dispatches_on_event_type() -> None:
    user = encode_record({"event_type": "user_profile", "user_id": "u1", "gender": "M"})
    assert user.entity == "user" and user.sparse["gender"] == [1]
    item = encode_record({"event_type": "item_profile", "item_id": "i1", "genres": ["comedy"]})
    assert item.entity == "item" and item.sparse["item_category"] == [vocab_index("item_category", "comedy")]
    with pytest.raises(ValueError, match="only user_profile and item_profile"):
        encode_record({"event_type": "click"})


def test_validate_encoded_rejects_out_of_spec_features() -> None:
    sparse, dense = join_features(None, None, "u", "i")
    with pytest.raises(ValueError, match="differ from the spec"):
        validate_encoded({**sparse, "extra": [1]}, dense)
    with pytest.raises(ValueError, match="outside"):
        validate_encoded({**sparse, "gender": [99]}, dense)
    with pytest.raises(ValueError, match="single-valued"):
        validate_encoded({**sparse, "gender": [1, 2]}, dense)


def test_spec_hash_changes_with_the_spec() -> None:
    import dataclasses

    changed = dataclasses.replace(SPEC, dense=SPEC.dense[:1])
    assert SPEC.spec_hash() == SPEC.spec_hash()
    assert changed.spec_hash() != SPEC.spec_hash()
