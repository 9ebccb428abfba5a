"""The numpy forward of the DLRM's dense part gives the torch model's scores (serving scores with it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from feature_repo.spec import SPEC
from serving.loader import DLRMScorer
from serving.numpy_dense import NumpyDenseArch, sigmoid
from training.model import DenseArch, ModelConfig


def _arch(seed: int, dim: int, dense_arch: tuple[int, ...], over_arch: tuple[int, ...]) -> DenseArch:
    torch.manual_seed(seed)
    arch = DenseArch(ModelConfig.from_spec(SPEC, dim, dense_arch, over_arch))
    with torch.no_grad():  # weights well away from the init scale, so a wrong layer cannot hide
        for p in arch.parameters():
            p.mul_(3.0)
    return arch.eval()


@pytest.mark.parametrize(
    ("dim", "dense_arch", "over_arch", "batch"),
    [(16, (32, 16), (64, 32), 100), (8, (8,), (), 1), (4, (16, 8, 4), (8,), 0), (16, (32, 16), (64, 32), 2000)],
)
def test_numpy_logits_equal_the_torch_forward(dim, dense_arch, over_arch, batch):
    arch = _arch(batch + dim, dim, dense_arch, over_arch)
    rng = np.random.default_rng(batch)
    dense = rng.normal(0, 2, (batch, len(arch.config.dense_features))).astype(np.float32)
    pooled = rng.normal(0, 1, (batch, len(arch.config.sparse_features), dim)).astype(np.float32)
    with torch.inference_mode():
        expected = arch(torch.from_numpy(dense), torch.from_numpy(pooled)).numpy()
    got = NumpyDenseArch.from_torch(arch).logits(dense, pooled)
    assert got.shape == expected.shape == (batch,)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_the_scorer_gives_the_torch_scores_and_falls_back_to_torch():
    arch = _arch(7, 16, (32, 16), (64, 32))
    scorer = DLRMScorer(arch, arch.config, "m/1")
    assert scorer.numpy_arch is not None
    torch_only = dataclasses.replace(scorer)
    torch_only.numpy_arch = None  # what a model with a layer numpy cannot run scores with
    rng = np.random.default_rng(3)
    n = 100
    pooled = {t: rng.normal(0, 1, (n, 16)).astype(np.float32) for t in SPEC.sparse_names}
    dense = rng.normal(0, 1, (n, len(SPEC.dense_names))).astype(np.float32)
    fast, slow = scorer.score(pooled, dense), torch_only.score(pooled, dense)
    assert fast.dtype == slow.dtype == np.float32
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)
    assert len(np.unique(np.round(fast, 4))) > n // 2  # scores that differ, not one constant


def test_a_layer_numpy_cannot_run_keeps_the_torch_forward():
    arch = _arch(1, 8, (8,), (8,))
    arch.top.insert(1, torch.nn.Tanh())
    with pytest.raises(TypeError, match="Tanh"):
        NumpyDenseArch.from_torch(arch)
    assert DLRMScorer(arch, arch.config, "m/2").numpy_arch is None


def test_sigmoid_matches_torch_without_overflow():
    x = np.array([-1e4, -80.0, -5.0, 0.0, 3.0, 80.0, 1e4], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        got = sigmoid(x)
    np.testing.assert_allclose(got, torch.sigmoid(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-7)
