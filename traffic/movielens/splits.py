"""Train / validation / test splits of the ratings: seeded random (AutoInt's 8:1:1) or by time."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def random_split(
    n: int, seed: int = 2019, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test indices of a seeded random permutation (the AutoInt 8:1:1 protocol)."""
    _check_fractions(fractions)
    order = np.random.default_rng(seed).permutation(n)
    a = int(round(n * fractions[0]))
    b = a + int(round(n * fractions[1]))
    return np.sort(order[:a]), np.sort(order[a:b]), np.sort(order[b:])


def time_split(
    event_time: np.ndarray, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test indices by event time: the oldest 80% train, the newest 10% test."""
    _check_fractions(fractions)
    order = np.argsort(np.asarray(event_time), kind="stable")
    n = len(order)
    a = int(round(n * fractions[0]))
    b = a + int(round(n * fractions[1]))
    return order[:a], order[a:b], order[b:]


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative shares summing to 1, got {list(fractions)}")
