"""Features DAG: Feast materialization (offline -> online store), then compaction of the offline parquet.

Thin: the work is in ``recsys_ops.features`` (Feast is imported inside the tasks only).
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import dag, task

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core.settings import Settings  # noqa: E402

_defaults = Settings()


@dag(
    dag_id="recsys_features",
    description="Feast: materialize the offline store into the online store, compact the offline parquet files",
    schedule=_defaults.airflow.features_schedule or None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
    tags=["recsys", "features"],
)
def recsys_features() -> None:
    @task
    def materialize() -> dict:
        from recsys_ops import features

        return features.materialize(Settings())

    @task
    def compact_offline(entity: str) -> dict:
        from recsys_ops import features

        return features.compact_offline(Settings().feast.data_dir, entity)

    # compaction after materialization: both read the same files, never at the same time
    materialize() >> compact_offline.expand(entity=["user", "item"])


recsys_features()
