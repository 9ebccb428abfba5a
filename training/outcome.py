"""What a training job reports: one typed outcome for the worker, `recsys train --json` and the DAG.

The worker's rank 0 writes it as JSON (``--result``), the CLI reads and prints it, and the
training DAG's lifecycle reads it from the CLI's output. pydantic only: the DAG imports this
in its tasks without loading torch.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class JobFailed(RuntimeError):
    """The job cannot go on; the message says why and what to do."""


class JobStatus(StrEnum):
    TRAINED = "trained"  # rows pushed, offsets committed, a model version registered (alias challenger)
    NO_NEW_SAMPLES = "no_new_samples"  # the window is empty: nothing consumed, nothing changed
    NO_VALID_SAMPLES = "no_valid_samples"  # records, none a valid sample: the window is consumed, nothing trained
    ERROR = "error"  # the job failed; nothing was committed (the message says why)
    RANK_DONE = "done"  # a rank other than 0 did its part; rank 0 reports the job

    @property
    def settled(self) -> bool:
        """The job ran to a committed end: running the same orchestrator run again must not train again."""
        return self in (JobStatus.TRAINED, JobStatus.NO_NEW_SAMPLES, JobStatus.NO_VALID_SAMPLES)


class WindowOffsets(BaseModel):
    """The samples topic's window of a job: partition -> offset, start inclusive, end exclusive."""

    model_config = ConfigDict(frozen=True)

    start: dict[int, int]
    end: dict[int, int]


class JobOutcome(BaseModel):
    """A job's outcome; the fields a status does not produce stay None and are left out of the JSON."""

    # the trainer's metrics are finite (training.quality leaves out what a set cannot give); should a NaN
    # slip in anyway, it is kept as JSON's NaN, as json.dumps writes it, rather than failing the job's report
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    status: JobStatus
    message: str | None = None
    rank: int | None = None
    run_id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    ps_version_before: int | None = None  # the parameter-service version the job pulled its rows at
    ps_stage: str | None = None  # the staging area of its trained rows (served once the model is promoted)
    offsets: WindowOffsets | None = None
    read: dict[str, Any] | None = None  # training.data.ReadStats.to_dict()
    rows_pulled: dict[str, int] | None = None
    rows_pushed: dict[str, int] | None = None
    metrics: dict[str, float] | None = None
    missing_metrics: dict[str, str] | None = None  # metric -> why the job has none (not evaluable, no truth)
    epochs: int | None = None
    run_name: str | None = None
    run_url: str | None = None  # the run's page in the MLflow UI (None without a UI)
    timings_s: dict[str, float] | None = None

    @model_validator(mode="after")
    def _trained_names_its_model(self) -> JobOutcome:
        if self.status is JobStatus.TRAINED:
            missing = [k for k in ("run_id", "model_name", "model_version", "ps_stage") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"a trained outcome needs {missing}")
        return self

    def summary(self) -> str:
        """One line that leads with the outcome: what was trained, how well, what was staged, where to look."""
        if self.status is not JobStatus.TRAINED:
            return f"{self.status}: {self.message or 'nothing trained'}"
        m, missing = self.metrics or {}, self.missing_metrics or {}

        def count(key: str) -> str:
            return f"{int(m[key]):,}" if key in m else "?"

        auc = f"eval AUC {m['eval_auc']:.4f}" if "eval_auc" in m else f"no eval AUC ({missing.get('eval_auc', '?')})"
        if "eval_oracle_auc" in m:
            auc += f" vs oracle {m['eval_oracle_auc']:.4f}"
        elif "eval_oracle_auc" in missing:
            auc += f", no oracle AUC ({missing['eval_oracle_auc']})"
        loss = f"loss {m['train_loss_last']:.4f}" if "train_loss_last" in m else "loss ?"
        return (
            f"trained {self.model_name} v{self.model_version} (alias challenger) on {count('train_samples')} samples "
            f"({count('eval_samples')} held out), {self.epochs if self.epochs is not None else '?'} epochs, {loss}, "
            f"{auc}, {sum((self.rows_pushed or {}).values()):,} rows staged as {self.ps_stage}; "
            f"MLflow run {self.run_url or self.run_id}"
        )

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible (string partition keys), as `recsys train --json` prints it."""
        return self.model_dump(mode="json", exclude_none=True)
