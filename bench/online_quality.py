"""Quality of online training vs the hourly batch loop, on closed-loop traffic from a cold start.

    uv run python -m bench online_quality [--users 200 --items 150 --hours 12 --hour-samples 30000
                                           --flush-s 60 --candidates 50 --epochs 4 --redis URL]

One simulated world (traffic.simulator.World) and one request stream (same seed) for both arms.
A request is a user (drawn by the world's activity) and ``--candidates`` items; the arm's model
scores the candidates and the top k (the world's slate size) are shown; each is clicked with the
world's true probability at its position; those impressions become the arm's training samples.

* online: training.online.learner.OnlineLearner (the class `recsys train online` runs) over a
  real Redis parameter service (started on a free port unless ``--redis``). Simulated time is
  cut into flush intervals of ``--flush-s``: the requests of an interval are served by the state
  of the last flush, then the learner trains on their impressions (scoring each batch before
  the step: progressive validation) and flushes.
* batch: the batch job's trainer (training.trainer, as bench learning_curve runs it) retrained
  every simulated hour on the last hour's samples (``--hour-samples``, the DAG's window), rows
  carried between rounds through a parameter store; the model of hour h serves hour h+1. Hour 0
  of both arms is served by the untrained (cold) model. Its AUC per hour is of the fresh
  samples scored by the model that served them (before it trains on them).

Simulated time: ``--hour-samples`` impressions are one hour; click delays are not modelled
(a click is in the sample of its interval). Per hour: AUC of each arm, the oracle AUC of the
same samples (true probabilities), served CTR of each arm and of the random and oracle
policies. Writes reports/online_quality/{online_quality.json,online_quality.png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TARGET_GAP = 0.02


@dataclass
class ArmLog:
    """One arm's impressions in serving order: scores before training, labels, true probabilities, CTRs."""

    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    truth: list[np.ndarray] = field(default_factory=list)
    random: list[float] = field(default_factory=list)  # per request: the random policy's expected CTR
    oracle: list[float] = field(default_factory=list)  # per request: the oracle policy's expected CTR


def grid_columns(world: Any) -> Any:
    """Columns of every (user, item) pair at position 0: row u * items + j (the features serving would join)."""
    from feature_repo.contract import Sample
    from feature_repo.spec import encode_item, encode_user, join_features
    from training.data import to_columns

    users = [encode_user(world.user_ids[u], world.user_profile(u, "g", 0.0)) for u in range(len(world.user_ids))]
    items = [encode_item(world.item_ids[j], world.item_profile(j, "g", 0.0)) for j in range(len(world.item_ids))]
    samples = []
    for u, user in enumerate(users):
        for j, item in enumerate(items):
            sparse, dense = join_features(user, item, world.user_ids[u], world.item_ids[j])
            samples.append(
                Sample(
                    sample_id=f"{u}:{j}",
                    request_id="grid",
                    user_id=world.user_ids[u],
                    item_id=world.item_ids[j],
                    label=0,
                    event_time=float(len(samples)),  # keeps the grid order through to_columns' sort
                    position=0,
                    sparse=sparse,
                    dense=dense,
                )
            )
    return to_columns(samples)


def take(grid: Any, rows: np.ndarray, positions: np.ndarray, labels: np.ndarray) -> Any:
    """Columns of impressions: the grid's rows shown at ``positions`` with ``labels`` (event order = given order)."""
    from training.data import Columns, gather_jagged
    from training.model import position_value

    lengths, values = {}, {}
    for name in grid.lengths:
        lengths[name], values[name] = gather_jagged(grid.lengths[name], grid.offsets[name], grid.values[name], rows)
    dense = grid.dense[rows].copy()
    dense[:, -1] = [position_value(p) for p in positions]
    n = len(rows)
    return Columns(
        sample_ids=[str(i) for i in range(n)],
        labels=labels.astype(np.float32),
        event_time=np.arange(n, dtype=np.float64),
        dense=dense,
        lengths=lengths,
        values=values,
    )


