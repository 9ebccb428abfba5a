"""Online-training throughput: the online trainer (pulls + flushes) vs plain TorchRec DMP, same process.

    uv run python -m bench online [--requests N] [--batch-size B] [--repeats K] [--redis URL]

Same simulated samples, same model sizes, same batch size, same thread count, one pass each:

* ``online``: ``training.online.learner.OnlineLearner`` over a fresh parameter service per
  repeat (in-memory, or a real Redis with ``--redis``): every row is pulled on demand the first
  time a batch needs it, and every ``--flush-s`` seconds the deltas are pushed as one version
  and the changed rows re-pulled (the trainer's own flush, guard included). Timed: everything.
* ``dmp``: a 1-rank TorchRec DistributedModelParallel of training/model.py's DLRM with every
  table fully in memory (ids hashed modulo a fixed size) and fused row-wise Adagrad
  (``training.trainer.train``, the batch job's loop). Timed: the training loop.

Kafka reading and JSON parsing are left out of both. Prints medians over the repeats and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench online", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="simulated requests (x10 samples)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flush-s", type=float, default=2.0, help="flush interval of the online trainer")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of both")
    parser.add_argument("--redis", default=None, help="Redis URL of the parameter service (default: in-memory)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.batch_size < 1 or args.repeats < 1 or args.flush_s <= 0 or args.threads < 1:
        parser.error("--requests, --batch-size, --repeats, --threads must be positive, --flush-s > 0")

    import torch

    from bench.training import _full_local, _full_rows
    from core.settings import ParamServerSettings, Settings, TrainingSettings
    from feature_repo.spec import SPEC
    from paramserver import open_store
    from traffic.simulator import SimConfig
    from traffic.synthetic import simulate_samples
    from training import trainer
    from training.data import to_columns
    from training.model import DenseArch, ModelConfig
    from training.online.guard import Guard, GuardConfig
    from training.online.learner import LearnerConfig, OnlineLearner
    from training.online.rows import dense_table
    from training.params import table_configs

    torch.set_num_threads(args.threads)
    s = Settings()
    t = s.train
    columns = to_columns(simulate_samples(SimConfig(users=200, items=100, requests=args.requests, seed=41)).samples)
    n = len(columns)
    config = ModelConfig.from_spec(SPEC, t.embedding_dim, t.dense_arch, t.over_arch)
    n_params = sum(p.numel() for p in DenseArch(config).parameters())
    learner_config = LearnerConfig(config, t.embedding_lr, t.dense_lr, t.seed, None)
    tables = [*table_configs(t.embedding_dim, t.init_std), dense_table(n_params)]

    rank, world, device = trainer.init_distributed("gloo")
    hp = trainer.HParams.from_settings(TrainingSettings(epochs=1, batch_size=args.batch_size))
    full_local, rows = _full_local(columns, SPEC), _full_rows(SPEC)
    everything = np.arange(n)
    online, dmp, flushes = [], [], []
    for _ in range(args.repeats):
        if args.redis:
            ps = ParamServerSettings(shards=[args.redis], namespace=f"benchon{uuid.uuid4().hex[:8]}")
            store = open_store("redis", tables, ps)
        else:
            store = open_store("memory", tables)
        learner = OnlineLearner(store, learner_config, Guard(GuardConfig.from_settings(s.online)))
        t0 = last = time.perf_counter()
        count = 0
        for start in range(0, n, args.batch_size):
            learner.train_batch(columns, everything[start : start + args.batch_size])
            if time.perf_counter() - last >= args.flush_s:
                learner.flush()
                last = time.perf_counter()
                count += 1
        learner.flush()
        online.append(n / (time.perf_counter() - t0))
        flushes.append(count + 1)
        store.close()
        sharded = trainer.build_sharded(config, rows, hp, device)
        t0 = time.perf_counter()
        result = trainer.train(sharded, columns, full_local, everything, hp, rank, world, device)
        dmp.append(result.samples / (time.perf_counter() - t0))
        del sharded
    on, base = statistics.median(online), statistics.median(dmp)
    where = f"Redis {args.redis}" if args.redis else "in-memory store"
    print(f"{n} samples, batch {args.batch_size}, {args.threads} thread(s), {args.repeats} repeats, {where}")
    print(
        f"online trainer (pulls + flushes every {args.flush_s}s, median {statistics.median(flushes)} flushes): "
        f"{on:,.0f} samples/s"
    )
    print(f"plain TorchRec DMP, tables in memory: {base:,.0f} samples/s")
    print(f"ratio online / DMP: {on / base:.2f}x")
    return 0
