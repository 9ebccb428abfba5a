"""The champion model from the MLflow registry: its dense weights, scored on rows from the parameter service.

Serving imports the trainer's model class only (``training.model``): the dense artifact is
self-describing (format, model config, state dict), the embedding tables are the parameter
service's rows, named by the spec's sparse features.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.mlflow_auth import tracking_uri
from core.settings import MlflowSettings, Settings

log = logging.getLogger(__name__)


@dataclass
class DLRMScorer:
    """The trainer's DenseArch (bottom MLP, interaction, top MLP) over pooled parameter-service rows."""

    arch: Any  # training.model.DenseArch, in eval mode
    config: Any  # training.model.ModelConfig
    version: str
    name: str = "dlrm"
    # the same forward in numpy (serving.numpy_dense), a copy of the weights; None: a layer numpy cannot run
    numpy_arch: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from serving.numpy_dense import NumpyDenseArch

        try:
            self.numpy_arch = NumpyDenseArch.from_torch(self.arch)
        except TypeError as exc:
            log.info("model %s scores with torch: %s", self.version, exc)

    def tables(self) -> dict[str, int]:
        return {t: self.config.embedding_dim for t in self.config.sparse_features}

    def score(self, pooled: dict[str, np.ndarray], dense: np.ndarray) -> np.ndarray:
        from feature_repo.spec import SPEC
        from training.model import POSITION_FEATURE

        n = dense.shape[0]
        spec_dense = {name: i for i, name in enumerate(SPEC.dense_names)}
        columns = []
        for name in self.config.dense_features:
            if name in spec_dense:
                columns.append(dense[:, spec_dense[name]])
            elif name == POSITION_FEATURE:
                columns.append(np.zeros(n, np.float32))  # score every item as if shown first
            else:
                raise ValueError(f"model {self.version} needs dense feature {name!r} that serving does not have")
        dense_in = np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((n, 0), np.float32)
        dim = self.config.embedding_dim
        stacked = np.stack(
            [pooled[t] if t in pooled else np.zeros((n, dim), np.float32) for t in self.config.sparse_features], axis=1
        )
        if self.numpy_arch is not None:
            from serving.numpy_dense import sigmoid

            return sigmoid(self.numpy_arch.logits(dense_in, stacked))
        import torch

        with torch.inference_mode():
            logits = self.arch(torch.from_numpy(dense_in), torch.from_numpy(np.ascontiguousarray(stacked)))
            return torch.sigmoid(logits).numpy().astype(np.float32)


def load_dense_scorer(path: str | Path, version: str) -> DLRMScorer:
    import torch

    from training.model import load_dense

    # small MLPs over ~100 rows: intra-op threads only contend with the request threads
    torch.set_num_threads(1)
    config, arch, _extra = load_dense(path)
    return DLRMScorer(arch, config, version)


