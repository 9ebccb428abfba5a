"""The online trainer's rows: a local cache of the rows it has pulled, and the deltas it owes the service.

Sparse rows: pulled on demand (one consistent version per pull), updated locally with
row-wise Adagrad (the batch trainer's optimizer: ``state += mean(g^2)``, ``w -= lr * g /
(sqrt(state) + eps)``), and every update is also added to a per-row delta of the vector and
of the Adagrad state. A flush hands those deltas over (``deltas``) and clears them; the
parameter service adds them to whatever the row holds then (``push_deltas``), so several
trainers touching one row all count. After a flush ``refresh`` re-pulls the cached rows that
anybody changed since the last sync, so the cache follows the other trainers.

Dense weights: kept in sync through one parameter-service table holding the flattened
dense parameters in chunks (``DENSE_TABLE``). Each trainer pushes the change of its dense
weights since its last sync as a delta in the same push as its sparse deltas and then
re-pulls the sum. Compared with averaging the trainers' weights, deltas need no
coordination (no barrier, no rank that averages), survive a trainer's death without a
rebalance of anything but Kafka partitions, and are exact when only one trainer runs.
numpy only: the learner moves tensors in and out.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from paramserver import LogTrimmed, ParamStore, Rows, TableConfig

DENSE_TABLE = "online.dense"
DENSE_CHUNK = 256  # floats per row of the dense table
# torchrec.optim.RowWiseAdagrad's epsilon: the update the batch trainer's fused optimizer makes
ADAGRAD_EPS = 1e-10


def dense_ids(n_params: int) -> np.ndarray:
    """The row ids of ``DENSE_TABLE`` holding ``n_params`` flattened dense weights."""
    return np.arange(max(1, -(-n_params // DENSE_CHUNK)), dtype=np.int64)


def dense_vector(rows: Rows, n_params: int) -> np.ndarray | None:
    """The flattened dense weights in the rows of ``DENSE_TABLE``; None while no trainer has written them."""
    if not len(rows.ids) or not rows.state[:, 0].all():
        return None
    return rows.weights.reshape(-1)[:n_params].astype(np.float32)


def dense_table(n_params: int) -> TableConfig:
    """The table of the flattened dense weights: zero initial rows; state column 1 once written."""
    return TableConfig(
        name=DENSE_TABLE, dim=DENSE_CHUNK, state_dim=1, init_std=0.0, capacity=max(1, -(-n_params // DENSE_CHUNK))
    )


class _Table:
    """Cached rows of one table in arrays that grow by doubling (slot i holds ``ids[i]``; ``n`` slots used)."""

    def __init__(self, dim: int, state_dim: int) -> None:
        self.slot: dict[int, int] = {}
        self.n = 0
        self.ids = np.zeros(0, np.int64)
        self.weights = np.zeros((0, dim), np.float32)
        self.state = np.zeros((0, state_dim), np.float32)
        self.delta_w = np.zeros((0, dim), np.float32)
        self.delta_s = np.zeros((0, state_dim), np.float32)
        self.touched = np.zeros(0, bool)

    def __len__(self) -> int:
        return self.n

    def add(self, rows: Rows) -> None:
        count = len(rows.ids)
        if self.n + count > len(self.ids):
            capacity = max(1024, 2 * (self.n + count))
            for name in ("ids", "weights", "state", "delta_w", "delta_s", "touched"):
                old = getattr(self, name)
                grown = np.zeros((capacity, *old.shape[1:]), old.dtype)
                grown[: self.n] = old[: self.n]
                setattr(self, name, grown)
        for k, i in enumerate(rows.ids.tolist()):
            self.slot[i] = self.n + k
        end = self.n + count
        self.ids[self.n : end] = rows.ids
        self.weights[self.n : end] = rows.weights
        self.state[self.n : end] = rows.state
        self.n = end


class RowCache:
    """The rows this trainer has pulled, per table, with the deltas of its updates since the last flush."""

    def __init__(self, store: ParamStore, tables: list[str]) -> None:
        self.store = store
        self.names = list(tables)
        self._tables = {name: _Table(store.tables[name].dim, store.tables[name].state_dim) for name in self.names}
        self.synced_version = store.version()
        self.pulled = 0  # rows pulled from the service so far

    def rows(self, name: str) -> int:
        return len(self._tables[name])

    def slots(self, requests: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Cache slots of the unique ids per table, pulling (one consistent version) those not cached."""
        missing = {}
        for name, ids in requests.items():
            table = self._tables[name]
            absent = [i for i in ids.tolist() if i not in table.slot]
            if absent:
                missing[name] = np.asarray(absent, dtype=np.int64)
        if missing:
            for name, rows in self.store.pull_many(missing).items():
                self._tables[name].add(rows)
                self.pulled += len(rows.ids)
        return {
            name: np.fromiter((self._tables[name].slot[i] for i in ids.tolist()), np.int64, len(ids))
            for name, ids in requests.items()
        }

    def weights(self, name: str, slots: np.ndarray) -> np.ndarray:
        return self._tables[name].weights[slots]

    def adagrad(self, name: str, slots: np.ndarray, grad: np.ndarray, lr: float) -> None:
        """Row-wise Adagrad step of the rows at ``slots`` (unique) with their summed gradients [n, dim]."""
        table = self._tables[name]
        grad = grad.astype(np.float32, copy=False)
        state_add = np.mean(grad * grad, axis=1, keepdims=True, dtype=np.float32)
        state = table.state[slots] + state_add
        step = (-lr * grad / (np.sqrt(state) + ADAGRAD_EPS)).astype(np.float32)
        table.weights[slots] += step
        table.state[slots] = state
        table.delta_w[slots] += step
        table.delta_s[slots] += state_add
        table.touched[slots] = True

    def deltas(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per table, the touched ids and their deltas [n, dim + state_dim] (vectors, then Adagrad state)."""
        out = {}
        for name, table in self._tables.items():
            hit = np.flatnonzero(table.touched[: table.n])
            if len(hit):
                out[name] = (table.ids[hit], np.hstack([table.delta_w[hit], table.delta_s[hit]]))
        return out

    def clear_deltas(self) -> None:
        for table in self._tables.values():
            table.delta_w[:] = 0.0
            table.delta_s[:] = 0.0
            table.touched[:] = False

    def forget(self) -> None:
        """Drop every cached row and delta: the next batches pull the service's rows again."""
        self._tables = {name: _Table(t.weights.shape[1], t.state.shape[1]) for name, t in self._tables.items()}
        self.synced_version = self.store.version()

    def refresh(self) -> int:
        """Re-pull the cached rows someone changed since the last sync (deltas must be flushed); returns the count."""
        if any(t.touched.any() for t in self._tables.values()):
            raise RuntimeError("refresh with unflushed deltas would lose them: flush first")
        now = self.store.version()
        try:
            changed = self.store.changed_since(self.synced_version)
        except LogTrimmed:  # the change log no longer reaches back: start over from the service's rows
            self.forget()
            return 0
        requests = {}
        for name, ids in changed.items():
            table = self._tables.get(name)
            if table is not None and len(table):
                cached = ids[np.isin(ids, table.ids[: table.n])]
                if len(cached):
                    requests[name] = cached
        count = 0
        if requests:
            for name, rows in self.store.pull_many(requests).items():
                table = self._tables[name]
                slots = np.fromiter((table.slot[i] for i in rows.ids.tolist()), np.int64, len(rows.ids))
                table.weights[slots] = rows.weights
                table.state[slots] = rows.state
                count += len(slots)
        self.synced_version = now
        return count


class DenseSync:
    """The flattened dense weights as rows of ``DENSE_TABLE``: pull, and the delta since the last pull."""

    def __init__(self, store: ParamStore, n_params: int) -> None:
        self.store, self.n = store, n_params
        self.ids = dense_ids(n_params)
        self.base = np.zeros(n_params, np.float32)

    def start(self, initial: np.ndarray, reset: bool = False) -> np.ndarray:
        """The group's dense weights: the stored ones, or ``initial`` when no trainer wrote any yet.

        ``reset`` writes ``initial`` over whatever the group holds (restarting the group from a newly
        promoted champion's dense part; every other member must be stopped, or its next delta lands on it).
        """
        from paramserver import Conflict

        written = {DENSE_TABLE: Rows(self.ids, self._padded(initial), np.ones((len(self.ids), 1), np.float32))}
        if reset:
            self.store.push(written)
            return self.pull()
        for _ in range(10):
            rows = self.store.pull(DENSE_TABLE, self.ids)
            if dense_vector(rows, self.n) is not None:  # written (state column 1): another trainer, or a previous run
                return self._take(rows.weights)
            try:
                # conditional: of two trainers starting together, one writes and the other reads its weights
                self.store.push(written, unchanged_since=rows.version)
            except Conflict:
                continue
        return self.pull()

    def pull(self) -> np.ndarray:
        return self._take(self.store.pull(DENSE_TABLE, self.ids).weights)

    def delta(self, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ids and vector deltas [n, DENSE_CHUNK] of the change since the last pull."""
        return self.ids, self._padded(current - self.base)

    def _padded(self, vector: np.ndarray) -> np.ndarray:
        """The flattened weights as the table's rows: DENSE_CHUNK floats each, the last one zero-padded."""
        padded = np.zeros((len(self.ids), DENSE_CHUNK), np.float32)
        padded.reshape(-1)[: self.n] = vector
        return padded

    def _take(self, weights: np.ndarray) -> np.ndarray:
        self.base = weights.reshape(-1)[: self.n].astype(np.float32).copy()
        return self.base.copy()
