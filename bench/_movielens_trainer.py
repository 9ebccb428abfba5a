"""The MovieLens benchmark's bridge to the project's trainer (training/): same model, sharding and optimizers.

``recsys train`` reads its samples from Kafka; the benchmark hands the trainer the same
columns directly, so the figure measures the model and the training loop, not the reader.
Initial rows come from the parameter service (its in-process backend): the deterministic
row of each (table, id), exactly what a first job pulls.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from core.metrics import roc_auc
from core.settings import get_settings
from traffic import movielens


def to_columns(fa: movielens.FeatureArrays):
    """The trainer's columns of the benchmark's samples (position 0 for every rating: nothing was ranked)."""
    from training.data import Columns
    from training.model import position_value

    dense = np.zeros((len(fa), fa.dense.shape[1] + 1), dtype=np.float32)
    dense[:, :-1] = fa.dense
    dense[:, -1] = position_value(0)
    return Columns(
        sample_ids=fa.sample_ids(),
        labels=fa.labels.astype(np.float32),
        event_time=fa.event_time,
        dense=dense,
        lengths=dict(fa.lengths),
        values=dict(fa.values),
    )


def fit_predict(
    fa: movielens.FeatureArrays, train: np.ndarray, valid: np.ndarray, test: np.ndarray, epochs: int, seed: int
) -> tuple[np.ndarray, str]:
    """Train epoch by epoch; return the test predictions of the epoch with the best validation AUC."""
    import logging
    import warnings

    from feature_repo.spec import SPEC
    from paramserver import open_store
    from training import trainer
    from training.data import working_set
    from training.model import ModelConfig
    from training.params import table_configs

    # the planner's advice about dry runs and deprecations is noise in a benchmark's output
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    s = get_settings()
    rank, world, device = trainer.init_distributed("gloo")
    columns = to_columns(fa)
    ws = working_set(columns, np.sort(train))
    config = ModelConfig.from_spec(SPEC, s.train.embedding_dim, s.train.dense_arch, s.train.over_arch)
    hp = trainer.HParams(
        epochs=1,
        batch_size=s.train.batch_size,
        embedding_lr=s.train.embedding_lr,
        dense_lr=s.train.dense_lr,
        seed=seed,
        ips_max_weight=None,  # ratings have no logging policy
    )
    sharded = trainer.build_sharded(config, ws.rows, hp, device)
    store = open_store("memory", table_configs(config.embedding_dim, s.train.init_std))
    try:
        for table in sharded.owned(rank):
            rows = store.pull(table, ws.ids[table])
            trainer.load_rows(sharded, table, rows.weights, rows.state)
    finally:
        store.close()

    best: tuple[float, int, np.ndarray] | None = None
    for epoch in range(epochs):
        started = time.perf_counter()
        order_seed = trainer.HParams(
            epochs=1,
            batch_size=hp.batch_size,
            embedding_lr=hp.embedding_lr,
            dense_lr=hp.dense_lr,
            seed=seed + epoch,
            ips_max_weight=None,
        )
        result = trainer.train(sharded, columns, ws.local, train, order_seed, rank, world, device)
        valid_auc = roc_auc(trainer.predict(sharded, columns, ws.local, valid, 8192, device), fa.labels[valid])
        print(
            f"  epoch {epoch + 1}: train loss {np.mean(result.losses):.4f}, valid AUC {valid_auc:.4f} "
            f"({time.perf_counter() - started:.0f}s)",
            file=sys.stderr,
        )
        if best is not None and valid_auc <= best[0]:
            break  # the usual early stop: embeddings of ids seen once overfit after the first passes
        best = (valid_auc, epoch + 1, trainer.predict(sharded, columns, ws.local, test, 8192, device))
    assert best is not None
    note = (
        f"dim {config.embedding_dim}, batch {hp.batch_size}, lr {hp.embedding_lr}/{hp.dense_lr}, "
        f"best epoch {best[1]} of {epochs} by valid AUC"
    )
    return best[2], note
