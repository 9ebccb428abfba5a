"""What the DAGs' tasks call, without Airflow: offline compaction on real parquet files, and the
lifecycle's publication steps."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.settings import Settings
from feature_repo import maintenance as features


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


def test_publication_without_replicas_has_nothing_to_wait_for() -> None:
    from training.lifecycle.publish import wait_for_replicas

    s = Settings().override(ps={"replicas": []})
    assert wait_for_replicas(s, 7, timeout_s=0.1) == {"ps_version": 7, "replicas": {}, "applied_s": {}}


@pytest.mark.integration
def test_publication_waits_until_every_replica_has_the_version(redis_factory) -> None:
    import threading

    import numpy as np

    from paramserver import Rows, TableConfig, open_store
    from training.lifecycle.publish import wait_for_replicas

    near, far = redis_factory("publish-near"), redis_factory("publish-far")
    s = Settings().override(ps={"replicas": [near.url, far.url], "namespace": "publishwait"})
    table = [TableConfig("t", dim=2, capacity=16)]
    # stand-ins for replicated copies: each server gets the version by a push of its own
    stores = [open_store("redis", table, s.ps, shards=[server.url]) for server in (near, far)]
    rows = Rows(np.arange(2, dtype=np.int64), np.ones((2, 2), np.float32), np.zeros((2, 1), np.float32))
    target = stores[0].push({"t": rows})
    assert stores[1].version() < target
    late = threading.Timer(0.3, lambda: stores[1].push({"t": rows}))
    late.start()
    try:
        waited = wait_for_replicas(s, target, timeout_s=60, poll_s=0.01)
    finally:
        late.join()
        for store in stores:
            store.close()
    assert waited["replicas"] == {near.url: target, far.url: target}
    assert waited["applied_s"][far.url] >= waited["applied_s"][near.url]


def test_publication_names_the_replicas_behind_after_the_timeout() -> None:
    from core.procs import free_port
    from training.lifecycle import LifecycleError
    from training.lifecycle.publish import wait_for_replicas

    dead = f"redis://127.0.0.1:{free_port()}/0"
    s = Settings().override(ps={"replicas": [dead], "timeout_s": 0.2})
    with pytest.raises(LifecycleError, match="have not applied version 3") as caught:
        wait_for_replicas(s, 3, timeout_s=0.0, poll_s=0.01)
    assert dead in str(caught.value)


def test_reload_of_a_serving_replica_that_does_not_run_is_reported() -> None:
    from core.procs import free_port
    from training.lifecycle.publish import reload_serving

    url = f"http://127.0.0.1:{free_port()}"
    assert reload_serving(Settings().override(serving={"reload_urls": [url]}), "3") == {url: "not running"}


def test_a_retried_training_step_returns_the_settled_outcome_without_training(tmp_path: Path) -> None:
    from training.lifecycle import LifecycleError, job
    from training.outcome import JobOutcome, JobStatus

    done = JobOutcome(
        status=JobStatus.TRAINED, run_id="r", model_name="m", model_version="4", ps_stage="job-r", ps_version_before=2
    )
    (tmp_path / "dag__run_1.json").write_text(done.to_json())
    again = job.train_once("dag__run:1", 1, 1, tmp_path)  # the key is made file-safe the same way
    assert again == done
    assert job.trained_model(again) == {
        "run_id": "r",
        "model_name": "m",
        "model_version": "4",
        "ps_stage": "job-r",
        "ps_version_before": 2,
    }
    with pytest.raises(LifecycleError, match="nothing trained"):
        job.trained_model(JobOutcome(status=JobStatus.NO_NEW_SAMPLES, message="none"))
    with pytest.raises(LifecycleError, match="does not parse"):
        job._parse_outcome('progress...\n{"status": "trained", "run_id": "r"}')
    assert job._parse_outcome("no json here") is None
