"""The trainer's DenseArch evaluated with numpy: the same scores as its torch forward, without torch's per-op cost.

A recommend request scores ~100 pairs through a few small layers; torch spends most of its
time there in per-operator dispatch (and releases and retakes the interpreter lock around
each op, which on a loaded 2-core machine costs more than the arithmetic). The weights are
copied once, when a scorer is built; the computation is the module's own, in float32:
bottom MLP, the pairwise dot products of the bottom output and the pooled embeddings (upper
triangle, the order of ``DenseArch``'s buffers), top MLP. tests/serving/test_numpy_dense.py
holds it to the torch forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# one layer: ("linear", weight [in, out], bias [out]) or ("relu", None, None)
_Layer = tuple[str, np.ndarray | None, np.ndarray | None]


def _layers(sequential: Any) -> list[_Layer]:
    from torch import nn

    out: list[_Layer] = []
    for module in sequential:
        if isinstance(module, nn.Linear):
            weight = module.weight.detach().cpu().numpy().astype(np.float32).T.copy()
            bias = (
                module.bias.detach().cpu().numpy().astype(np.float32)
                if module.bias is not None
                else np.zeros(weight.shape[1], np.float32)
            )
            out.append(("linear", weight, bias))
        elif isinstance(module, nn.ReLU):
            out.append(("relu", None, None))
        else:
            raise TypeError(f"no numpy forward for {type(module).__name__}")
    return out


def _run(layers: list[_Layer], x: np.ndarray) -> np.ndarray:
    for kind, weight, bias in layers:
        if kind == "linear":
            x = x @ weight  # type: ignore[operator]
            x += bias  # type: ignore[arg-type]
        else:
            np.maximum(x, 0.0, out=x)
    return x


@dataclass(frozen=True)
class NumpyDenseArch:
    bottom: list[_Layer]
    top: list[_Layer]
    rows: np.ndarray  # upper-triangle pair indices of the interaction
    cols: np.ndarray

    @classmethod
    def from_torch(cls, arch: Any) -> NumpyDenseArch:
        """A copy of ``training.model.DenseArch`` ``arch``'s weights; TypeError for a layer it cannot evaluate."""
        return cls(_layers(arch.bottom), _layers(arch.top), arch._rows.cpu().numpy(), arch._cols.cpu().numpy())

    def logits(self, dense: np.ndarray, pooled: np.ndarray) -> np.ndarray:
        """Logits [B] from dense values [B, n_dense] and pooled embeddings [B, n_sparse, D] (float32)."""
        bottom = _run(self.bottom, np.asarray(dense, np.float32))
        vectors = np.concatenate([bottom[:, None, :], np.asarray(pooled, np.float32)], axis=1)
        dots = np.matmul(vectors, vectors.transpose(0, 2, 1))[:, self.rows, self.cols]
        return _run(self.top, np.concatenate([bottom, dots], axis=1))[:, 0]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """torch.sigmoid in float32, without overflow for logits of either sign."""
    out = np.empty_like(x, dtype=np.float32)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    e = np.exp(x[~positive])
    out[~positive] = e / (1.0 + e)
    return out