def serve(world: Any, users: np.ndarray, candidates: np.ndarray, scores: np.ndarray, k: int, rng: Any, log: ArmLog):
    """Show each request's top k by ``scores`` ([users, items]); draw clicks; returns grid rows, positions, labels."""
    from traffic.closed_loop import policy_values

    n_items = len(world.item_ids)
    rows, positions, labels = [], [], []
    for user, cand in zip(users, candidates):
        order = cand[np.argsort(-scores[user, cand], kind="stable")[:k]]
        pos = np.arange(len(order))
        p = world.click_probability(int(user), order, pos)
        clicked = rng.random(len(order)) < p
        values = policy_values(world, int(user), cand, p, k)
        log.random.append(values.random / values.slots)
        log.oracle.append(values.oracle / values.slots)
        log.truth.append(p)
        rows.append(user * n_items + order)
        positions.append(pos)
        labels.append(clicked.astype(np.float32))
    return np.concatenate(rows), np.concatenate(positions), np.concatenate(labels)


def requests_of(world: Any, n: int, candidates: int, rng: Any) -> tuple[np.ndarray, np.ndarray]:
    """The request stream: users by activity, each with ``candidates`` distinct items."""
    users = rng.choice(len(world.user_ids), size=n, p=world.user_activity)
    cand = np.stack([rng.choice(len(world.item_ids), size=candidates, replace=False) for _ in range(n)])
    return users, cand


def hour_figures(log: ArmLog, start: int, stop: int) -> dict[str, float]:
    from core.metrics import roc_auc

    scores = np.concatenate(log.scores)[start:stop]
    labels = np.concatenate(log.labels)[start:stop]
    truth = np.concatenate(log.truth)[start:stop]
    return {"auc": roc_auc(scores, labels), "oracle_auc": roc_auc(truth, labels)}


