"""The one feature spec: every encoding of the system is defined here and nowhere else.

Streaming encodes profiles with it before writing them to Feast, serving encodes the
features it scores with, the trainer reads the encoded ids back, so the three cannot
disagree. Index 0 of every vocabulary and bucketization means "missing or unknown".

Ids (user, item, zip prefix) are hashed with a keyed BLAKE2b into a 62-bit space: stable
across processes and machines (unlike ``hash()``), so any process can compute the row key
of the parameter service without a shared dictionary.

This module imports nothing heavy (no Feast, no torch): it sits on every hot path.
"""

from __future__ import annotations

import hashlib
import json
import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Literal

SPEC_VERSION = 1

# --------------------------------------------------------------------------- vocabularies

GENDER_ALIASES: dict[str, str] = {
    "m": "male",
    "male": "male",
    "man": "male",
    "f": "female",
    "female": "female",
    "woman": "female",
}
GENDERS: tuple[str, ...] = ("male", "female")

# Age buckets of MovieLens: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+.
AGE_BOUNDARIES: tuple[int, ...] = (18, 25, 35, 45, 50, 56)

OCCUPATIONS: tuple[str, ...] = (
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
)

# The 21 occupation names of MovieLens-1M (its users file codes them 0..20) folded onto the
# vocabulary above, so both MovieLens sets and every client share one table. Where 1M is
# finer or different (farmer, tradesman, self-employed, customer service) the value goes
# to "other"; K-12 and college students share "student". Appending new names instead
# would grow the table and change the simulator's world, which other rooms' tests fix.
OCCUPATION_ALIASES: dict[str, str] = {
    "other or not specified": "other",
    "academic/educator": "educator",
    "clerical/admin": "administrator",
    "college/grad student": "student",
    "customer service": "other",
    "doctor/health care": "healthcare",
    "executive/managerial": "executive",
    "farmer": "other",
    "k-12 student": "student",
    "sales/marketing": "marketing",
    "self-employed": "other",
    "technician/engineer": "technician",
    "tradesman/craftsman": "other",
    "unemployed": "none",
}

GENRES: tuple[str, ...] = (
    "action",
    "adventure",
    "animation",
    "children's",
    "comedy",
    "crime",
    "documentary",
    "drama",
    "fantasy",
    "film-noir",
    "horror",
    "musical",
    "mystery",
    "romance",
    "sci-fi",
    "thriller",
    "war",
    "western",
)

ID_HASH_BITS = 62
ZIP_PREFIX_DIGITS = 3
ZIP_HASH_BITS = 16


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class SparseFeature:
    """One embedding table: an entity attribute turned into integer ids."""

    name: str
    entity: Literal["user", "item"]
    kind: Literal["hash", "vocab", "bucketize"]
    cardinality: int
    multi_valued: bool = False
    vocabulary: tuple[str, ...] = ()
    boundaries: tuple[int, ...] = ()


@dataclass(frozen=True)
class DenseFeature:
    """A numeric attribute, standardised as clip((x - center) / scale, -clip, clip); missing -> 0."""

    name: str
    entity: Literal["user", "item"]
    source: str
    center: float
    scale: float
    clip: float = 3.0


@dataclass(frozen=True)
class FeatureSpec:
    sparse: tuple[SparseFeature, ...] = field(default_factory=tuple)
    dense: tuple[DenseFeature, ...] = field(default_factory=tuple)

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.dense]

    def sparse_feature(self, name: str) -> SparseFeature:
        for feature in self.sparse:
            if feature.name == name:
                return feature
        raise KeyError(f"unknown sparse feature {name!r}; known: {self.sparse_names}")

    def spec_hash(self) -> str:
        """A short digest of every encoding decision; recorded with each model version."""
        payload = json.dumps({"version": SPEC_VERSION, **asdict(self)}, sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


SPEC = FeatureSpec(
    sparse=(
        SparseFeature("user_id", "user", "hash", 1 << ID_HASH_BITS),
        SparseFeature("gender", "user", "vocab", len(GENDERS) + 1, vocabulary=GENDERS),
        SparseFeature("age_bucket", "user", "bucketize", len(AGE_BOUNDARIES) + 2, boundaries=AGE_BOUNDARIES),
        SparseFeature("occupation", "user", "vocab", len(OCCUPATIONS) + 1, vocabulary=OCCUPATIONS),
        SparseFeature("zip_prefix", "user", "hash", 1 << ZIP_HASH_BITS),
        SparseFeature("item_id", "item", "hash", 1 << ID_HASH_BITS),
        SparseFeature("item_category", "item", "vocab", len(GENRES) + 1, vocabulary=GENRES),
        SparseFeature("genres", "item", "vocab", len(GENRES) + 1, multi_valued=True, vocabulary=GENRES),
    ),
    dense=(
        DenseFeature("user_age", "user", "age", center=35.0, scale=15.0),
        DenseFeature("item_year", "item", "year", center=1990.0, scale=15.0),
    ),
)

USER_SPARSE = tuple(f.name for f in SPEC.sparse if f.entity == "user")
ITEM_SPARSE = tuple(f.name for f in SPEC.sparse if f.entity == "item")


# --------------------------------------------------------------------------- encoders


@lru_cache(maxsize=1 << 18)
def hash_id(namespace: str, value: str, bits: int = ID_HASH_BITS) -> int:
    """Stable non-negative id of ``value`` in ``namespace`` (fits int64)."""
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8, person=namespace.encode()[:16]).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)


def _normalize(raw: Any) -> str:
    return str(raw).strip().lower()


