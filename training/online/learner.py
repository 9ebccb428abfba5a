"""One online trainer's model: score a batch, learn from it, and flush what it learned as one version.

The model is training/model.py's ``DenseArch`` over MEAN-pooled rows (``DLRM.score``'s path):
for each batch the unique ids of every table are looked up in the ``RowCache`` (pulled on
demand), pooled with ``embedding_bag(mode="mean")`` (TorchRec's MEAN pooling: an empty bag is
zeros), and the gradient of each looked-up row drives the cache's row-wise Adagrad. The dense
part trains with Adam, as in the batch trainer; its Adam state is each trainer's own.

A flush (``flush``) asks the guard about the batches since the last flush (scored before
training on them); a published flush is ONE ``push_deltas`` of every table's deltas and the
dense delta, so the parameter service never holds half a flush. A refused flush is dropped
whole: the cache forgets its rows and the dense weights are re-pulled, so the trainer carries
on from the last published state (no refused update reaches the service, and none lingers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from paramserver import ParamStore
from training.data import Columns, ips_weights
from training.model import DenseArch, ModelConfig
from training.online.guard import Decision, FlushQuality, Guard, Verdict
from training.online.rows import DENSE_TABLE, DenseSync, RowCache
from training.trainer import weighted_bce


@dataclass(frozen=True)
class LearnerConfig:
    model: ModelConfig
    embedding_lr: float
    dense_lr: float
    seed: int
    ips_max_weight: float | None


@dataclass
class FlushResult:
    verdict: Verdict
    quality: FlushQuality
    samples: int
    version: int | None = None  # the parameter version holding the flush; None: nothing published
    rows: dict[str, int] = field(default_factory=dict)  # rows pushed per table


# called with the deltas of a flush just before they are pushed (the journal)
BeforePush = Callable[[dict[str, tuple[np.ndarray, np.ndarray]]], None]


class OnlineLearner:
    def __init__(
        self,
        store: ParamStore,
        config: LearnerConfig,
        guard: Guard,
        initial_dense: DenseArch | None = None,
        reset_dense: bool = False,
    ):
        self.store, self.config, self.guard = store, config, guard
        torch.manual_seed(config.seed)  # every trainer of the group starts from the same dense weights
        self.dense = initial_dense if initial_dense is not None else DenseArch(config.model)
        self.features = list(config.model.sparse_features)
        self.cache = RowCache(store, self.features)
        vector = torch.nn.utils.parameters_to_vector(self.dense.parameters()).detach().numpy()
        self.dense_sync = DenseSync(store, len(vector))
        self._load_dense(self.dense_sync.start(vector, reset=reset_dense))
        self._optimizer = torch.optim.Adam(self.dense.parameters(), lr=config.dense_lr)
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self.samples_since_flush = 0

    # ------------------------------------------------------------------ training
    def score(self, columns: Columns, index: np.ndarray | None = None) -> np.ndarray:
        """Click probabilities of the samples under the current state, learning nothing (rows are pulled on demand)."""
        index = np.arange(len(columns)) if index is None else index
        with torch.no_grad():
            logits, _, _ = self._forward(columns, index)
        return torch.sigmoid(logits).numpy().copy()

    def _forward(
        self, columns: Columns, index: np.ndarray
    ) -> tuple[torch.Tensor, dict[str, np.ndarray], dict[str, torch.Tensor]]:
        uniq: dict[str, np.ndarray] = {}
        inverse: dict[str, torch.Tensor] = {}
        offsets: dict[str, torch.Tensor] = {}
        for name in self.features:
            lengths, values = columns.gather(name, index)
            u, inv = np.unique(values, return_inverse=True)
            uniq[name] = u
            inverse[name] = torch.from_numpy(inv.astype(np.int64).reshape(-1))
            offsets[name] = torch.from_numpy(np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64))
        slots = self.cache.slots(uniq)
        leaves = {
            name: torch.from_numpy(self.cache.weights(name, slots[name])).requires_grad_() for name in self.features
        }
        pooled = torch.stack([self._pool(inverse[name], leaves[name], offsets[name]) for name in self.features], dim=1)
        dense = torch.from_numpy(columns.dense[index])
        self.dense.train()
        return self.dense(dense, pooled), slots, leaves

    def train_batch(self, columns: Columns, index: np.ndarray | None = None) -> np.ndarray:
        """Score the samples (before learning from them), then take one step on them; returns the scores."""
        index = np.arange(len(columns)) if index is None else index
        logits, slots, leaves = self._forward(columns, index)
        labels = torch.from_numpy(columns.labels[index])
        scores = torch.sigmoid(logits).detach().numpy().copy()  # progressive validation: before the step
        weights = None
        if self.config.ips_max_weight is not None:
            weights = torch.from_numpy(ips_weights(columns, self.config.ips_max_weight)[index])
        loss = weighted_bce(logits, labels, weights)
        self._optimizer.zero_grad()
        loss.backward()
        self._optimizer.step()
        for name in self.features:
            grad = leaves[name].grad
            if grad is not None:
                self.cache.adagrad(name, slots[name], grad.numpy(), self.config.embedding_lr)
        self._scores.append(scores)
        self._labels.append(columns.labels[index].copy())
        self.samples_since_flush += len(index)
        return scores

    def _pool(self, index: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if len(rows) == 0:  # no ids of this feature in the whole batch: every bag is empty, pooled to zeros
            return torch.zeros((len(offsets), self.config.model.embedding_dim))
        return torch.nn.functional.embedding_bag(index, rows, offsets, mode="mean")

    # ------------------------------------------------------------------ flushing
    def quality(self) -> FlushQuality:
        if not self._scores:
            return FlushQuality.of(np.zeros(0), np.zeros(0))
        return FlushQuality.of(np.concatenate(self._scores), np.concatenate(self._labels))

    def flush(self, before_push: BeforePush | None = None) -> FlushResult:
        """Judge the batches since the last flush; publish them as one version, or drop them whole."""
        quality = self.quality()
        verdict = self.guard.judge(quality)
        result = FlushResult(verdict, quality, self.samples_since_flush)
        self.samples_since_flush = 0
        if verdict.decision is not Decision.HOLD:
            self._scores, self._labels = [], []
        # else: too few scored samples to judge while halted; they count toward the next judgement, so a
        # halted trainer whose flushes are all small (a low traffic rate) resumes once they add up
        if not verdict.publish:
            self.discard()
            return result
        deltas = self.cache.deltas()
        if deltas:
            current = torch.nn.utils.parameters_to_vector(self.dense.parameters()).detach().numpy()
            deltas[DENSE_TABLE] = self.dense_sync.delta(current)
            if before_push is not None:
                before_push(deltas)
            result.version = self.store.push_deltas(deltas)
            result.rows = {name: len(ids) for name, (ids, _) in deltas.items()}
        self.cache.clear_deltas()
        self.cache.refresh()  # what the other trainers flushed meanwhile
        self._load_dense(self.dense_sync.pull())
        return result

    def discard(self) -> None:
        """Forget every unpublished update: rows and dense weights are the service's again (the last good state)."""
        self.cache.forget()
        self._load_dense(self.dense_sync.pull())
        self._optimizer = torch.optim.Adam(self.dense.parameters(), lr=self.config.dense_lr)

    def _load_dense(self, vector: np.ndarray) -> None:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.from_numpy(vector.astype(np.float32)), self.dense.parameters())
