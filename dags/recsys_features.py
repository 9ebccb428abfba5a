"""Features DAG: Feast materialization (offline -> online store), then compaction of the offline parquet.

Thin: the work is in ``feature_repo.maintenance`` (Feast is imported inside its functions only).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import dag, task

from core.settings import Settings
from feature_repo.maintenance import ENTITIES  # stdlib and settings only: cheap
from training.lifecycle import quiet_libraries  # stdlib only: cheap

_defaults = Settings()

DOC = f"""
### recsys_features: keep Feast's online store fed and its offline files small

**materialize** copies the newest offline rows (what the stream worker wrote) into the online
store serving reads; then **compact_offline** merges each date folder's parquet files of one
entity ({", ".join(ENTITIES)}) into one, so reads stay fast. The stream worker also writes the
online store directly; this DAG is the catch-up path and the offline store's upkeep.

Schedule: `RECSYS_AIRFLOW_FEATURES_SCHEDULE` (`{_defaults.airflow.features_schedule or ""}` here; empty: manual
runs only). Only one run at a time. The README's "Streaming and feature store" section says more.
"""


@dag(
    dag_id="recsys_features",
    description="Feast: materialize the offline store into the online store, compact the offline parquet files",
    schedule=_defaults.airflow.features_schedule or None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 1,
        "retry_delay": timedelta(seconds=30),
        "owner": _defaults.airflow.dag_owner,
        "on_execute_callback": quiet_libraries,  # in the task's process: deprecation noise stays out of its log
    },
    doc_md=DOC,
    tags=["recsys", "features"],
)
def recsys_features() -> None:
    @task
    def materialize() -> dict[str, Any]:
        """Copy the newest offline rows into the online store."""
        from feature_repo import maintenance

        return maintenance.materialize(Settings())

    @task
    def compact_offline(entity: str) -> dict[str, Any]:
        """Merge each date folder's parquet files of one entity into one."""
        from feature_repo import maintenance

        return maintenance.compact_offline(Settings().feast.data_dir, entity)

    # compaction after materialization: both read the same files, never at the same time
    materialize() >> compact_offline.expand(entity=list(ENTITIES))


recsys_features()
