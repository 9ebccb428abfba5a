"""Training throughput: the parameter-service-backed trainer vs plain TorchRec DMP vs nn.EmbeddingBag.

    uv run python -m bench training [--requests N] [--ranks R] [--repeats K] [--batch-size B]

Same simulated samples, same model sizes, same ranks and batch size for every variant:

* ``ps``: the job's trainer (training.trainer): tables sized to the window's working set,
  rows pulled from a real Redis parameter service by the rank that owns each table, one
  epoch, updated rows gathered and pushed as one new version. Timed: pull + train + push.
* ``dmp``: plain TorchRec DistributedModelParallel with every table fully in memory (ids
  hashed modulo a fixed table size), one epoch. Timed: train.
* ``embbag``: one process, ``torch.nn.EmbeddingBag(sparse=True)`` tables of the same full
  size and the same dense part (Adagrad on sparse rows, Adam on dense), one epoch.

Reading Kafka is left out of all three (the samples come from a file) and so is building
the sharded model. Prints medians over the repeats and the ps/dmp ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FULL_TABLE_ROWS = 1 << 16  # size of each hashed table of the in-memory baselines


def _full_local(columns, spec) -> dict[str, np.ndarray]:
    """Ids -> rows of fixed-size in-memory tables (id modulo the table size, vocabularies as they are)."""
    out = {}
    for f in spec.sparse:
        size = min(f.cardinality, FULL_TABLE_ROWS)
        out[f.name] = columns.values[f.name] % size
    return out


def _full_rows(spec) -> dict[str, int]:
    return {f.name: int(min(f.cardinality, FULL_TABLE_ROWS)) for f in spec.sparse}


def worker(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from core.settings import ParamServerSettings, TrainingSettings
    from feature_repo.spec import SPEC
    from paramserver import Rows
    from training import trainer
    from training.data import working_set
    from training.model import ModelConfig
    from training.params import open_training_store, table_configs

    rank, world, device = trainer.init_distributed("gloo")
    with open(args.data, "rb") as handle:
        columns = pickle.load(handle)
    train_rows = np.arange(len(columns))
    config = ModelConfig.from_spec(SPEC, args.dim, [32, args.dim], [64, 32])
    hp = trainer.HParams.from_settings(TrainingSettings(epochs=1, batch_size=args.batch_size))
    ps = ParamServerSettings(shards=[args.redis], namespace="benchps")
    store = open_training_store(ps, table_configs(args.dim, 0.05))
    results: dict[str, list] = {"ps": [], "dmp": []}
    full_local = _full_local(columns, SPEC)
    for _ in range(args.repeats):
        # --- parameter-service-backed: working-set tables, pull, train, push
        ws = working_set(columns, train_rows)
        sharded = trainer.build_sharded(config, ws.rows, hp, device)
        dist.barrier()
        t0 = time.perf_counter()
        for table in sharded.owned(rank):
            rows = store.pull(table, ws.ids[table])
            trainer.load_rows(sharded, table, rows.weights, rows.state)
        dist.barrier()
        t1 = time.perf_counter()
        result = trainer.train(sharded, columns, ws.local, train_rows, hp, rank, world, device)
        dist.barrier()
        t2 = time.perf_counter()
        mine = {}
        for table in sharded.owned(rank):
            w, st = trainer.read_rows(sharded, table)
            mask = ws.trained[table]
            mine[table] = (ws.ids[table][mask], w[mask], st[mask])
        gathered = trainer.gather_to_rank0(mine, rank, world)
        if rank == 0:
            store.push({t: Rows(i, w, s) for part in gathered for t, (i, w, s) in part.items()})
        dist.barrier()
        t3 = time.perf_counter()
        results["ps"].append({"samples": result.samples, "pull": t1 - t0, "train": t2 - t1, "push": t3 - t2})
        del sharded
        # --- plain DMP, tables fully in memory
        sharded = trainer.build_sharded(config, _full_rows(SPEC), hp, device)
        dist.barrier()
        t0 = time.perf_counter()
        result = trainer.train(sharded, columns, full_local, train_rows, hp, rank, world, device)
        dist.barrier()
        results["dmp"].append({"samples": result.samples, "train": time.perf_counter() - t0})
        del sharded
    store.close()
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.destroy_process_group()
    return 0


def embbag_reference(columns, dim: int, batch_size: int, repeats: int, threads: int) -> list[float]:
    """Samples/s of a single-process model with torch.nn.EmbeddingBag tables (same sizes and dense part)."""
    import torch

    from feature_repo.spec import SPEC
    from training.data import gather_jagged
    from training.model import DenseArch, ModelConfig

    torch.set_num_threads(threads)
    config = ModelConfig.from_spec(SPEC, dim, [32, dim], [64, 32])
    local = _full_local(columns, SPEC)
    rates = []
    for _ in range(repeats):
        torch.manual_seed(0)
        tables = torch.nn.ModuleDict(
            {n: torch.nn.EmbeddingBag(r, dim, mode="mean", sparse=True) for n, r in _full_rows(SPEC).items()}
        )
        arch = DenseArch(config)
        sparse_opt = torch.optim.Adagrad(tables.parameters(), lr=0.1)
        dense_opt = torch.optim.Adam(arch.parameters(), lr=0.01)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        order = np.random.default_rng(0).permutation(len(columns))
        t0 = time.perf_counter()
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            pooled = []
            for name in config.sparse_features:
                lengths, values = gather_jagged(columns.lengths[name], columns.offsets[name], local[name], index)
                offsets = torch.from_numpy(np.concatenate(([0], np.cumsum(lengths)[:-1])))
                pooled.append(tables[name](torch.from_numpy(values), offsets))
            logits = arch(torch.from_numpy(columns.dense[index]), torch.stack(pooled, dim=1))
            loss = loss_fn(logits, torch.from_numpy(columns.labels[index]))
            sparse_opt.zero_grad()
            dense_opt.zero_grad()
            loss.backward()
            sparse_opt.step()
            dense_opt.step()
        rates.append(len(order) / (time.perf_counter() - t0))
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench training", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6_000, help="simulated requests (10 samples each)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512, help="per rank")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    for name in ("requests", "ranks", "repeats", "batch_size", "dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    from local_services import services
    from traffic.simulator import SimConfig
    from traffic.synthetic import simulate_samples
    from training.data import to_columns

    print(f"simulating {args.requests} requests ...", file=sys.stderr)
    synthetic = simulate_samples(SimConfig(users=5000, items=2000, requests=args.requests, seed=1))
    columns = to_columns(synthetic.samples)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        run_dir = Path(tmp)
        data = run_dir / "columns.pkl"
        data.write_bytes(pickle.dumps(columns))
        port = services.free_port()
        services.start_redis(run_dir, port, name="redis-bench-training")
        try:
            out = run_dir / "result.json"
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=1",
                f"--nproc-per-node={args.ranks}",
                "--master-addr=127.0.0.1",
                f"--master-port={services.free_port()}",
                "-m",
                "bench.training",
                "--worker",
                "--data",
                str(data),
                "--redis",
                f"redis://127.0.0.1:{port}/0",
                "--out",
                str(out),
                "--repeats",
                str(args.repeats),
                "--batch-size",
                str(args.batch_size),
                "--dim",
                str(args.dim),
            ]
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            print(
                f"training {len(columns)} samples x {args.repeats} repeats on {args.ranks} ranks ...", file=sys.stderr
            )
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
                return 1
            results = json.loads(out.read_text())
        finally:
            services.stop(run_dir, "redis-bench-training")
    print("single-process nn.EmbeddingBag reference ...", file=sys.stderr)
    embbag = embbag_reference(columns, args.dim, args.batch_size * args.ranks, args.repeats, args.ranks)

    ps_rates = [r["samples"] / (r["pull"] + r["train"] + r["push"]) for r in results["ps"]]
    dmp_rates = [r["samples"] / r["train"] for r in results["dmp"]]
    shares = {
        k: statistics.median(r[k] / (r["pull"] + r["train"] + r["push"]) for r in results["ps"])
        for k in ("pull", "train", "push")
    }
    ps, dmp, bag = statistics.median(ps_rates), statistics.median(dmp_rates), statistics.median(embbag)
    print(
        f"training throughput, {len(columns)} samples, {args.ranks} ranks x batch {args.batch_size}, dim {args.dim}, "
        f"medians of {args.repeats} repeats (1 epoch each)"
    )
    print(
        f"  parameter-service trainer (pull + train + push): {ps:,.0f} samples/s "
        f"(pull {shares['pull']:.1%}, train {shares['train']:.1%}, push {shares['push']:.1%}; "
        f"median times pull {statistics.median(r['pull'] for r in results['ps']):.3f}s, "
        f"push {statistics.median(r['push'] for r in results['ps']):.3f}s)"
    )
    print(f"  baseline: plain TorchRec DMP, tables in memory:  {dmp:,.0f} samples/s")
    print(f"  ratio parameter-service / plain DMP: {ps / dmp:.2f}x (target >= 0.8x)")
    print(f"  reference: single-process nn.EmbeddingBag ({args.ranks} threads): {bag:,.0f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
