"""Task helpers of the DAGs that need no Airflow: offline compaction on real parquet files,
the new-sample check and publication against real Kafka / Redis."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.settings import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "dags"))

from recsys_ops import features  # noqa: E402


def _write(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / name)


def _row(user: str, ts: int, genres: list[int]) -> dict:
    return {
        "user_id": user,
        "sparse_genres": genres,
        "dense_age": 0.5,
        "event_timestamp": datetime.fromtimestamp(ts, UTC),
        "created": datetime.fromtimestamp(ts + 1, UTC),
    }


def test_compaction_merges_each_date_folder_and_drops_exact_duplicates(tmp_path: Path) -> None:
    day1 = tmp_path / "offline" / "user" / "date=2026-11-27"
    day2 = tmp_path / "offline" / "user" / "date=2026-11-28"
    _write(day1, "part-a.parquet", [_row("u1", 100, [1, 2]), _row("u2", 101, [3])])
    _write(day1, "part-b.parquet", [_row("u1", 100, [1, 2]), _row("u3", 102, [])])  # one exact duplicate
    _write(day1, "part-c.parquet", [_row("u1", 103, [4])])
    _write(day2, "part-d.parquet", [_row("u9", 200, [5])])  # a single file: left alone
    result = features.compact_offline(tmp_path, "user")
    assert result == {"entity": "user", "folders": 1, "files_merged": 3, "rows": 4}
    merged = list(day1.glob("*.parquet"))
    assert len(merged) == 1 and merged[0].name.startswith("part-compacted-")
    table = pq.read_table(merged[0]).to_pylist()
    assert sorted((r["user_id"], r["event_timestamp"].timestamp(), tuple(r["sparse_genres"])) for r in table) == [
        ("u1", 100.0, (1, 2)),
        ("u1", 103.0, (4,)),
        ("u2", 101.0, (3,)),
        ("u3", 102.0, ()),
    ]
    assert [p.name for p in day2.glob("*.parquet")] == ["part-d.parquet"]
    # idempotent: a second run finds nothing to merge and keeps the data
    assert features.compact_offline(tmp_path, "user")["folders"] == 0
    assert len(pq.read_table(merged[0])) == 4


def test_compaction_of_a_missing_store_is_a_no_op(tmp_path: Path) -> None:
    assert features.compact_offline(tmp_path, "item") == {"entity": "item", "folders": 0, "files_merged": 0, "rows": 0}
