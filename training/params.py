"""The parameter-service tables of the model: one per sparse feature, keyed by the feature's raw ids."""

from __future__ import annotations

import numpy as np

from core.settings import ParamServerSettings
from feature_repo.spec import SPEC, FeatureSpec
from paramserver import ParamStore, TableConfig

MAX_CAPACITY = 1_000_000


def table_configs(embedding_dim: int, init_std: float, spec: FeatureSpec = SPEC) -> list[TableConfig]:
    """Row-wise Adagrad tables (state_dim 1) named after the features; capacity sizes the hash buckets."""
    return [
        TableConfig(
            name=f.name,
            dim=embedding_dim,
            state_dim=1,
            init_std=init_std,
            capacity=int(min(f.cardinality, MAX_CAPACITY)),
        )
        for f in spec.sparse
    ]


def open_training_store(settings: ParamServerSettings, tables: list[TableConfig]) -> ParamStore:
    """The training copy of the parameter service: the Redis shards of ``settings`` (``Settings.ps``)."""
    from paramserver import open_store

    return open_store("redis", tables, settings)


def job_stage(run_id: str) -> str:
    """The staging area of a job's rows (``paramserver.staging``): they wait there until its model is promoted."""
    return f"job-{run_id}"


def conflicting_ids(changed: dict[str, np.ndarray], ours: dict[str, np.ndarray]) -> dict[str, int]:
    """Per table, how many of our ids someone else changed since we pulled (empty: no conflict)."""
    out = {}
    for table, ids in ours.items():
        clash = np.intersect1d(changed.get(table, np.zeros(0, np.int64)), ids)
        if len(clash):
            out[table] = int(len(clash))
    return out
