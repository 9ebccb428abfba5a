"""One training job; ``recsys train`` runs this module on every rank under torchrun.

The job, in order (rank 0 decides, every rank takes part):

1. window: rank 0 reads the end offsets recorded by the last committed job (MLflow) and the
   topic's end offsets now, and broadcasts them; no new records -> the job ends, saying so;
   the window starts earlier when the gate refused the last jobs (their runs are "carried",
   ``Tracking.window_start``), so their samples are trained on again;
2. read: rank 0 reads the window (a bounded read), validates and de-duplicates it and
   broadcasts the columns, so every rank derives the same evaluation split and working set;
3. pull: DistributedModelParallel shards the working-set tables; each rank pulls from the
   parameter service the rows (vectors + row-wise Adagrad state) of the tables it owns;
4. train and evaluate;
5. push: each rank hands the updated rows of its tables (only ids that training samples
   used) to rank 0, which stages them beside the parameter service (``job-<run id>``, see
   ``paramserver.staging``: no reader sees them until the gate promotes the model) and
   records the window's end offsets;
6. record: rank 0 logs the metrics, manifest and dense weights in MLflow and registers a
   model version (alias ``challenger``), see ``training.record``.

A job that dies before step 5 leaves the recorded offsets as they were; rerunning it trains
the same window again. No job changes the served rows: promotion does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from core.kafka import KafkaUnavailable, end_offsets
from core.redact import redact_urls
from core.settings import Settings
from feature_repo.spec import SPEC
from paramserver import LogTrimmed, ParamStore, Rows, TableConfig
from training import trainer
from training.data import (
    Columns,
    ReadStats,
    Split,
    WorkingSet,
    read_window,
    split_by_time,
    to_columns,
    window_size,
    working_set,
)
from training.model import ModelConfig, dense_state_dict
from training.outcome import JobFailed, JobOutcome, JobStatus, WindowOffsets
from training.params import conflicting_ids, job_stage, open_training_store, table_configs
from training.quality import load_truth
from training.record import TrainedJob, record_trained
from training.tracking import MANIFEST_FILE, Tracking, TrackingUnavailable, window_label
from training.trainer import HParams, Sharded, TrainResult


@dataclass
class Job:
    """What the steps of one job share on this rank."""

    s: Settings
    rank: int
    world: int
    device: torch.device
    timings: dict[str, float] = field(default_factory=dict)
    truth: dict[str, float] | None = None  # rank 0: true click probabilities of simulated traffic
    _tracking: Tracking | None = None  # rank 0 only: the other ranks never talk to MLflow

    @property
    def topic(self) -> str:
        return self.s.kafka.topic_samples

    @property
    def tracking(self) -> Tracking:
        if self._tracking is None:
            raise RuntimeError(f"rank {self.rank} has no tracking: only rank 0 records")
        return self._tracking


@dataclass
class Window:
    """The samples of a job as rank 0 read them; every rank receives the same copy."""

    start: dict[int, int]
    end: dict[int, int]
    previous_run: str | None
    new_records: int = 0  # records after the newest committed job's end (the window may start before it)
    columns: Columns | None = None  # None: no valid sample among the records
    stats: ReadStats = field(default_factory=ReadStats)

    @property
    def offsets(self) -> WindowOffsets:
        return WindowOffsets(start=self.start, end=self.end)


# --------------------------------------------------------------------------- 1. window and 2. read


def read_on_rank0(job: Job, truth_path: Path | None) -> Window:
    """Rank 0 finds the window and reads it once; the columns are broadcast to every rank.

    The other ranks get the very same samples without each paying for the Kafka read and the
    JSON validation again. A failure on rank 0 is broadcast too, so every rank fails with it.
    """
    found: Window | str | None = None
    if job.rank == 0:
        try:
            found = _find_and_read(job, truth_path)
        except (KafkaUnavailable, TrackingUnavailable, JobFailed, OSError, ValueError) as exc:
            found = str(exc)
    received = trainer.broadcast_from_rank0(found, job.rank, job.world)
    if not isinstance(received, Window):
        raise JobFailed(str(received))
    return received


def _find_and_read(job: Job, truth_path: Path | None) -> Window:
    s = job.s
    # a bad truth file fails the job before anything is trained or pushed
    job.truth = load_truth(truth_path) if truth_path is not None else None
    job._tracking = tracking = Tracking(s.mlflow, s.train.experiment)
    for run_id in tracking.close_abandoned_runs():
        print(f"marked run {run_id} KILLED: its job process is gone", file=sys.stderr)
    start, previous = tracking.window_start(job.topic, s.gate.max_carried_runs)
    newest, _run = tracking.last_offsets(job.topic)
    end = asyncio.run(end_offsets(s.kafka, job.topic))
    # carried samples alone do not make a job: retraining them without news would give the same verdict
    window = Window(start, end, previous, new_records=window_size(newest, end))
    if end and window.new_records:
        t0 = time.perf_counter()
        samples, window.stats = read_window(s.kafka, job.topic, start, end)
        window.columns = to_columns(samples) if samples else None
        job.timings["read_s"] = time.perf_counter() - t0
    return window


def nothing_to_train(job: Job, window: Window) -> JobOutcome | None:
    """The outcome of an empty window (no partitions yet, or no records since the last job); None otherwise."""
    if not window.end:
        message = f"topic {job.topic} has no partitions at {job.s.kafka.bootstrap} (not created yet?): nothing to train"
        return JobOutcome(status=JobStatus.NO_NEW_SAMPLES, message=message)
    if window.new_records == 0:
        return JobOutcome(
            status=JobStatus.NO_NEW_SAMPLES,
            offsets=window.offsets,
            message=f"no new samples on {job.topic} since the last job (offsets {window.end}): nothing to train",
        )
    return None


def report_rejected(job: Job, stats: ReadStats) -> None:
    """Rank 0 says how many records it skipped and why (never fatal: the valid ones train)."""
    if job.rank == 0 and stats.rejected:
        print(
            f"skipped {sum(stats.rejected.values())} invalid records: {dict(stats.rejected)}; e.g. {stats.examples[0]}",
            file=sys.stderr,
        )


def consume_invalid_window(job: Job, store: ParamStore, run_id: str | None, window: Window) -> JobOutcome:
    """Records, but none valid: rank 0 commits the window anyway, so the next job moves on."""
    stats = window.stats
    if job.rank == 0:
        assert run_id is not None
        job.tracking.commit_offsets(run_id, window.end, store.version())
        job.tracking.log_json(
            run_id,
            MANIFEST_FILE,
            {"offsets": {"start": window.start, "end": window.end}, "read": stats.to_dict(), "ps_version_pushed": None},
        )
        job.tracking.finish(run_id)
    return JobOutcome(
        status=JobStatus.NO_VALID_SAMPLES,
        run_id=run_id,
        read=stats.to_dict(),
        message=f"{stats.records} new records on {job.topic}, none a valid sample: window consumed",
    )


# --------------------------------------------------------------------------- the job's run and parameters


def open_parameters(job: Job, config: ModelConfig) -> tuple[list[TableConfig], ParamStore]:
    """The tables of the model and the training copy of the parameter service."""
    s = job.s
    tables = table_configs(config.embedding_dim, s.train.init_std)
    try:
        store = open_training_store(s.ps, tables)
    except Exception as exc:  # ShardUnavailable, TableMismatch, bad URL
        raise JobFailed(
            f"parameter service {redact_urls(s.ps.shards)} is unusable "
            f"({type(exc).__name__}: {exc}). Start it with `recsys ps up` or set RECSYS_PS_SHARDS."
        ) from None
    return tables, store


def run_params(job: Job, hp: HParams, config: ModelConfig, window: Window) -> dict[str, Any]:
    """The hyper-parameters the job's MLflow run logs (and its manifest repeats)."""
    return {
        "ranks": job.world,
        "backend": job.s.train.backend,
        "topic": job.topic,
        "epochs": hp.epochs,
        "batch_size": hp.batch_size,
        "embedding_lr": hp.embedding_lr,
        "dense_lr": hp.dense_lr,
        "embedding_dim": config.embedding_dim,
        "dense_arch": list(config.dense_arch),
        "over_arch": list(config.over_arch),
        "eval_fraction": job.s.train.eval_fraction,
        "init_std": job.s.train.init_std,
        "seed": hp.seed,
        "feature_spec_hash": config.spec_hash,
        "previous_run": window.previous_run,
    }


