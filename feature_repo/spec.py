"""The one feature spec: every encoding of the system is defined here and nowhere else.

Streaming encodes profiles with it before writing them to Feast, serving encodes the
features it scores with, the trainer reads the encoded ids back, so the three cannot
disagree. Index 0 of every vocabulary and bucketization means "missing or unknown".

What is encoded comes from a feature declaration (``declaration.py``, files in
``feature_repo/specs/``); ``RECSYS_FEATURE_SPEC`` chooses the one of this deployment,
read once when this module is imported, so every room of a process encodes alike. The
default is the MovieLens declaration. The Feast views, the training tables and the model
follow from ``SPEC``; nothing else in the system names a feature's encoding.

Ids (user, item, hashed attributes) are hashed with a keyed BLAKE2b into a 62-bit space
(or fewer bits): stable across processes and machines (unlike ``hash()``), so any process
can compute the row key of the parameter service without a shared dictionary.

This module imports nothing heavy (no Feast, no torch): it sits on every hot path.
"""

from __future__ import annotations

import hashlib
import json
import math
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache, lru_cache
from typing import Any, Literal

from core.settings import FeatureSettings
from feature_repo.declaration import (
    ID_HASH_BITS,
    BucketizeFeature,
    Declaration,
    HashFeature,
    IdFeature,
    NumericFeature,
    VocabFeature,
    load_declaration,
)

# 2: features carry their source attribute and encoding options (the declaration), ids are kind "id"
SPEC_VERSION = 2


@lru_cache(maxsize=1 << 18)
def hash_id(namespace: str, value: str, bits: int = ID_HASH_BITS) -> int:
    """Stable non-negative id of ``value`` in ``namespace`` (fits int64)."""
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8, person=namespace.encode()[:16]).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)


def _normalize(raw: Any) -> str:
    return str(raw).strip().lower()


def _number(raw: Any) -> float | None:
    """A finite JSON number, else None (bools are not numbers here, though Python says they are)."""
    if raw is None or isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        return None
    return raw


def _values(raw: Any) -> list[Any]:
    """The values of a multi-valued attribute: a list as it is, one scalar as one value, missing as none."""
    if raw is None:
        return []
    if isinstance(raw, (list, tuple)):
        return list(raw)
    return [raw]


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class SparseFeature:
    """One embedding table: an entity attribute (``source``) turned into integer ids."""

    name: str
    entity: Literal["user", "item"]
    kind: Literal["id", "hash", "vocab", "bucketize"]
    cardinality: int
    multi_valued: bool = False
    vocabulary: tuple[str, ...] = ()
    boundaries: tuple[int | float, ...] = ()
    source: str = ""
    aliases: tuple[tuple[str, str], ...] = ()
    fallback: str | None = None
    bits: int = ID_HASH_BITS
    prefix: int | None = None
    case: Literal["keep", "lower", "upper"] = "keep"
    minimum: float | None = None

    def index(self, raw: Any) -> int:
        """The id of one raw value (vocab, hash, bucketize); 0 for missing or unknown values."""
        return _encoders(self)[1](raw)

    def encode(self, entity_id: str, attributes: Mapping[str, Any]) -> list[int]:
        """The ids of this feature for one entity's raw attributes (always at least one: 0 when missing)."""
        return _encoders(self)[0](entity_id, attributes)


@dataclass(frozen=True)
class DenseFeature:
    """A numeric attribute, standardised as clip((t(x) - center) / scale, -clip, clip); missing -> 0."""

    name: str
    entity: Literal["user", "item"]
    source: str
    center: float
    scale: float
    clip: float = 3.0
    transform: Literal["none", "log1p"] = "none"

    def encode(self, raw: Any) -> float:
        value = _number(raw)
        if value is None:
            return 0.0
        if self.transform == "log1p":
            if value <= -1:
                return 0.0
            value = math.log1p(value)
        return max(-self.clip, min(self.clip, (float(value) - self.center) / self.scale))


