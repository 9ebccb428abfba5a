"""Score registered model versions on one challenger's evaluation set, with the same parameter rows.

The evaluation set is the challenger's: the window of the samples topic its job consumed
(manifest offsets) and the newest ``eval_fraction`` of it by event time, exactly as the
trainer splits it. Every version is scored with the rows the parameter service holds now:
the rows are shared by all model versions (the training copy moves forward with every job,
and the inference replicas follow it), so "champion dense part + current rows" is what
serving keeps answering with if the challenger is refused, and the comparison isolates
what the gate decides about: which dense part serves better.

Imports torch, training and mlflow: only the evaluate task loads this module.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from core.settings import Settings


def _manifest(client: Any, run_id: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "manifest.json", tmp)
        return json.loads(Path(path).read_text())


def _dense_artifact(client: Any, tracking_uri: str, model_name: str, version: str, into: Path) -> Path:
    import mlflow

    source = client.get_model_version(model_name, version).source
    found = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(into / version), tracking_uri=tracking_uri
        )
    )
    if found.is_dir():
        files = sorted(found.rglob("*.pt"))
        if not files:
            raise FileNotFoundError(f"{model_name} v{version}: no dense weights (*.pt) under {source}")
        found = files[0]
    return found


def score_versions(s: Settings, challenger_run_id: str, versions: Mapping[str, str]) -> dict[str, Any]:
    """AUC of each ``{label: model version}`` on the evaluation set of ``challenger_run_id``."""
    import torch

    from core.metrics import roc_auc
    from recsys_ops.gate import client_for
    from training.data import read_window, split_by_time, to_columns
    from training.model import load_dense
    from training.params import open_training_store, table_configs

    client = client_for(s.mlflow.tracking_uri)
    manifest = _manifest(client, challenger_run_id)
    start = {int(p): int(o) for p, o in manifest["offsets"]["start"].items()}
    end = {int(p): int(o) for p, o in manifest["offsets"]["end"].items()}
    fraction = float(manifest["hparams"]["eval_fraction"])
    samples, _stats = read_window(s.kafka.bootstrap, manifest["topic"], start, end)
    columns = to_columns(samples)
    rows = split_by_time(len(columns), fraction).eval
    if len(rows) == 0:
        raise ValueError(f"run {challenger_run_id} has an empty evaluation set")
    labels = columns.labels[rows]

    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, version in versions.items():
            config, arch, _extra = load_dense(
                _dense_artifact(client, s.mlflow.tracking_uri, s.train.model_name, str(version), Path(tmp))
            )
            models[label] = (config, arch)
    first = next(iter(models.values()))[0]
    for label, (config, _arch) in models.items():
        if config.sparse_features != first.sparse_features or config.embedding_dim != first.embedding_dim:
            raise ValueError(f"version {versions[label]} has another feature layout; AUCs would not be comparable")

    # pooled rows [n_eval, n_sparse, D]: MEAN pooling, as the model's tables pool
    store = open_training_store(s.ps, table_configs(first.embedding_dim, s.train.init_std))
    try:
        pooled = np.zeros((len(rows), len(first.sparse_features), first.embedding_dim), np.float32)
        version_read = store.version()
        for j, feature in enumerate(first.sparse_features):
            lengths, values = columns.gather(feature, rows)
            uniq, inverse = np.unique(values, return_inverse=True)
            weights = store.pull(feature, uniq).weights
            owner = np.repeat(np.arange(len(rows)), lengths)
            np.add.at(pooled[:, j, :], owner, weights[inverse])
            pooled[:, j, :] /= np.maximum(lengths, 1)[:, None]
    finally:
        store.close()

    dense = torch.from_numpy(columns.dense[rows].astype(np.float32))
    result: dict[str, Any] = {"eval_samples": int(len(rows)), "ps_version": int(version_read), "auc": {}}
    with torch.no_grad():
        for label, (_config, arch) in models.items():
            probs = torch.sigmoid(arch(dense, torch.from_numpy(pooled))).numpy()
            result["auc"][label] = float(roc_auc(probs, labels))
    return result
