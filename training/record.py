"""The last step of a trained job, on rank 0: what the job's MLflow run keeps.

After the push (the commit point: rows in the parameter service, offsets recorded) rank 0
logs the metrics and the loss curve, the manifest (window, read stats, versions, tables,
hyper-parameters: enough to reproduce the evaluation set), the dense weights, and registers
the weights as a new model version with alias ``challenger``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.redact import redact_url
from core.settings import Settings
from paramserver import Rows, TableConfig
from training.data import Columns, ReadStats, Split, WorkingSet
from training.model import ModelConfig, save_dense
from training.outcome import JobOutcome, JobStatus, WindowOffsets
from training.quality import EVALUATED, NOT_EVALUABLE, eval_metrics, oracle_metrics
from training.tracking import DENSE_ARTIFACT_DIR, DENSE_FILE, MANIFEST_FILE, TAG_EVAL_REASON, TAG_EVAL_STATUS, Tracking
from training.trainer import TrainResult


@dataclass
class TrainedJob:
    """What rank 0 knows of a job once its rows are pushed."""

    run_id: str
    offsets: WindowOffsets
    columns: Columns
    stats: ReadStats
    split: Split
    ws: WorkingSet
    config: ModelConfig
    tables: list[TableConfig]
    params: dict[str, Any]  # the run's logged hyper-parameters
    result: TrainResult
    predictions: np.ndarray  # of split.eval
    updates: dict[str, Rows]  # what was pushed
    owners: dict[str, int]  # table -> rank that trained it
    dense_weights: dict[str, torch.Tensor]
    ps_version_before: int  # the parameter-service version the rows were pulled at
    ps_stage: str  # the staging area holding the trained rows until promotion


def job_metrics(
    s: Settings, job: TrainedJob, timings: dict[str, float], truth: dict[str, float] | None
) -> tuple[dict[str, float], str | None]:
    """The run's finite metrics, and why its evaluation set is not evaluable (None when it is)."""
    split, columns, result = job.split, job.columns, job.result
    labels = columns.labels[split.eval]
    metrics, not_evaluable = eval_metrics(job.predictions, labels, s.gate.min_eval_positives, s.gate.min_eval_negatives)
    if truth is not None:
        metrics.update(oracle_metrics(truth, [columns.sample_ids[r] for r in split.eval], labels))
    busy = timings["pull_s"] + timings["train_s"] + timings["push_s"]
    metrics.update(
        {
            "train_samples": float(len(split.train)),
            "eval_samples": float(len(split.eval)),
            "train_steps": float(result.steps),
            "samples_per_s_train": result.samples / max(result.seconds, 1e-9),
            "samples_per_s_with_ps": result.samples / max(busy, 1e-9),
            "rows_pulled": float(sum(rows_pulled(job).values())),
            "rows_pushed": float(sum(rows_pushed(job).values())),
            **{f"time_{k}": v for k, v in timings.items()},
        }
    )
    return metrics, not_evaluable


def rows_pulled(job: TrainedJob) -> dict[str, int]:
    return {t: int(len(job.ws.ids[t])) for t in job.config.sparse_features}


def rows_pushed(job: TrainedJob) -> dict[str, int]:
    return {t: int(len(r.ids)) for t, r in job.updates.items()}


def manifest(
    s: Settings, job: TrainedJob, world: int, metrics: dict[str, float], timings: dict[str, float]
) -> dict[str, Any]:
    """The run's manifest.json: the lifecycle's evaluation rebuilds the evaluation set from it."""
    split, columns = job.split, job.columns
    return {
        "run_id": job.run_id,
        "topic": s.kafka.topic_samples,
        "kafka_bootstrap": s.kafka.bootstrap,
        "offsets": job.offsets.model_dump(mode="json"),
        "read": job.stats.to_dict(),
        "train_samples": int(len(split.train)),
        "eval_samples": int(len(split.eval)),
        "eval_start_time": float(columns.event_time[split.eval[0]]) if len(split.eval) else None,
        "ps_shards": [redact_url(u) for u in s.ps.shards],
        "ps_version_pulled": job.ps_version_before,
        "ps_stage": job.ps_stage,
        "rows_pulled": rows_pulled(job),
        "rows_pushed": rows_pushed(job),
        "table_owners": job.owners,
        "feature_spec_hash": job.config.spec_hash,
        "model_config": job.config.to_dict(),
        "tables": [t.to_dict() for t in job.tables],
        "hparams": job.params,
        "world_size": world,
        "timings_s": timings,
        "metrics": metrics,
    }


def record_trained(
    s: Settings,
    tracking: Tracking,
    job: TrainedJob,
    world: int,
    timings: dict[str, float],
    truth: dict[str, float] | None,
) -> JobOutcome:
    """Log the run's metrics, manifest and dense weights, register the challenger, end the run."""
    metrics, not_evaluable = job_metrics(s, job, timings, truth)
    written = manifest(s, job, world, metrics, timings)
    eval_tags = (
        {TAG_EVAL_STATUS: EVALUATED}
        if not_evaluable is None
        else {
            TAG_EVAL_STATUS: NOT_EVALUABLE,
            TAG_EVAL_REASON: not_evaluable,
        }
    )
    written.update(eval_tags)
    tracking.log_series(job.run_id, "loss", job.result.losses)
    tracking.log_metrics(job.run_id, metrics)
    # the run page says why there is no eval_auc (a missing metric says nothing by itself)
    tracking.set_tags(job.run_id, eval_tags)
    tracking.log_json(job.run_id, MANIFEST_FILE, written)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_dense(
            Path(tmp) / DENSE_FILE,
            job.config,
            job.dense_weights,
            extra={"ps_stage": job.ps_stage, "run_id": job.run_id, "tables": written["tables"]},
        )
        source = tracking.log_file(job.run_id, path, DENSE_ARTIFACT_DIR)
    model_version = tracking.register(
        job.run_id,
        s.train.model_name,
        source,
        {
            # ps_version (the served rows' version) is tagged by the promotion
            "ps_stage": job.ps_stage,
            "ps_version_pulled": str(job.ps_version_before),
            "run_id": job.run_id,
            "feature_spec_hash": job.config.spec_hash,
            "eval_auc": f"{metrics['eval_auc']:.4f}" if "eval_auc" in metrics else NOT_EVALUABLE,
        },
    )
    tracking.finish(job.run_id)
    return JobOutcome(
        status=JobStatus.TRAINED,
        run_id=job.run_id,
        model_name=s.train.model_name,
        model_version=model_version,
        ps_version_before=job.ps_version_before,
        ps_stage=job.ps_stage,
        offsets=job.offsets,
        rows_pulled=rows_pulled(job),
        rows_pushed=rows_pushed(job),
        metrics=metrics,
        timings_s=timings,
    )
