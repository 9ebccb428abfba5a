"""How close the batch loop's model gets to the oracle, round after round, and how much data that takes.

    uv run python -m bench learning_curve [--users 200 --items 150 --window 30000 --rounds 4
                                           --epochs 8 --embedding-lr 0.03 --repeats 1]

The demo's question without the demo's services: simulated impressions of one world (the
simulator's hidden vectors and position bias, open-loop slates), cut into consecutive windows
as the training DAG cuts the sample stream. Each round trains like a job does: the rows of the
window's ids start from the parameter store (rows carried from round to round), the dense part
from scratch; the newest 10% of the round's window is held out, and its AUC is printed beside
the oracle AUC (the true click probabilities) of the same impressions.

Two training configurations on the very same samples: the settings' defaults (the baseline)
and the candidate given by the options (``--embedding-lr``, ``--epochs``). The last line is the
final gap to the oracle of each and the samples it took. Medians over ``--repeats`` worlds
(seeds 1, 2, ...).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Curve:
    label: str
    gaps: list[float]  # per round: oracle AUC - model AUC on the round's held-out impressions
    aucs: list[float]
    oracles: list[float]
    seconds: float


def push_trained(sharded, ws, store) -> None:
    """Push the rows a round trained (rank 0's tables) to the store, as the job does after training."""
    from paramserver import Rows
    from training import trainer

    updates = {}
    for table in sharded.owned(0):
        weights, state = trainer.read_rows(sharded, table)
        trained = ws.trained[table]
        updates[table] = Rows(ws.ids[table][trained], weights[trained], state[trained])
    store.push(updates)


def run_rounds(samples: list, oracle_of, window: int, rounds: int, train_settings, label: str) -> Curve:
    """Train ``rounds`` consecutive windows like the batch job; the AUC gap to the oracle per round."""
    from core.metrics import roc_auc
    from feature_repo.spec import SPEC
    from paramserver import open_store
    from training import trainer
    from training.data import Split, to_columns, working_set
    from training.model import ModelConfig
    from training.params import table_configs

    ts = train_settings
    hp = trainer.HParams.from_settings(ts)
    config = ModelConfig.from_spec(SPEC, ts.embedding_dim, ts.dense_arch, ts.over_arch)
    store = open_store("memory", table_configs(ts.embedding_dim, ts.init_std))
    _, _, device = trainer.init_distributed("gloo")
    gaps, aucs, oracles = [], [], []
    t0 = time.perf_counter()
    for r in range(rounds):
        part = samples[r * window : (r + 1) * window]
        columns = to_columns(part)
        n_eval = max(1, int(round(len(part) * ts.eval_fraction)))
        split = Split(np.arange(0, len(part) - n_eval), np.arange(len(part) - n_eval, len(part)))
        ws = working_set(columns, split.train)
        sharded = trainer.build_sharded(config, ws.rows, hp, device)
        for table in sharded.owned(0):
            rows = store.pull(table, ws.ids[table])
            trainer.load_rows(sharded, table, rows.weights, rows.state)
        trainer.train(sharded, columns, ws.local, split.train, hp, 0, 1, device)
        predicted = trainer.predict(sharded, columns, ws.local, split.eval, 4096, device)
        labels = np.array([part[i].label for i in split.eval])
        auc = roc_auc(predicted, labels)
        oracle = oracle_of([part[i].sample_id for i in split.eval])
        aucs.append(auc)
        oracles.append(oracle)
        gaps.append(oracle - auc)
        print(
            f"  {label:<10} round {r + 1}: {(r + 1) * window:>7} samples seen  AUC {auc:.4f}  "
            f"oracle {oracle:.4f}  gap {oracle - auc:+.4f}",
            flush=True,
        )
        push_trained(sharded, ws, store)
    return Curve(label, gaps, aucs, oracles, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench learning_curve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--items", type=int, default=150)
    parser.add_argument("--window", type=int, default=30_000, help="samples per training round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8, help="epochs of both configurations (the demo's: 8)")
    parser.add_argument("--embedding-lr", type=float, default=0.03, help="the candidate's row-wise Adagrad lr")
    parser.add_argument("--repeats", type=int, default=1, help="worlds (seeds 1..N); medians over them")
    args = parser.parse_args(argv)
    for name in ("users", "items", "window", "rounds", "epochs", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.embedding_lr <= 0:
        parser.error("--embedding-lr must be positive")

    import torch

    from core.settings import TrainingSettings
    from traffic.simulator import SimConfig
    from traffic.synthetic import simulate_samples

    logging.getLogger("torchrec").setLevel(logging.ERROR)  # the planner's per-build warnings
    torch.set_num_threads(1)
    baseline = TrainingSettings(epochs=args.epochs)
    candidate = TrainingSettings(epochs=args.epochs, embedding_lr=args.embedding_lr)
    finals: dict[str, list[float]] = {"baseline": [], "candidate": []}
    total = args.window * args.rounds
    for seed in range(1, args.repeats + 1):
        sim = SimConfig(users=args.users, items=args.items, seed=seed, requests=-(-total // 10), requests_per_second=20)
        synthetic = simulate_samples(sim)
        samples = sorted(synthetic.samples, key=lambda s: s.event_time)[:total]
        print(
            f"world seed {seed}: {args.users} users x {args.items} items, {len(samples)} impressions, "
            f"CTR {np.mean([s.label for s in samples]):.3f}"
        )
        for label, settings in (("baseline", baseline), ("candidate", candidate)):
            curve = run_rounds(samples, synthetic.oracle_auc_of, args.window, args.rounds, settings, label)
            finals[label].append(curve.gaps[-1])
    print(
        f"\nfinal gap to the oracle after {total} samples ({args.rounds} rounds of {args.window}, "
        f"median of {args.repeats} world{'s' if args.repeats > 1 else ''}):"
    )
    print(f"  baseline  (embedding lr {baseline.embedding_lr}): {statistics.median(finals['baseline']):+.4f}")
    print(f"  candidate (embedding lr {candidate.embedding_lr}): {statistics.median(finals['candidate']):+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