@cache
def _encoders(f: SparseFeature) -> tuple[Callable[[str, Mapping[str, Any]], list[int]], Callable[[Any], int]]:
    """(entity encoder, single-value encoder) of a feature, built once: the hot path does no dispatch on kind."""
    if f.kind == "id":
        return (lambda entity_id, attrs: [hash_id(f.name, entity_id, f.bits)]), (lambda raw: hash_id(f.name, str(raw)))
    if f.kind == "vocab":
        vocabulary = {value: i + 1 for i, value in enumerate(f.vocabulary)}
        aliases = dict(f.aliases)

        def index(raw: Any) -> int:
            if raw is None:
                return 0
            value = _normalize(raw)
            return vocabulary.get(aliases.get(value, value), 0)

    elif f.kind == "hash":
        folds: dict[str, Callable[[str], str]] = {"keep": str, "lower": str.lower, "upper": str.upper}
        fold = folds[f.case]

        def index(raw: Any) -> int:
            if raw is None:
                return 0
            value = fold(str(raw).strip()[: f.prefix])
            return hash_id(f.name, value, f.bits) if value else 0

    else:
        boundaries, minimum = f.boundaries, f.minimum

        def index(raw: Any) -> int:
            value = _number(raw)
            if value is None or (minimum is not None and value < minimum):
                return 0
            return bisect_right(boundaries, value) + 1

    if f.multi_valued:

        def encode(entity_id: str, attrs: Mapping[str, Any]) -> list[int]:
            # a set of values, not a sequence: order and repeats carry no meaning, unknowns drop out
            return sorted({index(v) for v in _values(attrs.get(f.source))} - {0}) or [0]

    elif (fallback := f.fallback) is not None:

        def encode(entity_id: str, attrs: Mapping[str, Any]) -> list[int]:
            value = attrs.get(f.source)
            if value is None:
                first = _values(attrs.get(fallback))
                value = first[0] if first else None
            return [index(value)]

    else:

        def encode(entity_id: str, attrs: Mapping[str, Any]) -> list[int]:
            return [index(attrs.get(f.source))]

    return encode, index


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