class OnlineDense:
    """The online trainers' dense weights (``training.online.rows.DENSE_TABLE``) as serving's replica holds them.

    A trainer's flush pushes its dense delta in the same parameter version as its row deltas, so
    a replica at version V holds the dense weights and the rows of one trained state: serving
    names it ``online/v<V>`` and scores it with rows of V or newer (never older ones). A flush
    the guard refused is never pushed, so every state read here passed the guard; while the
    guard holds publishing back, the replica (and so serving) stays at the last good state.
    The model's shape is the settings' (``ModelConfig.of_settings``), the one the trainers train.
    """

    def __init__(self, rows: Any, config: Any) -> None:  # serving.params.RowFetcher, training.model.ModelConfig
        self.rows, self.config = rows, config
        self.n_params = 0  # known at the first load (building the model imports torch: not before trainers ran)
        self.ids = np.zeros(0, np.int64)

    def load(self, newer_than: int | None) -> tuple[DLRMScorer, int] | None:
        """The scorer of the replica's dense weights and their version; None when no trainer wrote any, or no newer.

        Raises ValueError when the trainers' dense table holds a model of another shape than the settings'.
        """
        from training.online.rows import DENSE_TABLE, dense_ids, dense_vector

        if newer_than is not None and (self.rows.refresh_version() or 0) <= newer_than:
            return None
        if not self.rows.knows(DENSE_TABLE):
            return None
        import torch

        from training.model import DenseArch

        if not self.n_params:
            self.n_params = sum(p.numel() for p in DenseArch(self.config).parameters())
            self.ids = dense_ids(self.n_params)
        config = self.rows.table_configs().get(DENSE_TABLE)
        if config is not None and config.capacity != len(self.ids):
            raise ValueError(
                f"the online dense table holds {config.capacity} chunks, the settings' model needs {len(self.ids)}: "
                "trainers and serving disagree on the model's shape (RECSYS_TRAIN_*)"
            )
        rows = self.rows.read(DENSE_TABLE, self.ids)
        vector = dense_vector(rows, self.n_params) if rows is not None else None
        if rows is None or vector is None or (newer_than is not None and rows.version <= newer_than):
            return None
        torch.set_num_threads(1)  # as load_dense_scorer: small MLPs, request threads
        arch = DenseArch(self.config)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.from_numpy(vector), arch.parameters())
        arch.eval()
        return DLRMScorer(arch, self.config, f"online/v{rows.version}"), rows.version


def _find_dense(folder: Path) -> Path:
    from training.model import load_dense

    candidates = sorted(folder.rglob("*"), key=lambda p: ("dense" not in p.name, len(p.parts)))
    errors = []
    for path in candidates:
        if not path.is_file() or path.stat().st_size > 512 * 1024 * 1024:
            continue
        try:
            load_dense(path)
        except Exception as exc:  # noqa: BLE001 - not the artifact we look for
            errors.append(f"{path.name}: {type(exc).__name__}")
            continue
        return path
    raise FileNotFoundError(f"no dense-weights artifact under {folder} (tried {', '.join(errors[:10]) or 'nothing'})")


class MlflowLoader:
    """Resolves ``models:/<name>@<alias>`` and builds the scorer of a version."""

    def __init__(self, tracking: MlflowSettings | str, model_name: str, alias: str) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri(tracking)  # settings with credentials: authenticated
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.model_name, self.alias = model_name, alias

    def champion_version(self) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.model_name, self.alias).version)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise

    def rows_version(self, version: str) -> int | None:
        from training.lifecycle.served import TAG_PS_VERSION

        value = self.client.get_model_version(self.model_name, version).tags.get(TAG_PS_VERSION)
        return int(value) if value is not None else None

    def fetch_dense(self, version: str, folder: Path) -> Path:
        """Download the dense artifact of registered ``version`` under ``folder``; its path."""
        mv = self.client.get_model_version(self.model_name, version)
        try:
            import mlflow.artifacts

            mlflow.artifacts.download_artifacts(
                artifact_uri=mv.source,
                dst_path=str(folder / "model"),
                tracking_uri=self.tracking_uri,
            )
            return _find_dense(folder / "model")
        except Exception:  # noqa: BLE001 - the weights may sit beside the logged model in the run
            if not mv.run_id:
                raise
            self.client.download_artifacts(mv.run_id, "", str(folder / "run"))
            return _find_dense(folder / "run")

    def load(self, version: str) -> DLRMScorer:
        with tempfile.TemporaryDirectory(prefix="serving-model-") as tmp:
            return load_dense_scorer(self.fetch_dense(version, Path(tmp)), f"{self.model_name}/{version}")


def mlflow_loader(settings: Settings) -> MlflowLoader | None:
    try:
        return MlflowLoader(settings.mlflow, settings.serving.model_name, settings.serving.model_alias)
    except Exception as exc:  # noqa: BLE001 - no registry: serve with the fallback scorer (flagged in /readyz)
        log.error("MLflow registry unavailable: %s", exc)
        return None
