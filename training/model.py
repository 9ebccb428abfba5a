"""The DLRM-style ranking model: embedding tables, bottom MLP, pairwise interaction, top MLP.

Importable without torchrun or a process group: serving loads this class, the dense
weights from MLflow (``load_dense``) and embedding rows from the parameter service, and
scores with ``DLRM.score`` on pooled rows it looked up itself.

Pooling is MEAN for every table (``training.pooling``), so a multi-valued feature (genres)
is the average of its rows; whoever pools rows outside the model calls ``mean_pool``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from training.pooling import POOLING

if TYPE_CHECKING:
    from core.settings import TrainingSettings

DENSE_FORMAT = "recsys-dlrm-dense/1"
# the serving position of every scored item: the model learns the position bias from this
# input and serving neutralises it by scoring everything as if shown first
POSITION_FEATURE = "position_log2"


def position_value(position: int | float) -> float:
    """The model's position input: log2(1 + position), the shape of a typical position bias."""
    return math.log2(1.0 + max(0.0, float(position)))


@dataclass(frozen=True)
class ModelConfig:
    sparse_features: tuple[str, ...]
    dense_features: tuple[str, ...]
    embedding_dim: int = 16
    dense_arch: tuple[int, ...] = (32, 16)
    over_arch: tuple[int, ...] = (64, 32)
    spec_hash: str = ""
    multi_valued: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.sparse_features:
            raise ValueError("the model needs at least one sparse feature")
        if len(set(self.sparse_features)) != len(self.sparse_features):
            raise ValueError(f"duplicate sparse features: {self.sparse_features}")
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if not self.dense_arch or any(n < 1 for n in self.dense_arch):
            raise ValueError(f"dense_arch needs positive layer sizes, got {self.dense_arch}")
        if self.dense_arch[-1] != self.embedding_dim:
            # the bottom MLP output joins the embeddings in the dot-product interaction
            raise ValueError(
                f"the last dense_arch layer ({self.dense_arch[-1]}) must equal embedding_dim ({self.embedding_dim})"
            )
        if any(n < 1 for n in self.over_arch):
            raise ValueError(f"over_arch needs positive layer sizes, got {self.over_arch}")

    @classmethod
    def from_spec(
        cls, spec: Any, embedding_dim: int, dense_arch: Sequence[int], over_arch: Sequence[int]
    ) -> ModelConfig:
        """The model of a feature spec: one table per sparse feature, its dense features plus the position."""
        return cls(
            sparse_features=tuple(spec.sparse_names),
            dense_features=tuple(spec.dense_names) + (POSITION_FEATURE,),
            embedding_dim=embedding_dim,
            dense_arch=tuple(dense_arch),
            over_arch=tuple(over_arch),
            spec_hash=spec.spec_hash(),
            multi_valued=tuple(f.name for f in spec.sparse if f.multi_valued),
        )

    @classmethod
    def of_settings(cls, t: TrainingSettings) -> ModelConfig:
        """The model the settings train (batch and online) over the feature spec: what serving expects too."""
        from feature_repo.spec import SPEC

        return cls.from_spec(SPEC, t.embedding_dim, t.dense_arch, t.over_arch)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)


def _mlp(sizes: Sequence[int], final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if final_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DenseArch(nn.Module):
    """Bottom MLP, pairwise dot-product interaction and top MLP: everything but the tables."""

    _rows: torch.Tensor  # upper-triangle pair indices of the interaction (buffers)
    _cols: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        n_dense = len(config.dense_features)
        self.bottom = _mlp((n_dense, *config.dense_arch), final_activation=True)
        vectors = len(config.sparse_features) + 1
        pairs = vectors * (vectors - 1) // 2
        self.top = _mlp((config.embedding_dim + pairs, *config.over_arch, 1), final_activation=False)
        rows, cols = torch.triu_indices(vectors, vectors, offset=1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Logits [B] from dense values [B, n_dense] and pooled embeddings [B, n_sparse, D]."""
        bottom = self.bottom(dense)
        vectors = torch.cat([bottom.unsqueeze(1), pooled], dim=1)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))[:, self._rows, self._cols]
        return self.top(torch.cat([bottom, dots], dim=1)).squeeze(-1)


class DLRM(nn.Module):
    """EmbeddingBagCollection (one table per sparse feature) + DenseArch.

    ``table_rows`` gives each table's row count: a training job sizes the tables to its
    working set (local indices [0, n) of the ids it pulled); without it every table gets
    one row, enough for loading dense weights and scoring pooled rows.
    """

    def __init__(
        self, config: ModelConfig, table_rows: Mapping[str, int] | None = None, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        from torchrec.modules.embedding_configs import PoolingType

        self.config = config
        rows = dict(table_rows or {})
        missing = set(config.sparse_features) - set(rows) if table_rows is not None else set()
        if missing:
            raise ValueError(f"table_rows lacks tables {sorted(missing)}")
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=name,
                    embedding_dim=config.embedding_dim,
                    num_embeddings=max(1, int(rows.get(name, 1))),
                    feature_names=[name],
                    pooling=PoolingType[POOLING],
                )
                for name in config.sparse_features
            ],
            device=torch.device(device) if device is not None else None,
        )
        self.dense_arch = DenseArch(config)

    def forward(self, dense: torch.Tensor, sparse: Any) -> torch.Tensor:
        """Logits [B] from dense values and a KeyedJaggedTensor of local row indices."""
        pooled = self.ebc(sparse)
        stacked = torch.stack([pooled[name] for name in self.config.sparse_features], dim=1)
        return self.dense_arch(dense, stacked)

    def score(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Click probabilities [B] from dense values [B, n_dense] and pooled rows [B, n_sparse, D]."""
        return torch.sigmoid(self.dense_arch(dense, pooled))


# --------------------------------------------------------------------------- dense weights artifact


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the dense part only (the tables live in the parameter service)."""
    module = getattr(model, "module", model)  # DistributedModelParallel wraps the model
    dense = cast(nn.Module, module.dense_arch)
    dense = getattr(dense, "module", dense)  # ... and the dense part in DDP
    return {k: v.detach().cpu().clone() for k, v in dense.state_dict().items()}


def save_dense(
    path: str | Path,
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the self-describing dense artifact: format, model config, dense state dict, extras."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(
        {
            "format": DENSE_FORMAT,
            "config": config.to_dict(),
            "state_dict": dict(state_dict),
            "extra": dict(extra or {}),
        },
        buffer,
    )
    path.write_bytes(buffer.getvalue())
    return path


def load_dense(path: str | Path) -> tuple[ModelConfig, DenseArch, dict[str, Any]]:
    """Read a dense artifact: its model config, a DenseArch with the weights loaded, and the extras."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != DENSE_FORMAT:
        raise ValueError(f"{path} is not a {DENSE_FORMAT} artifact")
    config = ModelConfig.from_dict(payload["config"])
    arch = DenseArch(config)
    arch.load_state_dict(payload["state_dict"])
    arch.eval()
    return config, arch, payload.get("extra", {})