def start_run(
    job: Job, params: dict[str, Any], window: Window, name: str | None = None, tags: dict[str, str] | None = None
) -> str | None:
    """Rank 0 opens the job's MLflow run, named ``name`` (else after its window); the other ranks have none."""
    if job.rank != 0:
        return None
    try:
        return job.tracking.start_run(
            job.topic, params, name or f"{job.topic}@{window_label(window.start, window.end)}", tags
        )
    except Exception as exc:
        raise job.tracking.unreachable(exc) from exc


# --------------------------------------------------------------------------- 3. shard and pull


def shard_and_pull(
    job: Job, config: ModelConfig, ws: WorkingSet, hp: HParams, store: ParamStore
) -> tuple[Sharded, int]:
    """Shard the working-set tables; every rank pulls its tables' rows. Returns the model and the version pulled."""
    sharded = trainer.build_sharded(config, ws.rows, hp, job.device)
    t0 = time.perf_counter()
    base_version = store.version()
    versions = set()
    for table in sharded.owned(job.rank):
        rows = store.pull(table, ws.ids[table])
        trainer.load_rows(sharded, table, rows.weights, rows.state)
        versions.add(rows.version)
    job.timings["pull_s"] = time.perf_counter() - t0
    all_versions: list[list[int]] = [[] for _ in range(job.world)]
    dist.all_gather_object(all_versions, sorted(versions) or [base_version])
    seen = {v for vs in all_versions for v in vs}
    if len(seen) != 1:
        raise JobFailed(
            f"the parameter service changed while the ranks pulled (versions {sorted(seen)}): "
            "another writer is pushing; rerun the job"
        )
    return sharded, seen.pop()


