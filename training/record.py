"""The last step of a trained job, on rank 0: what the job's MLflow run keeps.

After the push (the commit point: rows in the parameter service, offsets recorded) rank 0
logs the metrics and the loss curve, the manifest (window, read stats, versions, tables,
hyper-parameters: enough to reproduce the evaluation set), the dense weights, and registers
the weights as a new model version with alias ``challenger``.
"""

from __future__ import annotations

import json
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
from training.model import DENSE_FORMAT, ModelConfig, save_dense
from training.outcome import JobOutcome, JobStatus, WindowOffsets
from training.quality import EVALUATED, NOT_EVALUABLE, eval_metrics, oracle_metrics
from training.tracking import (
    DENSE_ARTIFACT_DIR,
    DENSE_FILE,
    MANIFEST_FILE,
    TAG_EVAL_REASON,
    TAG_EVAL_STATUS,
    TAG_MISSING_METRICS,
    Tracking,
)
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
    losses = list(result.losses)
    if losses:  # one step's loss is noisy: the mean of the last few says where training ended
        metrics["train_loss_last"] = float(np.mean(losses[-10:]))
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


def missing_reasons(metrics: dict[str, float], not_evaluable: str | None, truth_given: bool) -> dict[str, str]:
    """Why the run has no AUC or no oracle AUC: a gap on the run page must say why."""
    missing = {}
    if "eval_auc" not in metrics:
        missing["eval_auc"] = f"not evaluable: {not_evaluable or 'no AUC'}"
    if "eval_oracle_auc" not in metrics:
        if not truth_given:
            missing["eval_oracle_auc"] = "unknown: no truth file (RECSYS_TRAIN_TRUTH_FILE, simulated traffic only)"
        elif "eval_oracle_coverage" not in metrics:
            missing["eval_oracle_auc"] = "the truth file knows none of the evaluation samples"
        else:
            missing["eval_oracle_auc"] = "one class among the evaluation samples the truth file knows"
    return missing


def description(outcome: JobOutcome, not_evaluable: str | None) -> str:
    """The run page's description: the summary line, and a warning first when the AUC is missing."""
    lines = []
    if not_evaluable is not None:
        lines.append(f"**Not evaluable** — no `eval_auc`: {not_evaluable}. The gate refuses this challenger.\n")
    lines.append(outcome.summary())
    return "\n".join(lines)


def model_spec(config: ModelConfig, run_id: str) -> Any:
    """The MLmodel file beside the dense artifact: its signature (what the dense part takes, gives), shown by MLflow.

    Inputs are the dense features and the pooled embedding of each sparse feature (the rows come
    from the parameter service, not from the artifact); the output is the click logit.
    """
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    inputs = Schema(
        [
            TensorSpec(np.dtype(np.float32), (-1, len(config.dense_features)), "dense"),
            TensorSpec(np.dtype(np.float32), (-1, len(config.sparse_features), config.embedding_dim), "pooled"),
        ]
    )
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1,), "logit")])
    spec = Model(artifact_path=DENSE_ARTIFACT_DIR, run_id=run_id, signature=ModelSignature(inputs, outputs))
    spec.add_flavor(
        "recsys_dense",
        data=DENSE_FILE,
        format=DENSE_FORMAT,
        loader="training.model.load_dense",
        dense_features=list(config.dense_features),
        sparse_features=list(config.sparse_features),
    )
    return spec


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
    missing = {
        **missing_reasons(metrics, not_evaluable, truth is not None),
        **tracking.log_metrics(job.run_id, metrics),
    }
    tracking.set_tags(job.run_id, {TAG_MISSING_METRICS: json.dumps(missing, sort_keys=True)[:5000]})
    tracking.log_window(
        job.run_id,
        s.kafka.topic_samples,
        redact_url(s.kafka.bootstrap),
        job.offsets.start,
        job.offsets.end,
        {
            "samples": len(job.columns.labels),
            "train_samples": int(len(job.split.train)),
            "eval_samples": int(len(job.split.eval)),
            "clicks": int(job.columns.labels.sum()),
            "read": job.stats.to_dict(),
        },
    )
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
        model_spec(job.config, job.run_id).save(str(Path(tmp) / "MLmodel"))
        tracking.log_file(job.run_id, Path(tmp) / "MLmodel", DENSE_ARTIFACT_DIR)
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
    outcome = JobOutcome(
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
        missing_metrics=missing or None,
        epochs=int(job.params["epochs"]),
        run_name=tracking.client.get_run(job.run_id).info.run_name,
        run_url=tracking.run_url(job.run_id),
        timings_s=timings,
    )
    tracking.describe(job.run_id, description(outcome, not_evaluable))
    tracking.finish(job.run_id)
    return outcome
