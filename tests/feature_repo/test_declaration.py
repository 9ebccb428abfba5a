"""Feature declarations (issue #18, item 6): the MovieLens declaration encodes exactly as the spec did
before it existed, malformed declarations are refused naming the field, the setting chooses one."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import PROJECT_ROOT
from feature_repo.declaration import DeclarationError, available, load_declaration
from feature_repo.spec import MOVIELENS, build_spec, load_spec

CAPTURED = Path(__file__).parent / "data" / "movielens_encodings.json.gz"


@pytest.fixture(scope="module")
def captured() -> dict:
    # made by feature_repo/spec.py as it was at 49d7bf3, before declarations: the hard-coded MovieLens spec
    with gzip.open(CAPTURED, "rt") as f:
        return json.load(f)


def test_movielens_declaration_encodes_every_captured_input_exactly_as_the_hard_coded_spec_did(captured) -> None:
    assert len(captured["users"]) > 400 and len(captured["items"]) > 400
    assert {f.name: f.cardinality for f in MOVIELENS.sparse} == captured["cardinalities"]
    for user in captured["users"]:
        got = MOVIELENS.encode("user", user["user_id"], user["attrs"])
        assert (got.sparse, got.dense) == (user["sparse"], user["dense"]), user
    for item in captured["items"]:
        got = MOVIELENS.encode("item", item["item_id"], item["attrs"])
        assert (got.sparse, got.dense) == (item["sparse"], item["dense"]), item
    for pair in captured["joined"]:
        user, item = captured["users"][pair["user"]], captured["items"][pair["item"]]
        sparse, dense = MOVIELENS.join(
            MOVIELENS.encode("user", user["user_id"], user["attrs"]) if pair["user_known"] else None,
            MOVIELENS.encode("item", item["item_id"], item["attrs"]) if pair["item_known"] else None,
            user["user_id"],
            item["item_id"],
        )
        assert list(sparse) == pair["sparse_order"] and list(dense) == pair["dense_order"]
        assert (sparse, dense) == (pair["sparse"], pair["dense"])


def test_the_captured_inputs_exercise_every_vocabulary_value_bucket_and_missing_value(captured) -> None:
    """The table would prove little if it only held a few values: every id of every small table appears."""
    for feature in MOVIELENS.sparse:
        if feature.kind in ("vocab", "bucketize"):
            records = captured["users"] if feature.entity == "user" else captured["items"]
            seen = {i for r in records for i in r["sparse"][feature.name]}
            assert seen == set(range(feature.cardinality)), feature.name


def test_the_default_spec_is_the_movielens_declaration() -> None:
    from feature_repo.spec import SPEC

    if os.environ.get("RECSYS_FEATURE_SPEC", "movielens") == "movielens":
        assert SPEC == MOVIELENS
    assert {"movielens", "ecommerce"} <= set(available())


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return str(path)


_IDS = """
  - {name: user_id, entity: user, kind: id}
  - {name: item_id, entity: item, kind: id}