_VOCAB_INDEX: dict[str, dict[str, int]] = {
    f.name: {value: i + 1 for i, value in enumerate(f.vocabulary)} for f in SPEC.sparse if f.kind == "vocab"
}


def vocab_index(feature: str, raw: Any) -> int:
    """Index of ``raw`` in the vocabulary of ``feature``; 0 for missing or unknown values."""
    if raw is None:
        return 0
    value = _normalize(raw)
    if feature == "gender":
        value = GENDER_ALIASES.get(value, value)
    elif feature == "occupation":
        value = OCCUPATION_ALIASES.get(value, value)
    return _VOCAB_INDEX[feature].get(value, 0)


def age_bucket(age: Any) -> int:
    if age is None or isinstance(age, bool) or not isinstance(age, (int, float)) or not math.isfinite(age) or age < 0:
        return 0
    return bisect_right(AGE_BOUNDARIES, age) + 1


def zip_prefix(zip_code: Any) -> int:
    if zip_code is None:
        return 0
    prefix = str(zip_code).strip()[:ZIP_PREFIX_DIGITS].upper()
    return hash_id("zip_prefix", prefix, ZIP_HASH_BITS) if prefix else 0


def standardize(feature: DenseFeature, raw: Any) -> float:
    if raw is None or isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        return 0.0
    return max(-feature.clip, min(feature.clip, (float(raw) - feature.center) / feature.scale))


_DENSE = {f.name: f for f in SPEC.dense}


def user_id_key(user_id: str) -> int:
    return hash_id("user_id", user_id)


def item_id_key(item_id: str) -> int:
    return hash_id("item_id", item_id)


@dataclass(frozen=True)
class EncodedEntity:
    """The encoded features of one user or one item: sparse ids per table and dense values."""

    entity: Literal["user", "item"]
    entity_id: str
    sparse: dict[str, list[int]]
    dense: dict[str, float]

    def as_row(self) -> dict[str, Any]:
        """Flat row for the feature store: one column per feature."""
        return {"entity_id": self.entity_id, **self.sparse, **self.dense}


def encode_user(user_id: str, attributes: Mapping[str, Any] | None = None) -> EncodedEntity:
    attrs = attributes or {}
    return EncodedEntity(
        "user",
        user_id,
        sparse={
            "user_id": [user_id_key(user_id)],
            "gender": [vocab_index("gender", attrs.get("gender"))],
            "age_bucket": [age_bucket(attrs.get("age"))],
            "occupation": [vocab_index("occupation", attrs.get("occupation"))],
            "zip_prefix": [zip_prefix(attrs.get("zip_code"))],
        },
        dense={"user_age": standardize(_DENSE["user_age"], attrs.get("age"))},
    )


def encode_item(item_id: str, attributes: Mapping[str, Any] | None = None) -> EncodedEntity:
    attrs = attributes or {}
    genres = attrs.get("genres") or []
    genre_ids = sorted({vocab_index("genres", g) for g in genres} - {0}) or [0]
    category = attrs.get("category")
    if category is None and genres:
        category = genres[0]
    return EncodedEntity(
        "item",
        item_id,
        sparse={
            "item_id": [item_id_key(item_id)],
            "item_category": [vocab_index("item_category", category)],
            "genres": genre_ids,
        },
        dense={"item_year": standardize(_DENSE["item_year"], attrs.get("year"))},
    )


def encode_record(record: Mapping[str, Any] | Any) -> EncodedEntity:
    """Encode one raw profile record (an event model or its dict) into features.

    ``user_profile`` records become user features, ``item_profile`` records item features.
    """
    data = record if isinstance(record, Mapping) else record.model_dump()
    event_type = data.get("event_type")
    if event_type == "user_profile":
        return encode_user(data["user_id"], data)
    if event_type == "item_profile":
        return encode_item(data["item_id"], data)
    raise ValueError(f"only user_profile and item_profile records carry features, got {event_type!r}")


def join_features(
    user: EncodedEntity | None, item: EncodedEntity | None, user_id: str, item_id: str
) -> tuple[dict[str, list[int]], dict[str, float]]:
    """Sparse ids and dense values of one (user, item) pair, in spec order.

    A user or item without a known profile still gets its id feature; the other features
    take their "missing" encoding, so every sample has every feature.
    """
    user = user or encode_user(user_id)
    item = item or encode_item(item_id)
    sparse = {name: (user.sparse if name in user.sparse else item.sparse)[name] for name in SPEC.sparse_names}
    dense = {name: (user.dense if name in user.dense else item.dense)[name] for name in SPEC.dense_names}
    return sparse, dense


def validate_encoded(sparse: Mapping[str, Sequence[int]], dense: Mapping[str, float]) -> None:
    """Raise ValueError unless the features have exactly the spec's names and ids within range."""
    if set(sparse) != set(SPEC.sparse_names):
        raise ValueError(f"sparse features {sorted(sparse)} differ from the spec's {sorted(SPEC.sparse_names)}")
    if set(dense) != set(SPEC.dense_names):
        raise ValueError(f"dense features {sorted(dense)} differ from the spec's {sorted(SPEC.dense_names)}")
    for feature in SPEC.sparse:
        ids = sparse[feature.name]
        if not ids:
            raise ValueError(f"sparse feature {feature.name!r} has no id")
        if len(ids) > 1 and not feature.multi_valued:
            raise ValueError(f"sparse feature {feature.name!r} is single-valued, got {len(ids)} ids")
        for value in ids:
            if not 0 <= value < feature.cardinality:
                raise ValueError(f"id {value} of {feature.name!r} outside [0, {feature.cardinality})")
    for name, number in dense.items():
        if not math.isfinite(number):
            raise ValueError(f"dense feature {name!r} is not finite")