@dataclass(frozen=True)
class FeatureSpec:
    sparse: tuple[SparseFeature, ...] = field(default_factory=tuple)
    dense: tuple[DenseFeature, ...] = field(default_factory=tuple)
    name: str = ""

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.dense]

    def names_of(self, entity: Literal["user", "item"]) -> tuple[str, ...]:
        """The sparse features of one entity, in spec order."""
        return tuple(f.name for f in self.sparse if f.entity == entity)

    def sparse_feature(self, name: str) -> SparseFeature:
        for feature in self.sparse:
            if feature.name == name:
                return feature
        raise KeyError(f"unknown sparse feature {name!r}; known: {self.sparse_names}")

    def has_sparse(self, name: str) -> bool:
        return any(f.name == name for f in self.sparse)

    def spec_hash(self) -> str:
        """A short digest of every encoding decision; recorded with each model version."""
        payload = json.dumps({"version": SPEC_VERSION, **asdict(self)}, sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def encode(
        self, entity: Literal["user", "item"], entity_id: str, attributes: Mapping[str, Any] | None = None
    ) -> EncodedEntity:
        """Encode one entity's raw attributes (a profile event's fields) into its features."""
        attrs = attributes or {}
        return EncodedEntity(
            entity,
            entity_id,
            sparse={f.name: f.encode(entity_id, attrs) for f in self.sparse if f.entity == entity},
            dense={f.name: f.encode(attrs.get(f.source)) for f in self.dense if f.entity == entity},
        )

    def join(
        self, user: EncodedEntity | None, item: EncodedEntity | None, user_id: str, item_id: str
    ) -> tuple[dict[str, list[int]], dict[str, float]]:
        """Sparse ids and dense values of one (user, item) pair, in spec order (see ``join_features``)."""
        user = user or self.encode("user", user_id)
        item = item or self.encode("item", item_id)
        sparse = {name: (user.sparse if name in user.sparse else item.sparse)[name] for name in self.sparse_names}
        dense = {name: (user.dense if name in user.dense else item.dense)[name] for name in self.dense_names}
        return sparse, dense

    def validate(self, sparse: Mapping[str, Sequence[int]], dense: Mapping[str, float]) -> None:
        """Raise ValueError unless the features have exactly the spec's names and ids within range."""
        if set(sparse) != set(self.sparse_names):
            raise ValueError(f"sparse features {sorted(sparse)} differ from the spec's {sorted(self.sparse_names)}")
        if set(dense) != set(self.dense_names):
            raise ValueError(f"dense features {sorted(dense)} differ from the spec's {sorted(self.dense_names)}")
        for feature in self.sparse:
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


def build_spec(declaration: Declaration) -> FeatureSpec:
    """The spec of a declaration: its sparse features (tables) and dense features, in declaration order."""
    sparse: list[SparseFeature] = []
    dense: list[DenseFeature] = []
    for d in declaration.features:
        if isinstance(d, IdFeature):
            sparse.append(SparseFeature(d.name, d.entity, "id", 1 << ID_HASH_BITS))
        elif isinstance(d, VocabFeature):
            sparse.append(
                SparseFeature(
                    d.name,
                    d.entity,
                    "vocab",
                    len(d.vocabulary) + 1,
                    multi_valued=d.multi_valued,
                    vocabulary=tuple(d.vocabulary),
                    source=d.source,
                    aliases=tuple(sorted(d.aliases.items())),
                    fallback=d.fallback,
                )
            )
        elif isinstance(d, HashFeature):
            sparse.append(
                SparseFeature(
                    d.name,
                    d.entity,
                    "hash",
                    1 << d.bits,
                    multi_valued=d.multi_valued,
                    source=d.source,
                    bits=d.bits,
                    prefix=d.prefix,
                    case=d.case,
                )
            )
        elif isinstance(d, BucketizeFeature):
            sparse.append(
                SparseFeature(
                    d.name,
                    d.entity,
                    "bucketize",
                    len(d.boundaries) + 2,  # 0 missing, then one bucket below, between and above the boundaries
                    boundaries=tuple(d.boundaries),
                    source=d.source,
                    minimum=d.minimum,
                )
            )
        elif isinstance(d, NumericFeature):
            dense.append(DenseFeature(d.name, d.entity, d.source, d.center, d.scale, d.clip, d.transform))
    return FeatureSpec(tuple(sparse), tuple(dense), declaration.name)


@lru_cache(maxsize=8)
def load_spec(spec: str) -> FeatureSpec:
    """The spec of the declaration named (``movielens``) or pointed to (a .yaml path) by ``spec``."""
    return build_spec(load_declaration(spec))


# the deployment's spec, chosen once per process (RECSYS_FEATURE_SPEC): every room encodes with it
SPEC = load_spec(FeatureSettings().spec)

USER_SPARSE = SPEC.names_of("user")
ITEM_SPARSE = SPEC.names_of("item")


# --------------------------------------------------------------------------- MovieLens's world
# The simulator and the MovieLens replays speak MovieLens attributes whatever spec is active;
# their vocabularies are the MovieLens declaration's, so they are written down once.

MOVIELENS = load_spec("movielens")
GENDERS: tuple[str, ...] = MOVIELENS.sparse_feature("gender").vocabulary
GENDER_ALIASES: dict[str, str] = {**{g: g for g in GENDERS}, **dict(MOVIELENS.sparse_feature("gender").aliases)}
AGE_BOUNDARIES: tuple[int | float, ...] = MOVIELENS.sparse_feature("age_bucket").boundaries
OCCUPATIONS: tuple[str, ...] = MOVIELENS.sparse_feature("occupation").vocabulary
OCCUPATION_ALIASES: dict[str, str] = dict(MOVIELENS.sparse_feature("occupation").aliases)
GENRES: tuple[str, ...] = MOVIELENS.sparse_feature("genres").vocabulary


# --------------------------------------------------------------------------- the active spec's encoders


def vocab_index(feature: str, raw: Any) -> int:
    """Index of ``raw`` in the vocabulary of ``feature`` (of the active spec); 0 for missing or unknown."""
    return SPEC.sparse_feature(feature).index(raw)


def user_id_key(user_id: str) -> int:
    return hash_id("user_id", user_id)


def item_id_key(item_id: str) -> int:
    return hash_id("item_id", item_id)


def encode_user(user_id: str, attributes: Mapping[str, Any] | None = None) -> EncodedEntity:
    return SPEC.encode("user", user_id, attributes)


def encode_item(item_id: str, attributes: Mapping[str, Any] | None = None) -> EncodedEntity:
    return SPEC.encode("item", item_id, attributes)


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
    return SPEC.join(user, item, user_id, item_id)


def validate_encoded(sparse: Mapping[str, Sequence[int]], dense: Mapping[str, float]) -> None:
    """Raise ValueError unless the features have exactly the spec's names and ids within range."""
    SPEC.validate(sparse, dense)