def run(args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    import torch

    from bench.learning_curve import push_trained
    from core.metrics import roc_auc
    from core.settings import ParamServerSettings, Settings, TrainingSettings
    from feature_repo.spec import SPEC
    from paramserver import open_store
    from traffic.simulator import SimConfig, World
    from training import trainer
    from training.data import working_set
    from training.model import DenseArch, ModelConfig
    from training.online.guard import Guard, GuardConfig
    from training.online.learner import LearnerConfig, OnlineLearner
    from training.online.rows import dense_table
    from training.params import table_configs

    torch.set_num_threads(1)
    s = Settings()
    t = s.train
    sim = SimConfig(users=args.users, items=args.items, seed=args.seed)
    world = World(sim)
    k = sim.slate_size
    grid = grid_columns(world)
    n_items = len(world.item_ids)
    per_hour = -(-args.hour_samples // k)  # requests per simulated hour
    per_flush = max(1, round(per_hour * args.flush_s / 3600.0))
    users, cands = requests_of(world, per_hour * args.hours, args.candidates, np.random.default_rng(args.seed + 1))

    config = ModelConfig.from_spec(SPEC, t.embedding_dim, t.dense_arch, t.over_arch)
    n_params = sum(p.numel() for p in DenseArch(config).parameters())
    tables = [*table_configs(t.embedding_dim, t.init_std), dense_table(n_params)]
    ps = ParamServerSettings(shards=[redis_url], namespace=f"quality{uuid.uuid4().hex[:8]}")
    online_store = open_store("redis", tables, ps)
    learner = OnlineLearner(
        online_store,
        LearnerConfig(config, t.embedding_lr, t.dense_lr, t.seed, None),
        Guard(GuardConfig.from_settings(s.online)),
    )
    everything = np.arange(len(grid))

    def online_grid() -> np.ndarray:
        return learner.score(grid, everything).reshape(len(world.user_ids), n_items)

    # ---- online arm
    online = ArmLog()
    rng = np.random.default_rng(args.seed + 2)
    scores = online_grid()
    flushes = refused = 0
    for start in range(0, len(users), per_flush):
        stop = min(start + per_flush, len(users))
        rows, positions, labels = serve(world, users[start:stop], cands[start:stop], scores, k, rng, online)
        columns = take(grid, rows, positions, labels)
        for b in range(0, len(columns), args.batch_size):
            online.scores.append(learner.train_batch(columns, np.arange(b, min(b + args.batch_size, len(columns)))))
        online.labels.append(labels)
        result = learner.flush()
        flushes += 1
        refused += int(not result.verdict.publish)
        scores = online_grid()
    online_store.close()

    # ---- hourly batch arm: the batch job's trainer, on the same request stream
    batch = ArmLog()
    rng = np.random.default_rng(args.seed + 2)
    ts = TrainingSettings(epochs=args.epochs)
    hp = trainer.HParams.from_settings(ts)
    batch_store = open_store("memory", table_configs(ts.embedding_dim, ts.init_std))
    _, _, device = trainer.init_distributed("gloo")
    hour_rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    for hour in range(args.hours):
        if hour_rows is None:  # cold start: the untrained model (initial rows, fresh dense part)
            rows_, positions_, labels_ = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        else:
            rows_, positions_, labels_ = hour_rows
        n_train = len(rows_)
        columns = take(
            grid,
            np.concatenate([rows_, everything]),
            np.concatenate([positions_, np.zeros(len(grid), np.int64)]),
            np.concatenate([labels_, np.zeros(len(grid), np.float32)]),
        )
        train_idx = np.arange(n_train)
        ws = working_set(columns, train_idx)
        sharded = trainer.build_sharded(config, ws.rows, hp, device)
        for table in sharded.owned(0):
            pulled = batch_store.pull(table, ws.ids[table])
            trainer.load_rows(sharded, table, pulled.weights, pulled.state)
        if n_train:
            trainer.train(sharded, columns, ws.local, train_idx, hp, 0, 1, device)
            push_trained(sharded, ws, batch_store)
        predicted = trainer.predict(sharded, columns, ws.local, np.arange(n_train, len(columns)), 4096, device)
        scores = np.asarray(predicted).reshape(len(world.user_ids), n_items)
        del sharded
        start, stop = hour * per_hour, (hour + 1) * per_hour
        rows_, positions_, labels_ = serve(world, users[start:stop], cands[start:stop], scores, k, rng, batch)
        # the serving model's score of what it showed: before training on it
        batch.scores.append(trainer_scores(scores, rows_))
        batch.labels.append(labels_)
        hour_rows = (rows_, positions_, labels_)

    # ---- per hour
    hours = []
    per_hour_samples = per_hour * k
    for hour in range(args.hours):
        a, b = hour * per_hour_samples, (hour + 1) * per_hour_samples
        on, ba = hour_figures(online, a, b), hour_figures(batch, a, b)
        hours.append(
            {
                "hour": hour + 1,
                "samples_seen": b,
                "online_auc": on["auc"],
                "online_oracle_auc": on["oracle_auc"],
                "batch_auc": ba["auc"],
                "batch_oracle_auc": ba["oracle_auc"],
                **{f"{name}_ctr": v for name, v in hour_ctr(online, batch, a, b, k).items()},
            }
        )
    on_scores, on_labels, on_truth = (np.concatenate(x) for x in (online.scores, online.labels, online.truth))
    first = None
    gaps = []
    step = args.gap_window
    for end in range(step, len(on_labels) + 1, step):
        gap = roc_auc(on_truth[end - step : end], on_labels[end - step : end]) - roc_auc(
            on_scores[end - step : end], on_labels[end - step : end]
        )
        gaps.append({"samples": end, "gap": gap})
        if first is None and gap <= TARGET_GAP:
            first = end
    return {
        "config": {**vars(args), "requests_per_hour": per_hour, "requests_per_flush": per_flush, "slate": k},
        "flushes": flushes,
        "refused_flushes": refused,
        "hours": hours,
        "online_gap_windows": gaps,
        "final_gap_online": hours[-1]["online_oracle_auc"] - hours[-1]["online_auc"],
        "final_gap_batch": hours[-1]["batch_oracle_auc"] - hours[-1]["batch_auc"],
        "first_within_target_samples": first,
        "target_gap": TARGET_GAP,
    }


def trainer_scores(grid_scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The batch model's scores of the shown impressions: its ranking score (position 0).

    The batch arm predicts the grid once per hour, at position 0 (what ranking uses), so its AUC is of
    those scores; the online arm's AUC is of scores at the shown position (the learner scores each batch).
    """
    return grid_scores.reshape(-1)[rows]


def hour_ctr(online: ArmLog, batch: ArmLog, a: int, b: int, k: int) -> dict[str, float]:
    """Expected CTR of the hour's shown lists of each arm, and of the random and oracle policies (same requests)."""
    lo, hi = a // k, b // k

    def ctr(log: ArmLog) -> float:
        return float(np.concatenate(log.truth[lo:hi]).mean())

    return {
        "online": ctr(online),
        "batch": ctr(batch),
        "random": float(np.mean(online.random[lo:hi])),
        "oracle": float(np.mean(online.oracle[lo:hi])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench online_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--items", type=int, default=150)
    parser.add_argument("--hours", type=int, default=12, help="simulated hours (batch retrains)")
    parser.add_argument("--hour-samples", type=int, default=30_000, help="impressions per simulated hour")
    parser.add_argument("--flush-s", type=float, default=60.0, help="online flush interval, simulated seconds")
    parser.add_argument("--candidates", type=int, default=50, help="candidate items per request")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each hourly batch retrain")
    parser.add_argument("--batch-size", type=int, default=256, help="online training batch")
    parser.add_argument("--gap-window", type=int, default=10_000, help="samples per window of the online gap")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis", default=None, help="Redis URL of the parameter service (default: start one)")
    parser.add_argument("--out", default="reports/online_quality", help="folder of the JSON and the plot")
    args = parser.parse_args(argv)
    for name in ("users", "items", "hours", "hour_samples", "candidates", "epochs", "batch_size", "gap_window"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.flush_s <= 0:
        parser.error("--flush-s must be positive")
    if args.candidates < 10 or args.candidates > args.items:
        parser.error("--candidates must be between the slate size (10) and --items")

    import logging

    logging.getLogger("torchrec").setLevel(logging.ERROR)
    from local_services import services

    tmp = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    started = False
    try:
        url = args.redis
        if url is None:
            port = services.free_port()
            services.start_redis(tmp, port, name="redis-quality")
            started = True
            url = f"redis://127.0.0.1:{port}/0"
        report = run(args, url)
    finally:
        if started:
            services.stop(tmp, "redis-quality")
        shutil.rmtree(tmp, ignore_errors=True)
    print_report(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "online_quality.json").write_text(json.dumps(report, indent=2, default=_json))
    plot(report, out / "online_quality.png")
    print(f"wrote {out / 'online_quality.json'} and {out / 'online_quality.png'}")
    return 0


def _json(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return asdict(value) if hasattr(value, "__dataclass_fields__") else str(value)


def print_report(report: dict[str, Any]) -> None:
    head = ("hour", "samples", "online AUC", "batch AUC", "oracle", "online CTR", "batch CTR", "random", "oracle")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (4, 8, 10, 9, 7, 10, 9, 7, 7))))
    for h in report["hours"]:
        print(
            f"{h['hour']:>4} {h['samples_seen']:>8} {h['online_auc']:>10.4f} {h['batch_auc']:>9.4f} "
            f"{h['online_oracle_auc']:>7.4f} {h['online_ctr']:>10.4f} {h['batch_ctr']:>9.4f} "
            f"{h['random_ctr']:>7.4f} {h['oracle_ctr']:>7.4f}"
        )
    first = report["first_within_target_samples"]
    print(
        f"final gap to the oracle: online {report['final_gap_online']:+.4f}, batch {report['final_gap_batch']:+.4f} "
        f"(target {TARGET_GAP}); online first within target after "
        f"{first if first is not None else 'never'} samples; flushes {report['flushes']} "
        f"(refused {report['refused_flushes']})"
    )


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = report["hours"]
    x = [h["samples_seen"] for h in hours]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(x, [h["online_auc"] for h in hours], "o-", label="online")
    left.plot(x, [h["batch_auc"] for h in hours], "s-", label="hourly batch")
    left.plot(x, [h["online_oracle_auc"] for h in hours], "k--", label="oracle (online's samples)")
    left.set(xlabel="samples", ylabel="AUC (score before training)", title="progressive-validation AUC per hour")
    left.legend()
    right.plot(x, [h["online_ctr"] for h in hours], "o-", label="online")
    right.plot(x, [h["batch_ctr"] for h in hours], "s-", label="hourly batch")
    right.plot(x, [h["random_ctr"] for h in hours], ":", label="random policy")
    right.plot(x, [h["oracle_ctr"] for h in hours], "k--", label="oracle policy")
    right.set(xlabel="samples", ylabel="expected CTR of shown lists", title="served CTR per hour")
    right.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
