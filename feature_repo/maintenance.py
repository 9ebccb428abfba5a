"""Upkeep of the feature store: Feast materialization and compaction of the offline parquet.

The stream worker pushes every encoded profile to the online store and appends the same rows
to the offline store as small parquet files (``offline/<entity>/date=YYYY-MM-DD/part-*.parquet``).
Materialization copies the newest offline rows into the online store (it repairs an online store
that was lost or started empty); compaction merges each date folder's many small files into one,
so point-in-time joins for training read a few files instead of thousands. The features DAG
runs both; each is idempotent.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.settings import Settings

log = logging.getLogger(__name__)

ENTITIES = ("user", "item")


def materialize(s: Settings, lookback: timedelta = timedelta(days=365)) -> dict[str, Any]:
    """``materialize_incremental`` up to now: idempotent, a rerun writes the same latest rows again."""
    from feature_repo.store import open_store

    store = open_store(s.feast.data_dir, s.feast.online_store, s.feast_redis_url, apply=True)
    end = datetime.now(UTC)
    views = [v.name for v in store.list_feature_views()]
    # views never materialized start from `lookback` ago (Feast needs a start for the first interval)
    for view in store.list_feature_views():
        if not view.materialization_intervals:
            store.materialize(start_date=end - lookback, end_date=end, feature_views=[view.name])
    store.materialize_incremental(end_date=end, feature_views=views)
    return {"views": views, "end": end.isoformat()}


def compact_offline(data_dir: Path, entity: str, min_files: int = 2) -> dict[str, Any]:
    """Merge the parquet files of each ``date=`` folder of ``entity`` into one file; returns counts.

    Safe beside a running stream worker: only files read here are deleted, after the merged file
    is in place (written to a temporary name, then renamed). Identical rows are dropped, so a
    crash between rename and delete leaves duplicates the next compaction removes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(data_dir) / "offline" / entity
    merged_folders = files_in = rows_out = 0
    for folder in sorted(p for p in root.glob("date=*") if p.is_dir()) if root.exists() else []:
        parts = sorted(folder.glob("*.parquet"))
        if len(parts) < min_files:
            continue
        tables = [pq.read_table(p) for p in parts]
        schema = tables[0].schema
        table = pa.concat_tables([t.select(schema.names).cast(schema) for t in tables])
        frame = table.to_pandas()
        # list-valued columns are not hashable: compare rows by their string form
        keys = frame.astype(str).duplicated()
        frame = frame[~keys.values].reset_index(drop=True)
        target = folder / f"part-compacted-{uuid.uuid4().hex}.parquet"
        tmp = target.with_suffix(".tmp")
        pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), tmp)
        tmp.rename(target)
        for part in parts:
            part.unlink(missing_ok=True)
        merged_folders += 1
        files_in += len(parts)
        rows_out += len(frame)
        log.info("compacted %s: %d files -> 1 (%d rows)", folder, len(parts), len(frame))
    return {"entity": entity, "folders": merged_folders, "files_merged": files_in, "rows": rows_out}
