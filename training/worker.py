"""One training job; ``recsys train`` runs this module on every rank under torchrun.

The job, in order (rank 0 decides, every rank takes part):

1. window: rank 0 reads the end offsets recorded by the last committed job (MLflow) and the
   topic's end offsets now, and broadcasts them; no new records -> the job ends, saying so;
2. read: rank 0 reads the window (a bounded read), validates and de-duplicates it and
   broadcasts the columns, so every rank derives the same evaluation split and working set;
3. pull: DistributedModelParallel shards the working-set tables; each rank pulls from the
   parameter service the rows (vectors + row-wise Adagrad state) of the tables it owns;
4. train and evaluate;
5. push: each rank hands the updated rows of its tables (only ids that training samples
   used) to rank 0, which writes them as ONE new parameter-service version (the service's
   commit point is single-writer), then records the offsets, metrics, manifest, dense
   weights and a registered model version (alias ``challenger``) in MLflow.

A job that dies before step 5 leaves the parameter service and the recorded offsets as they
were; rerunning it trains the same window again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.settings import Settings
from feature_repo.spec import SPEC


class JobFailed(RuntimeError):
    """The job cannot go on; the message says why and what to do."""


def _redact(url: str) -> str:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    return url.replace(f":{parsed.password}@", ":***@") if parsed.password else url


def load_truth(path: Path) -> dict[str, float]:
    """sample id -> true click probability, from `recsys simulate --truth` or traffic.synthetic.write_truth."""
    import orjson

    from feature_repo.contract import sample_id

    truth: dict[str, float] = {}
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
                sid = row.get("sample_id") or sample_id(row["request_id"], row["item_id"])
                truth[sid] = float(row["probability"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise JobFailed(f"truth file {path}, line {number}: {type(exc).__name__}: {exc}") from None
    return truth


def eval_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from core.metrics import roc_auc

    p = np.clip(predictions.astype(np.float64), 1e-7, 1 - 1e-7)
    y = labels.astype(np.float64)
    ctr = float(y.mean())
    return {
        "eval_auc": roc_auc(p, y),
        "eval_log_loss": float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()),
        "eval_calibration": float(p.mean() / ctr) if ctr > 0 else float("nan"),
        "eval_ctr": ctr,
        "eval_mean_prediction": float(p.mean()),
    }


def run_job(s: Settings, rank: int, world: int, device: Any, truth_path: Path | None = None) -> dict[str, Any]:
    """Run one job on this rank; rank 0 returns the outcome (other ranks return a short status)."""
    import torch.distributed as dist

    from core.kafka import KafkaUnavailable, end_offsets
    from training import trainer
    from training.data import read_window, split_by_time, to_columns, window_size, working_set
    from training.model import ModelConfig, dense_state_dict, save_dense
    from training.params import conflicting_ids, open_training_store, table_configs
    from training.tracking import DENSE_ARTIFACT_DIR, DENSE_FILE, MANIFEST_FILE, Tracking, TrackingUnavailable

    timings: dict[str, float] = {}
    topic = s.kafka.topic_samples
    tracking: Tracking | None = None
    truth: dict[str, float] | None = None

    # 1. the window and 2. the read, both on rank 0 ---------------------------------------
    # rank 0 reads and parses once and broadcasts the columns: the other ranks get the very
    # same samples without each paying for the Kafka read and JSON validation again
    plan: dict[str, Any] | None = None
    if rank == 0:
        try:
            # a bad truth file fails the job before anything is trained or pushed
            truth = load_truth(truth_path) if truth_path is not None else None
            tracking = Tracking(s.mlflow.tracking_uri, s.train.experiment)
            for run_id in tracking.close_abandoned_runs():
                print(f"marked run {run_id} KILLED: its job process is gone", file=sys.stderr)
            start, previous = tracking.last_offsets(topic)
            end = asyncio.run(end_offsets(s.kafka.bootstrap, topic))
            plan = {"start": start, "end": end, "previous_run": previous}
            if end and window_size(start, end):
                t0 = time.perf_counter()
                samples, stats = read_window(s.kafka.bootstrap, topic, start, end)
                plan["columns"] = to_columns(samples) if samples else None
                plan["stats"] = stats
                timings["read_s"] = time.perf_counter() - t0
        except (KafkaUnavailable, TrackingUnavailable, JobFailed, OSError, ValueError) as exc:
            plan = {"error": str(exc)}
    plan = trainer.broadcast_from_rank0(plan, rank, world)
    assert plan is not None
    if "error" in plan:
        raise JobFailed(plan["error"])
    start, end = plan["start"], plan["end"]
    if not end:
        return {
            "status": "no_new_samples",
            "message": f"topic {topic} has no partitions at {s.kafka.bootstrap} (not created yet?): nothing to train",
        }
    if window_size(start, end) == 0:
        return {
            "status": "no_new_samples",
            "offsets": {"start": start, "end": end},
            "message": f"no new samples on {topic} since the last job (offsets {end}): nothing to train",
        }
    columns, stats = plan["columns"], plan["stats"]
    if rank == 0 and stats.rejected:
        print(
            f"skipped {sum(stats.rejected.values())} invalid records: {dict(stats.rejected)}; e.g. {stats.examples[0]}",
            file=sys.stderr,
        )
    config = ModelConfig.from_spec(SPEC, s.train.embedding_dim, s.train.dense_arch, s.train.over_arch)
    tables = table_configs(config.embedding_dim, s.train.init_std)
    try:
        store = open_training_store(s.ps.shards, tables, namespace=s.ps.namespace)
    except Exception as exc:  # ShardUnavailable, TableMismatch, bad URL
        raise JobFailed(
            f"parameter service {[_redact(u) for u in s.ps.shards]} is unusable "
            f"({type(exc).__name__}: {exc}). Start it with `recsys ps up` or set RECSYS_PS_SHARDS."
        ) from None

    run_id = None
    hp = trainer.HParams(
        epochs=s.train.epochs,
        batch_size=s.train.batch_size,
        embedding_lr=s.train.embedding_lr,
        dense_lr=s.train.dense_lr,
        seed=s.train.seed,
    )
    params = {
        "ranks": world,
        "backend": s.train.backend,
        "topic": topic,
        "epochs": hp.epochs,
        "batch_size": hp.batch_size,
        "embedding_lr": hp.embedding_lr,
        "dense_lr": hp.dense_lr,
        "embedding_dim": config.embedding_dim,
        "dense_arch": list(config.dense_arch),
        "over_arch": list(config.over_arch),
        "eval_fraction": s.train.eval_fraction,
        "init_std": s.train.init_std,
        "seed": hp.seed,
        "feature_spec_hash": config.spec_hash,
        "previous_run": plan["previous_run"],
    }
    try:
        if rank == 0:
            assert tracking is not None
            try:
                run_id = tracking.start_run(topic, params)
            except Exception as exc:
                raise tracking.unreachable(exc) from exc
        if columns is None:  # records, but none valid: consume the window so the next job moves on
            if rank == 0:
                version = store.version()
                tracking.commit_offsets(run_id, end, version)
                tracking.log_json(
                    run_id,
                    MANIFEST_FILE,
                    {"offsets": {"start": start, "end": end}, "read": stats.to_dict(), "ps_version_pushed": None},
                )
                tracking.finish(run_id)
            return {
                "status": "no_valid_samples",
                "run_id": run_id,
                "read": stats.to_dict(),
                "message": f"{stats.records} new records on {topic}, none a valid sample: window consumed",
            }

        split = split_by_time(len(columns), s.train.eval_fraction)
        ws = working_set(columns, split.train)

        # 3. shard and pull ----------------------------------------------------------------
        sharded = trainer.build_sharded(config, ws.rows, hp, device)
        owned = sharded.owned(rank)
        t0 = time.perf_counter()
        base_version = store.version()
        versions = set()
        for table in owned:
            rows = store.pull(table, ws.ids[table])
            trainer.load_rows(sharded, table, rows.weights, rows.state)
            versions.add(rows.version)
        timings["pull_s"] = time.perf_counter() - t0
        all_versions = [None] * world
        dist.all_gather_object(all_versions, sorted(versions) or [base_version])
        seen = {v for vs in all_versions for v in vs}
        if len(seen) != 1:
            raise JobFailed(
                f"the parameter service changed while the ranks pulled (versions {sorted(seen)}): "
                "another writer is pushing; rerun the job"
            )
        base_version = seen.pop()

        # 4. train and evaluate ------------------------------------------------------------
        progress = None
        if rank == 0:
            from tqdm import tqdm

            per_epoch = (len(split.train) // world) * world
            progress = tqdm(
                total=per_epoch * hp.epochs,
                unit="sample",
                unit_scale=True,
                mininterval=1.0,
                desc=f"train {world} rank{'s' if world > 1 else ''}",
                file=sys.stderr,
            )

        def on_step(step: int, n: int, loss: float) -> None:
            if progress is not None:
                progress.update(n)
                progress.set_postfix(loss=f"{loss:.4f}", refresh=False)

        result = trainer.train(
            sharded, columns, ws.local, split.train, hp, rank, world, device, on_step, s.train.crash_after_steps
        )
        if progress is not None:
            progress.close()
        timings["train_s"] = result.seconds
        t0 = time.perf_counter()
        predictions = trainer.predict(sharded, columns, ws.local, split.eval, hp.batch_size, device)
        timings["eval_s"] = time.perf_counter() - t0

        # 5. push --------------------------------------------------------------------------
        t0 = time.perf_counter()
        mine = {}
        for table in owned:
            weights, state = trainer.read_rows(sharded, table)
            mask = ws.trained[table]
            mine[table] = (ws.ids[table][mask], weights[mask], state[mask])
        gathered = trainer.gather_to_rank0(mine, rank, world)
        dense_weights = dense_state_dict(sharded.model)
        if rank != 0:
            trainer.broadcast_from_rank0(None, rank, world)  # wait for rank 0 to commit
            return {"status": "done", "rank": rank}

        from paramserver import LogTrimmed, Rows

        updates = {t: Rows(ids, w, st) for part in gathered for t, (ids, w, st) in part.items()}
        try:
            changed = store.changed_since(base_version)
            clash = conflicting_ids(changed, {t: r.ids for t, r in updates.items()})
        except LogTrimmed:
            clash = {"(log trimmed)": 1} if store.version() != base_version else {}
        if clash:
            raise JobFailed(
                f"rows of this window changed in the parameter service since the pull at version "
                f"{base_version} ({clash}): another job trained them; rerun this job"
            )
        new_version = store.push(updates)
        timings["push_s"] = time.perf_counter() - t0
        tracking.commit_offsets(run_id, end, new_version)

        # 6. record ------------------------------------------------------------------------
        labels = columns.labels[split.eval]
        metrics: dict[str, float] = eval_metrics(predictions, labels) if len(split.eval) else {}
        if truth is not None:
            known = [i for i, r in enumerate(split.eval) if columns.sample_ids[r] in truth]
            if known:
                from core.metrics import roc_auc

                probs = np.array([truth[columns.sample_ids[split.eval[i]]] for i in known])
                metrics["eval_oracle_auc"] = roc_auc(probs, labels[known])
                metrics["eval_oracle_coverage"] = len(known) / len(split.eval)
        rows_pulled = {t: int(len(ws.ids[t])) for t in config.sparse_features}
        rows_pushed = {t: int(len(r.ids)) for t, r in updates.items()}
        busy = timings["pull_s"] + timings["train_s"] + timings["push_s"]
        metrics.update(
            {
                "train_samples": float(len(split.train)),
                "eval_samples": float(len(split.eval)),
                "train_steps": float(result.steps),
                "samples_per_s_train": result.samples / max(result.seconds, 1e-9),
                "samples_per_s_with_ps": result.samples / max(busy, 1e-9),
                "rows_pulled": float(sum(rows_pulled.values())),
                "rows_pushed": float(sum(rows_pushed.values())),
                **{f"time_{k}": v for k, v in timings.items()},
            }
        )
        manifest = {
            "run_id": run_id,
            "topic": topic,
            "kafka_bootstrap": s.kafka.bootstrap,
            "offsets": {"start": {str(p): o for p, o in start.items()}, "end": {str(p): o for p, o in end.items()}},
            "read": stats.to_dict(),
            "train_samples": int(len(split.train)),
            "eval_samples": int(len(split.eval)),
            "eval_start_time": float(columns.event_time[split.eval[0]]) if len(split.eval) else None,
            "ps_shards": [_redact(u) for u in s.ps.shards],
            "ps_version_pulled": base_version,
            "ps_version_pushed": new_version,
            "rows_pulled": rows_pulled,
            "rows_pushed": rows_pushed,
            "table_owners": sharded.owners,
            "feature_spec_hash": config.spec_hash,
            "model_config": config.to_dict(),
            "tables": [t.to_dict() for t in tables],
            "hparams": params,
            "world_size": world,
            "timings_s": timings,
            "metrics": metrics,
        }
        tracking.log_series(run_id, "loss", result.losses)
        tracking.log_metrics(run_id, metrics)
        tracking.log_json(run_id, MANIFEST_FILE, manifest)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = save_dense(
                Path(tmp) / DENSE_FILE,
                config,
                dense_weights,
                extra={"ps_version": new_version, "run_id": run_id, "tables": manifest["tables"]},
            )
            source = tracking.log_file(run_id, path, DENSE_ARTIFACT_DIR)
        model_version = tracking.register(
            run_id,
            s.train.model_name,
            source,
            {
                "ps_version": str(new_version),
                "run_id": run_id,
                "feature_spec_hash": config.spec_hash,
                "eval_auc": f"{metrics.get('eval_auc', float('nan')):.4f}",
            },
        )
        tracking.finish(run_id)
        trainer.broadcast_from_rank0("done", rank, world)
        return {
            "status": "trained",
            "run_id": run_id,
            "model_name": s.train.model_name,
            "model_version": model_version,
            "ps_version_before": base_version,
            "ps_version": new_version,
            "offsets": manifest["offsets"],
            "rows_pulled": rows_pulled,
            "rows_pushed": rows_pushed,
            "metrics": metrics,
            "timings_s": timings,
        }
    except BaseException:
        if rank == 0 and run_id is not None and tracking is not None:
            try:
                tracking.finish(run_id, "FAILED")
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        raise
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--result", type=Path, help="rank 0 writes the job's outcome here as JSON")
    parser.add_argument("--truth", type=Path, help="JSONL of true click probabilities (simulated traffic)")
    args = parser.parse_args(argv)
    settings = Settings()
    from training import trainer

    rank, world, device = trainer.init_distributed(settings.train.backend)
    code = 0
    try:
        outcome = run_job(settings, rank, world, device, args.truth)
    except JobFailed as exc:
        outcome, code = {"status": "error", "message": str(exc)}, 1
    except Exception as exc:  # noqa: BLE001 - report it, then fail the rank so torchrun stops the others
        import traceback

        traceback.print_exc()
        outcome, code = {"status": "error", "message": f"{type(exc).__name__}: {exc}"}, 1
    if rank == 0:
        if args.result is not None:
            args.result.write_text(json.dumps(outcome, default=str))
        if code:
            print(f"training failed: {outcome['message']}", file=sys.stderr)
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # peers may sit in a collective: do not wait for a clean group shutdown
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