# --------------------------------------------------------------------------- 4. train and evaluate


def train_and_evaluate(
    job: Job, sharded: Sharded, columns: Columns, ws: WorkingSet, split: Split, hp: HParams
) -> tuple[TrainResult, np.ndarray]:
    """Train on split.train (rank 0 shows progress), then predict split.eval (collective: every rank)."""
    progress = None
    if job.rank == 0:
        from tqdm import tqdm

        per_epoch = (len(split.train) // job.world) * job.world
        progress = tqdm(
            total=per_epoch * hp.epochs,
            unit="sample",
            unit_scale=True,
            mininterval=1.0,
            desc=f"train {job.world} rank{'s' if job.world > 1 else ''}",
            file=sys.stderr,
        )

    def on_step(step: int, n: int, loss: float) -> None:
        if progress is not None:
            progress.update(n)
            progress.set_postfix(loss=f"{loss:.4f}", refresh=False)

    crash = job.s.train.crash_after_steps
    result = trainer.train(sharded, columns, ws.local, split.train, hp, job.rank, job.world, job.device, on_step, crash)
    if progress is not None:
        progress.close()
    job.timings["train_s"] = result.seconds
    t0 = time.perf_counter()
    predictions = trainer.predict(sharded, columns, ws.local, split.eval, hp.batch_size, job.device)
    job.timings["eval_s"] = time.perf_counter() - t0
    return result, predictions


# --------------------------------------------------------------------------- 5. push


def gather_rows(job: Job, sharded: Sharded, ws: WorkingSet) -> dict[str, Rows] | None:
    """Every rank hands the trained rows of its tables to rank 0; rank 0 gets them all (None elsewhere)."""
    mine = {}
    for table in sharded.owned(job.rank):
        weights, state = trainer.read_rows(sharded, table)
        mask = ws.trained[table]
        mine[table] = (ws.ids[table][mask], weights[mask], state[mask])
    gathered = trainer.gather_to_rank0(mine, job.rank, job.world)
    if gathered is None:
        return None
    updates: dict[str, Rows] = {}
    for part in gathered:
        assert isinstance(part, dict)
        updates.update({t: Rows(ids, w, st) for t, (ids, w, st) in part.items()})
    return updates


def push(
    job: Job, sharded: Sharded, ws: WorkingSet, store: ParamStore, base_version: int, stage: str
) -> dict[str, Rows] | None:
    """Rank 0 gathers every rank's trained rows and stages them as ``stage``; returns them (None elsewhere)."""
    t0 = time.perf_counter()
    updates = gather_rows(job, sharded, ws)
    if updates is None:
        return None
    push_rows(store, base_version, updates, stage)
    job.timings["push_s"] = time.perf_counter() - t0
    return updates


def push_rows(store: ParamStore, base_version: int, updates: dict[str, Rows], stage: str) -> None:
    """Rank 0 stages the rows (one version of the area ``stage``), unless another job changed them since the pull.

    The promotion checks again (``paramserver.staging.promote_stage``); failing here saves
    recording a model that could never be promoted.
    """
    try:
        clash = conflicting_ids(store.changed_since(base_version), {t: r.ids for t, r in updates.items()})
    except LogTrimmed:
        clash = {"(log trimmed)": 1} if store.version() != base_version else {}
    if clash:
        raise JobFailed(
            f"rows of this window changed in the parameter service since the pull at version "
            f"{base_version} ({clash}): another job trained them; rerun this job"
        )
    store.drop_stage(stage)  # a fresh area: nothing of an earlier attempt mixes in
    store.stage(stage).push(updates)


# --------------------------------------------------------------------------- the job


def run_job(
    s: Settings,
    rank: int,
    world: int,
    device: Any,
    truth_path: Path | None = None,
    run_name: str | None = None,
    run_tags: dict[str, str] | None = None,
) -> JobOutcome:
    """Run one job on this rank; rank 0 returns the job's outcome (other ranks return a short status).

    ``run_name`` and ``run_tags`` name and tag the job's MLflow run (an orchestrator's run id and links).
    """
    job = Job(s, rank, world, device)
    window = read_on_rank0(job, truth_path)
    empty = nothing_to_train(job, window)
    if empty is not None:
        return empty
    report_rejected(job, window.stats)
    config = ModelConfig.from_spec(SPEC, s.train.embedding_dim, s.train.dense_arch, s.train.over_arch)
    tables, store = open_parameters(job, config)
    hp = HParams.from_settings(s.train)
    params = run_params(job, hp, config, window)
    run_id = None
    try:
        run_id = start_run(job, params, window, run_name, run_tags)
        columns = window.columns
        if columns is None:
            return consume_invalid_window(job, store, run_id, window)
        split = split_by_time(columns.labels, s.train.eval_fraction)
        ws = working_set(columns, split.train)
        sharded, base_version = shard_and_pull(job, config, ws, hp, store)
        result, predictions = train_and_evaluate(job, sharded, columns, ws, split, hp)
        stage = job_stage(run_id) if run_id is not None else ""
        updates = push(job, sharded, ws, store, base_version, stage)
        if updates is None:  # not rank 0
            trainer.broadcast_from_rank0(None, rank, world)  # wait until rank 0 has committed and recorded
            return JobOutcome(status=JobStatus.RANK_DONE, rank=rank)
        assert run_id is not None
        job.tracking.commit_offsets(run_id, window.end, base_version)  # the commit point: the window is consumed
        trained = TrainedJob(
            run_id=run_id,
            offsets=window.offsets,
            columns=columns,
            stats=window.stats,
            split=split,
            ws=ws,
            config=config,
            tables=tables,
            params=params,
            result=result,
            predictions=predictions,
            updates=updates,
            owners=sharded.owners,
            dense_weights=dense_state_dict(sharded.model),
            ps_version_before=base_version,
            ps_stage=stage,
        )
        outcome = record_trained(s, job.tracking, trained, world, job.timings, job.truth)  # 6. record
        trainer.broadcast_from_rank0("done", rank, world)
        return outcome
    except BaseException:
        if rank == 0 and run_id is not None:
            try:
                job.tracking.finish(run_id, "FAILED")
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            try:  # rows staged by a job that then failed would never be promoted nor dropped
                store.drop_stage(job_stage(run_id))
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        raise
    finally:
        store.close()


# advice for the library's developers, printed on every job: not what an operator should read in a task log
_QUIET_LOGGERS = ("torchrec.distributed.planner", "torch.fx._symbolic_trace")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.worker", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--result", type=Path, help="rank 0 writes the job's outcome here as JSON")
    parser.add_argument("--truth", type=Path, help="JSONL of true click probabilities (simulated traffic)")
    parser.add_argument("--run-name", help="name of the job's MLflow run (default: its window)")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="a tag of the job's run")
    args = parser.parse_args(argv)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    tags = dict(tag.split("=", 1) for tag in args.tag if "=" in tag)
    settings = Settings()
    rank, world, device = trainer.init_distributed(settings.train.backend)
    code = 0
    try:
        outcome = run_job(settings, rank, world, device, args.truth, args.run_name, tags)
    except JobFailed as exc:
        outcome, code = JobOutcome(status=JobStatus.ERROR, message=str(exc)), 1
    except Exception as exc:  # noqa: BLE001 - report it, then fail the rank so torchrun stops the others
        import traceback

        traceback.print_exc()
        outcome, code = JobOutcome(status=JobStatus.ERROR, message=f"{type(exc).__name__}: {exc}"), 1
    if rank == 0:
        if args.result is not None:
            args.result.write_text(outcome.to_json())
        if code:
            print(f"training failed: {outcome.message}", file=sys.stderr)
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # peers may sit in a collective: do not wait for a clean group shutdown
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
