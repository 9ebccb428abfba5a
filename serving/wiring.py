"""Production wiring: the parameter reader, the Feast store and the MLflow loader, from the settings.

Heavy imports (feast pulls in torch, mlflow) happen here, once, at start-up.
"""

from __future__ import annotations

import logging
from typing import Any

from recsys.settings import Settings
from serving.app import Components
from serving.features import ITEM_COLUMNS, USER_COLUMNS, FeastFeatures, FeatureSource
from serving.metrics import Metrics
from serving.model import EmbeddingDotScorer, ModelHandle
from serving.params import RowFetcher

log = logging.getLogger(__name__)


def replica_urls(settings: Settings) -> list[str]:
    """Inference replicas, nearest first; without any, the training copy (all shards as one replica)."""
    return list(settings.ps_replicas) or [",".join(settings.ps_shards)]


def open_rows(settings: Settings, replicas: list[str] | None = None) -> RowFetcher:
    from paramserver import open_reader

    reader = open_reader(replicas or replica_urls(settings), [])
    return RowFetcher(reader, settings.serving_param_cache_rows, settings.serving_param_version_poll_s)


def feast_features(store: Any) -> FeastFeatures:
    """A FeastFeatures over every feature view column that carries a spec feature name."""
    user_refs: list[str] = []
    item_refs: list[str] = []
    user_key, item_key = "user_id", "item_id"
    for view in store.list_feature_views():
        keys = [c.name for c in getattr(view, "entity_columns", [])]
        for feature in view.features:
            if feature.name in USER_COLUMNS:
                user_refs.append(f"{view.name}:{feature.name}")
                user_key = keys[0] if keys else user_key
            elif feature.name in ITEM_COLUMNS:
                item_refs.append(f"{view.name}:{feature.name}")
                item_key = keys[0] if keys else item_key
    if not user_refs and not item_refs:
        raise RuntimeError(f"no feature view of {store.repo_path} carries spec features "
                           f"({USER_COLUMNS + ITEM_COLUMNS})")
    return FeastFeatures(store, user_refs, item_refs, user_key, item_key)


def open_features(settings: Settings) -> FeatureSource | None:
    try:
        from feast import FeatureStore

        return feast_features(FeatureStore(repo_path=str(settings.feast_repo_path)))
    except Exception as exc:  # noqa: BLE001 - serve degraded (flagged) rather than not at all
        log.error("feature store unavailable, serving without features: %s", exc)
        return None


def model_handle(settings: Settings, rows: RowFetcher | None) -> ModelHandle:
    from serving.loader import mlflow_loader

    loader = mlflow_loader(settings)
    fallback = None
    if settings.serving_allow_fallback_scorer:
        def fallback() -> EmbeddingDotScorer:
            tables = {name: cfg.dim for name, cfg in rows.table_configs().items()} if rows is not None else {}
            return EmbeddingDotScorer(tables)
    return ModelHandle(loader, fallback)


def build_components(settings: Settings, metrics: Metrics) -> Components:
    rows = open_rows(settings)
    features = open_features(settings)
    return Components(model=model_handle(settings, rows), rows=rows, features=features)
