"""Score registered model versions on one challenger's evaluation set, each with its own rows.

The evaluation set is the challenger's: the window of the samples topic its job consumed
(manifest offsets) and the newest ``eval_fraction`` of it by event time, exactly as the
trainer splits it. A served state is a dense part and its rows, gated together
(``training.lifecycle.served``): the champion is scored with the rows the parameter service
holds (what serving answers with while the challenger waits, and keeps answering with if it
is refused), the challenger with its staged rows over them (what serving would answer with
once it is promoted). So the gate compares the two served states a user would meet.

Imports torch and mlflow inside the functions: only the evaluate step loads them.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from core.settings import Settings
from training.lifecycle import LifecycleError, gate
from training.pooling import mean_pool

log = logging.getLogger(__name__)


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


def _rows_of(client: Any, model_name: str, version: str, store: Any) -> Any:
    """Where the rows of a model version are read: the parameter service once promoted, else its stage over it."""
    from paramserver.staging import StagedView
    from training.lifecycle.served import TAG_PS_STAGE, TAG_PS_VERSION

    tags = client.get_model_version(model_name, version).tags
    if TAG_PS_VERSION in tags or not tags.get(TAG_PS_STAGE):
        return store
    return StagedView(store, tags[TAG_PS_STAGE])


def score_versions(s: Settings, challenger_run_id: str, versions: Mapping[str, str]) -> dict[str, Any]:
    """AUC of each ``{label: model version}`` on the evaluation set of ``challenger_run_id``."""
    import torch

    from core.metrics import roc_auc
    from training.data import read_window, split_by_time, to_columns
    from training.model import DenseArch, ModelConfig, load_dense
    from training.params import open_training_store, table_configs

    client = gate.client_for(s.mlflow)
    manifest = _manifest(client, challenger_run_id)
    start = {int(p): int(o) for p, o in manifest["offsets"]["start"].items()}
    end = {int(p): int(o) for p, o in manifest["offsets"]["end"].items()}
    fraction = float(manifest["hparams"]["eval_fraction"])
    samples, _stats = read_window(s.kafka, manifest["topic"], start, end)
    columns = to_columns(samples)
    rows = split_by_time(columns.labels, fraction).eval
    if len(rows) == 0:
        raise ValueError(f"run {challenger_run_id} has an empty evaluation set")
    labels = columns.labels[rows]

    models: dict[str, tuple[ModelConfig, DenseArch]] = {}
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

    # each version with its own rows: a promoted one with the parameter service's (the served
    # rows), a challenger with its staged rows over them, as it would be served once promoted
    store = open_training_store(s.ps, table_configs(first.embedding_dim, s.train.init_std))
    try:
        version_read = store.version()
        pooled: dict[str, np.ndarray] = {}
        for label, version in versions.items():
            reader = _rows_of(client, s.train.model_name, str(version), store)
            pooled[label] = np.zeros((len(rows), len(first.sparse_features), first.embedding_dim), np.float32)
            for j, feature in enumerate(first.sparse_features):
                lengths, values = columns.gather(feature, rows)
                uniq, inverse = np.unique(values, return_inverse=True)
                weights = reader.pull(feature, uniq).weights
                pooled[label][:, j, :] = mean_pool(weights[inverse], lengths)
    finally:
        store.close()

    dense = torch.from_numpy(columns.dense[rows].astype(np.float32))
    result: dict[str, Any] = {"eval_samples": int(len(rows)), "ps_version": int(version_read), "auc": {}}
    with torch.no_grad():
        for label, (_config, arch) in models.items():
            probs = torch.sigmoid(arch(dense, torch.from_numpy(pooled[label]))).numpy()
            result["auc"][label] = float(roc_auc(probs, labels))
    return result


def evaluate(s: Settings, model_version: str) -> dict[str, Any]:
    """Make sure the champion's AUC on the challenger's evaluation set is recorded; return both AUCs.

    JSON-safe (an orchestrator stores it): no NaN or infinity, ever. A challenger whose
    evaluation set is not evaluable (``gate.not_evaluable``: one class, too few clicks) returns
    ``evaluable: False`` and the reason, with no AUCs, and nobody is scored: the gate refuses it.

    The trainer evaluates on the newest share of its window and logs ``eval_auc``. The champion
    (and the challenger beside it) are scored on that same set, each with its own rows
    (``score_versions``); the scores go to the challenger's run (``champion_eval_auc``,
    ``challenger_eval_auc_rescored``, tag ``recsys_champion_version``). A score recorded already
    is reused, so a retry does not score twice.
    """
    client = gate.client_for(s.mlflow)
    name = s.train.model_name
    version = client.get_model_version(name, str(model_version))
    run = client.get_run(version.run_id)
    champion = gate.champion_version(client, name)
    info: dict[str, Any] = {
        "model_version": str(model_version),
        "run_id": version.run_id,
        "challenger_auc": run.data.metrics.get(gate.CHALLENGER_METRIC),
        "champion_version": champion,
        "champion_auc": None,
        "evaluable": True,
        "reason": None,
    }
    unfit = gate.not_evaluable(run, s.gate.min_eval_positives, s.gate.min_eval_negatives)
    if unfit is not None and champion != str(model_version):
        log.warning("%s v%s is not evaluable: %s", name, model_version, unfit)
        info.update(challenger_auc=None, evaluable=False, reason=unfit)
        return info
    if info["challenger_auc"] is None:
        raise LifecycleError(f"{name} v{model_version} (run {version.run_id}) has no {gate.CHALLENGER_METRIC}")
    if champion is None or champion == str(model_version):
        return info
    if run.data.tags.get(gate.TAG_CHAMPION_VERSION) == champion and gate.CHAMPION_METRIC in run.data.metrics:
        info["champion_auc"] = run.data.metrics[gate.CHAMPION_METRIC]
        return info
    try:
        scored = score_versions(s, version.run_id, {"challenger": str(model_version), "champion": champion})
    except Exception as exc:  # noqa: BLE001 - any failure means: no comparable champion score
        raise LifecycleError(
            f"the champion v{champion} could not be scored on the evaluation set of v{model_version} "
            f"({type(exc).__name__}: {exc}); the gate will not compare AUCs of different sets"
        ) from exc
    log.info("scored on the evaluation set of v%s: %s", model_version, scored)
    gate.record_champion_score(
        client,
        name,
        str(model_version),
        champion,
        scored["auc"]["champion"],
        challenger_auc=scored["auc"]["challenger"],
    )
    info["challenger_auc_rescored"] = scored["auc"]["challenger"]
    info["eval_samples"] = scored["eval_samples"]
    info["champion_auc"] = scored["auc"]["champion"]
    return info


def summary(found: Mapping[str, Any]) -> str:
    """One line of ``evaluate``'s result that leads with what the gate will see."""
    challenger = f"v{found['model_version']}"
    if not found.get("evaluable", True):
        return f"{challenger} not evaluable: {found.get('reason')}; the gate refuses it"
    own = found.get("challenger_auc_rescored", found.get("challenger_auc"))
    auc = f"AUC {own:.4f}" if isinstance(own, int | float) else "AUC ?"
    if found.get("champion_version") in (None, found["model_version"]):
        return f"challenger {challenger} {auc}; no other champion to compare with"
    champion = found.get("champion_auc")
    versus = f"{champion:.4f}" if isinstance(champion, int | float) else "?"
    samples = f" on {found['eval_samples']} evaluation samples" if found.get("eval_samples") else ""
    return f"challenger {challenger} {auc} vs champion v{found['champion_version']} AUC {versus}{samples}"
