"""Production wiring: the parameter reader, the Feast store and the MLflow loader, from the settings.

Heavy imports (feast pulls in torch, mlflow) happen here, once, at start-up.
"""

from __future__ import annotations

import logging

from core.settings import Settings
from serving.components import Components
from serving.features import FeastFeatures, FeatureSource, RedisFeatures
from serving.metrics import Metrics
from serving.model import EmbeddingDotScorer, ModelHandle
from serving.params import RowFetcher

log = logging.getLogger(__name__)


def replica_urls(settings: Settings) -> list[str]:
    """Inference replicas, nearest first; without any, the training copy (all shards as one replica)."""
    return list(settings.ps.replicas) or [",".join(settings.ps.shards)]


def open_rows(settings: Settings, replicas: list[str] | None = None) -> RowFetcher:
    from paramserver import open_reader

    urls = replicas or replica_urls(settings)
    return RowFetcher(
        open_reader(settings.ps, urls),
        settings.serving.param_cache_rows,
        settings.serving.param_version_poll_s,
        reopen=lambda: open_reader(settings.ps, urls),
        init_std=settings.train.init_std,
    )


def open_features(settings: Settings) -> FeatureSource | None:
    """The Feast online store of the settings (registered by the stream worker; applied here if not yet)."""
    try:
        from feature_repo.store import open_store

        redis_url = settings.feast_redis_url
        store = open_store(settings.feast.data_dir, settings.feast.online_store, redis_url, apply=False)
        try:
            views = {v.name for v in store.list_feature_views()}
        except Exception:  # noqa: BLE001 - no registry yet
            views = set()
        if not {"user_features", "item_features"} <= views:
            store = open_store(settings.feast.data_dir, settings.feast.online_store, redis_url, apply=True)
        ttl = settings.serving.item_feature_ttl_s
        if settings.feast.online_store == "redis" and settings.serving.direct_feature_read and redis_url:
            from feature_repo.store import RedisOnlineReader

            reader = RedisOnlineReader(redis_url, timeout_s=settings.serving.request_deadline_s)
            return RedisFeatures(store, reader, item_ttl_s=ttl)
        return FeastFeatures(store, item_ttl_s=ttl)
    except Exception as exc:  # noqa: BLE001 - serve degraded (flagged) rather than not at all
        log.error("feature store unavailable, serving without features: %s", exc)
        return None


def model_handle(settings: Settings, rows: RowFetcher | None) -> ModelHandle:
    from serving.loader import OnlineDense, mlflow_loader
    from training.model import ModelConfig

    def fallback() -> EmbeddingDotScorer:
        tables = {name: cfg.dim for name, cfg in rows.table_configs().items()} if rows is not None else {}
        return EmbeddingDotScorer(tables)

    return ModelHandle(
        mlflow_loader(settings),
        fallback if settings.serving.allow_fallback_scorer else None,
        rows_version=rows.refresh_version if rows is not None else None,
        online=OnlineDense(rows, ModelConfig.of_settings(settings.train))
        if rows is not None and settings.serving.online_dense
        else None,
    )


def build_components(settings: Settings, metrics: Metrics) -> Components:
    rows = open_rows(settings)
    features = open_features(settings)
    return Components(model=model_handle(settings, rows), rows=rows, features=features)
