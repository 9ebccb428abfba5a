"""How a bag of embedding rows becomes one vector: MEAN pooling, the one definition.

The trainer's tables pool with TorchRec's ``PoolingType[POOLING]`` inside the model; every
place that pools rows it looked up itself (serving, the lifecycle's evaluation) calls
``mean_pool``, so a multi-valued feature (genres) scores the same way it was trained.
numpy only: serving imports this without loading torch.
"""

from __future__ import annotations

import numpy as np

# the TorchRec PoolingType name of every table (training.model); mean_pool is its numpy twin
POOLING = "MEAN"


def mean_pool(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Mean of each bag's rows: ``rows`` [sum(lengths), D] in bag order, ``lengths`` [n] -> float32 [n, D].

    An empty bag pools to zeros, as TorchRec's MEAN pooling does.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    rows = np.asarray(rows)
    if rows.size == 0 and rows.ndim == 1:  # no ids at all: a lookup of nothing has no width either
        rows = rows.reshape(0, 0)
    if rows.ndim != 2 or rows.shape[0] != int(lengths.sum()):
        raise ValueError(f"rows {rows.shape} do not match bags of total length {int(lengths.sum())}")
    sums = np.zeros((len(lengths), rows.shape[1]), dtype=rows.dtype if rows.size else np.float32)
    filled = lengths > 0
    if filled.any():
        # reduceat sums each bag from its start to the next start: with the empty bags left out,
        # the next non-empty bag's start is exactly where this bag ends
        starts = (np.cumsum(lengths) - lengths)[filled]
        sums[filled] = np.add.reduceat(rows, starts, axis=0)
    return (sums / np.maximum(lengths, 1)[:, None]).astype(np.float32, copy=False)
