"""Feast definitions: the user and item entities, their feature views, push and parquet sources.

The columns follow the one feature spec (``spec.py``, from the declaration RECSYS_FEATURE_SPEC
chooses): every sparse feature becomes an ``Array(Int64)`` column ``sparse_<name>`` (multi-valued
ones included), every dense feature a ``Float64`` column ``dense_<name>``. The stream worker pushes encoded profiles
through the push sources (online store) and appends the same rows to date-partitioned
parquet under ``$RECSYS_FEAST_DATA_DIR/offline/<entity>/date=YYYY-MM-DD/`` (offline store).

``feast apply`` imports this file; ``build(data_dir)`` is what the loader (``store.py``) uses.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

# isort: off
from feature_repo import feast_env  # noqa: F401 - before Feast (its metrics side effect)

# isort: on
from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.data_source import DataSource
from feast.types import Array, Float64, Int64

try:  # imported as a package module by the loader, as a plain file by `feast apply`
    from feature_repo.spec import SPEC
except ImportError:  # pragma: no cover - `feast apply` puts the repo folder itself on sys.path
    import sys

    # the spec reads its declaration through the project's settings: the project root must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from feature_repo.spec import SPEC

PROJECT = "recsys"
FEATURE_TTL = timedelta(days=365)
TIMESTAMP_FIELD = "event_timestamp"
CREATED_FIELD = "created"
JOIN_KEYS = {"user": "user_id", "item": "item_id"}


def sparse_column(name: str) -> str:
    return f"sparse_{name}"


def dense_column(name: str) -> str:
    return f"dense_{name}"


def columns(entity: str) -> list[str]:
    """Feature columns of one entity, in spec order."""
    return [sparse_column(f.name) for f in SPEC.sparse if f.entity == entity] + [
        dense_column(f.name) for f in SPEC.dense if f.entity == entity
    ]


def offline_dir(data_dir: Path, entity: str) -> Path:
    return Path(data_dir) / "offline" / entity


def build(data_dir: Path) -> dict[str, Entity | FeatureView | DataSource]:
    """Every Feast object of the repository, with the offline parquet under ``data_dir``."""
    objects: dict[str, Entity | FeatureView | DataSource] = {}
    for entity in ("user", "item"):
        key = JOIN_KEYS[entity]
        ent = Entity(
            name=entity, join_keys=[key], value_type=ValueType.STRING, description=f"a {entity}, by its raw id"
        )
        path = offline_dir(data_dir, entity)
        path.mkdir(parents=True, exist_ok=True)
        batch = FileSource(
            name=f"{entity}_parquet",
            path=str(path),
            timestamp_field=TIMESTAMP_FIELD,
            created_timestamp_column=CREATED_FIELD,
        )
        push = PushSource(name=f"{entity}_push", batch_source=batch)
        schema = [Field(name=sparse_column(f.name), dtype=Array(Int64)) for f in SPEC.sparse if f.entity == entity] + [
            Field(name=dense_column(f.name), dtype=Float64) for f in SPEC.dense if f.entity == entity
        ]
        view = FeatureView(
            name=f"{entity}_features",
            entities=[ent],
            ttl=FEATURE_TTL,
            schema=schema,
            source=push,
            online=True,
            description=f"encoded {entity} profile features (spec {SPEC.spec_hash()})",
        )
        objects.update({entity: ent, f"{entity}_parquet": batch, f"{entity}_push": push, f"{entity}_features": view})
    return objects


_objects = build(Path(os.environ.get("RECSYS_FEAST_DATA_DIR") or Path(__file__).resolve().parent / "data"))
user = _objects["user"]
item = _objects["item"]
user_push = _objects["user_push"]
item_push = _objects["item_push"]
user_features = _objects["user_features"]
item_features = _objects["item_features"]