"""


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "name: x\nfeatures:\n" + _IDS + "  - {name: c, entity: user, kind: colour, source: c}\n",
            r"features\[2\] \(c\)",
        ),
        (
            "name: x\nfeatures:\n" + _IDS + "  - {name: c, entity: user, kind: vocab, vocabulary: [a]}\n",
            r"\(c\)\.source",
        ),
        (
            "name: x\nfeatures:\n" + _IDS + "  - {name: c, entity: user, kind: vocab, source: c, vocabluary: [a]}\n",
            r"\(c\)\.vocabluary: Extra inputs",
        ),
        (
            "name: x\nfeatures:\n"
            + _IDS
            + "  - {name: c, entity: user, kind: vocab, source: c, vocabulary: [a], aliases: {b: z}}\n",
            r"alias 'b' points to 'z'",
        ),
        (
            "name: x\nfeatures:\n" + _IDS + "  - {name: c, entity: user, kind: vocab, source: c, vocabulary: [A]}\n",
            r"\(c\)\.vocabulary: .*lower case",
        ),
        (
            "name: x\nfeatures:\n"
            + _IDS
            + "  - {name: b, entity: item, kind: bucketize, source: b, boundaries: [3, 2]}\n",
            r"\(b\)\.boundaries: .*strictly increasing",
        ),
        (
            "name: x\nfeatures:\n" + _IDS + "  - {name: h, entity: user, kind: hash, source: h, bits: 63}\n",
            r"\(h\)\.bits",
        ),
        (
            "name: x\nfeatures:\n" + _IDS + "  - {name: n, entity: item, kind: numeric, source: n, scale: 0}\n",
            r"\(n\)\.scale",
        ),
        (
            "name: x\nfeatures:\n" + _IDS + "  - {name: user_id, entity: user, kind: id}\n",
            r"appear twice: \['user_id'\]",
        ),
        (
            "name: x\nfeatures:\n  - {name: u, entity: user, kind: id}\n  - {name: item_id, entity: item, kind: id}\n",
            r"exactly one id feature named user_id",
        ),
        (
            "name: x\nfeatures:\n" + _IDS + "  - {name: Bad-Name, entity: user, kind: id}\n",
            r"features\[2\] \(Bad-Name\)\.name",
        ),
        ("name: x\nfeatures: []\n", r"features: List should have at least 2 items"),
        ("- just\n- a list\n", r"a feature declaration is a mapping"),
        ("name: x\nfeatures: [\n", r"not valid YAML"),
    ],
)
def test_a_malformed_declaration_is_refused_naming_the_file_and_the_field(tmp_path, body: str, message: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(DeclarationError, match=message) as info:
        load_declaration(path)
    assert str(info.value).startswith(path)


def test_a_missing_declaration_names_the_shipped_ones() -> None:
    with pytest.raises(DeclarationError, match=r"no feature declaration .*shipped: .*ecommerce.*movielens"):
        load_declaration("no-such-spec")


def _spec_in_subprocess(value: str, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RECSYS_FEATURE_SPEC": value}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_setting_chooses_the_declaration_of_the_process_and_a_bad_one_fails_clearly() -> None:
    done = _spec_in_subprocess("ecommerce", "from feature_repo.spec import SPEC; print(SPEC.name, SPEC.sparse_names)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ecommerce ") and "genres" not in done.stdout
    by_path = _spec_in_subprocess(
        str(PROJECT_ROOT / "feature_repo" / "specs" / "ecommerce.yaml"),
        "from feature_repo.spec import SPEC; print(SPEC.name)",
    )
    assert by_path.stdout.strip() == "ecommerce", by_path.stderr
    bad = _spec_in_subprocess("no-such-spec", "import feature_repo.spec")
    assert bad.returncode != 0
    assert (
        "DeclarationError: no feature declaration" in bad.stderr and "RECSYS_FEATURE_SPEC='no-such-spec'" in bad.stderr
    )


def test_the_ecommerce_declaration_hashes_user_columns_scales_item_context_and_has_no_genres() -> None:
    spec = load_spec("ecommerce")
    assert "genres" not in spec.sparse_names and not any(f.multi_valued and f.kind == "vocab" for f in spec.sparse)
    user_attrs = [f for f in spec.sparse if f.entity == "user" and f.kind != "id"]
    assert user_attrs and all(f.kind == "hash" for f in user_attrs)
    item_dense = [f for f in spec.dense if f.entity == "item"]
    assert len(item_dense) >= 2
    a = spec.encode("user", "c1", {f.source: "Value-1" for f in user_attrs})
    b = spec.encode("user", "c1", {f.source: " value-1 " for f in user_attrs})
    assert a.sparse == b.sparse and all(ids != [0] for name, ids in a.sparse.items())
    missing = spec.encode("user", "c1", {})
    assert all(missing.sparse[f.name] == [0] for f in user_attrs)
    price = next(f for f in item_dense if f.transform == "log1p")
    assert spec.encode("item", "p", {price.source: -5}).dense[price.name] == 0.0  # outside log1p's domain: missing
    assert spec.encode("item", "p", {price.source: "12"}).dense[price.name] == 0.0  # a string is not a number
    assert spec.encode("item", "p", {price.source: 1e12}).dense[price.name] == price.clip
    # a rebuilt spec is equal (and hashes equal): the hash is a function of the declaration
    assert build_spec(load_declaration("ecommerce")).spec_hash() == spec.spec_hash() != MOVIELENS.spec_hash()


# ---------------------------------------------------------------- the hard-coded encoders, frozen
# feature_repo/spec.py's MovieLens encoders as they were at 49d7bf3, kept only as the reference the
# declared spec is compared with over arbitrary inputs (the captured table above pins the ids too).


def _reference_user(user_id: str, attrs: dict) -> tuple[dict, dict]:
    import math as m
    from bisect import bisect_right

    from feature_repo.spec import AGE_BOUNDARIES, GENDER_ALIASES, GENDERS, OCCUPATION_ALIASES, OCCUPATIONS, hash_id

    def vocab(values, aliases, raw):
        if raw is None:
            return 0
        value = str(raw).strip().lower()
        value = aliases.get(value, value)
        return {v: i + 1 for i, v in enumerate(values)}.get(value, 0)

    age = attrs.get("age")
    number = not (age is None or isinstance(age, bool) or not isinstance(age, (int, float)) or not m.isfinite(age))
    bucket = bisect_right(AGE_BOUNDARIES, age) + 1 if number and age >= 0 else 0
    zip_code = attrs.get("zip_code")
    prefix = str(zip_code).strip()[:3].upper() if zip_code is not None else ""
    sparse = {
        "user_id": [hash_id("user_id", user_id)],
        "gender": [vocab(GENDERS, GENDER_ALIASES, attrs.get("gender"))],
        "age_bucket": [bucket],
        "occupation": [vocab(OCCUPATIONS, OCCUPATION_ALIASES, attrs.get("occupation"))],
        "zip_prefix": [hash_id("zip_prefix", prefix, 16) if prefix else 0],
    }
    return sparse, {"user_age": max(-3.0, min(3.0, (float(age) - 35.0) / 15.0)) if number else 0.0}


def _reference_item(item_id: str, attrs: dict) -> tuple[dict, dict]:
    import math as m

    from feature_repo.spec import GENRES, hash_id

    index = {v: i + 1 for i, v in enumerate(GENRES)}

    def vocab(raw):
        return 0 if raw is None else index.get(str(raw).strip().lower(), 0)

    genres = attrs.get("genres") or []
    category = attrs.get("category")
    if category is None and genres:
        category = genres[0]
    year = attrs.get("year")
    number = not (year is None or isinstance(year, bool) or not isinstance(year, (int, float)) or not m.isfinite(year))
    sparse = {
        "item_id": [hash_id("item_id", item_id)],
        "item_category": [vocab(category)],
        "genres": sorted({vocab(g) for g in genres} - {0}) or [0],
    }
    return sparse, {"item_year": max(-3.0, min(3.0, (float(year) - 1990.0) / 15.0)) if number else 0.0}


def _word(values: tuple[str, ...]):
    from hypothesis import strategies as st

    known = st.sampled_from(values).flatmap(lambda v: st.sampled_from([v, v.upper(), f" {v.title()}  "]))
    return st.one_of(st.none(), known, st.text(max_size=12))


def _user_attrs():
    from hypothesis import strategies as st

    from feature_repo.spec import GENDER_ALIASES, OCCUPATION_ALIASES, OCCUPATIONS

    number = st.one_of(st.none(), st.integers(-5, 160), st.floats(allow_nan=True, allow_infinity=True), st.booleans())
    return st.fixed_dictionaries(
        {},
        optional={
            "gender": _word(tuple(GENDER_ALIASES)),
            "age": number,
            "occupation": _word(OCCUPATIONS + tuple(OCCUPATION_ALIASES)),
            "zip_code": st.one_of(st.none(), st.text(max_size=8), st.integers(0, 99999)),
        },
    )


def _item_attrs():
    from hypothesis import strategies as st

    from feature_repo.spec import GENRES

    number = st.one_of(st.none(), st.integers(1700, 2300), st.floats(allow_nan=True, allow_infinity=True))
    return st.fixed_dictionaries(
        {},
        optional={
            "category": _word(GENRES),
            "genres": st.lists(_word(GENRES), max_size=5),
            "year": number,
        },
    )


def test_the_declared_movielens_spec_equals_the_hard_coded_encoders_on_arbitrary_inputs() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=400, deadline=None)
    @given(st.text(min_size=1, max_size=10), _user_attrs(), _item_attrs())
    def check(entity_id: str, user: dict, item: dict) -> None:
        got_user = MOVIELENS.encode("user", entity_id, user)
        got_item = MOVIELENS.encode("item", entity_id, item)
        assert (got_user.sparse, got_user.dense) == _reference_user(entity_id, user)
        assert (got_item.sparse, got_item.dense) == _reference_item(entity_id, item)

    check()
