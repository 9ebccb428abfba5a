"""Served state gated as one unit: a job's rows wait in a staging area until its model is promoted.

The store's own rows (and so its inference replicas, which follow it version by version) are
the served state: the champion's rows. A training job pushes what it trained into a staging
area beside the store (``store.stage(name)``), where no reader of the store sees it. When the
gate promotes the job's model, ``promote_stage`` copies the staged rows into the store as ONE
version (a conditional push: it fails with ``Conflict`` if any of those rows changed since the
job pulled them) after saving the rows it is about to replace into another staging area, the
*undo* area. A refused job's area is dropped: nothing it trained was ever visible. Rolling
back is promoting the undo area of the last promotion (which saves its own undo in turn).

Costs, by construction: a staged row takes the same bytes as a stored one while it waits; a
promotion reads the replaced rows once and writes the staged rows once; readers of the store
(serving, replicas) pay nothing. ``bench paramserver --staging`` measures them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paramserver.base import ParamStore
from paramserver.rows import Conflict, ParamServerError, Rows


class NothingStaged(ParamServerError):
    """The staging area to promote does not exist or holds no rows."""


@dataclass(frozen=True)
class Promotion:
    version: int  # the store's version holding the promoted rows
    rows: dict[str, int]  # rows promoted per table
    undo: str  # the staging area holding the rows they replaced
    replayed: bool = False  # the rows were in the store already (a retried promotion)


def promote_stage(store: ParamStore, name: str, *, undo: str, unchanged_since: int | None = None) -> Promotion:
    """Copy the rows staged as ``name`` into ``store`` as one version; the replaced rows go to ``undo``.

    ``unchanged_since``: the version the job pulled its rows at; ``Conflict`` (nothing written)
    when another writer changed any of them since. The undo area is written before the store
    changes, so a crash at any point leaves either the old served state with the stage intact,
    or the new one with its undo. A retry after the copy (the stage still there) finds the
    store already holding the staged rows and reports the promotion as ``replayed``.
    """
    if name not in store.stages():
        raise NothingStaged(f"no staging area {name!r} (stages: {store.stages()})")
    staged = store.stage(name).read_all()
    if not staged:
        raise NothingStaged(f"staging area {name!r} holds no rows")
    counts = {table: len(rows.ids) for table, rows in staged.items()}
    before = store.pull_many({table: rows.ids for table, rows in staged.items()})
    if _holds(before, staged) and undo in store.stages():
        store.drop_stage(name)
        return Promotion(store.version(), counts, undo, replayed=True)
    read_at = next(iter(before.values())).version
    store.drop_stage(undo)
    store.stage(undo).push({table: Rows(rows.ids, rows.weights, rows.state) for table, rows in before.items()})
    since = read_at if unchanged_since is None else min(read_at, int(unchanged_since))
    try:
        version = store.push(staged, unchanged_since=since)
    except Conflict:
        store.drop_stage(undo)
        raise
    store.drop_stage(name)
    return Promotion(version, counts, undo)


def _holds(current: dict[str, Rows], staged: dict[str, Rows]) -> bool:
    return all(
        np.array_equal(current[t].weights, rows.weights) and np.array_equal(current[t].state, rows.state)
        for t, rows in staged.items()
    )


class StagedView:
    """Reads of a store as they will be once the stage ``name`` is promoted (staged rows over stored ones).

    How a challenger is evaluated before its rows are served; serving never reads through it.
    """

    def __init__(self, store: ParamStore, name: str) -> None:
        if name not in store.stages():
            raise NothingStaged(f"no staging area {name!r} (stages: {store.stages()})")
        self.store, self.staged = store, store.stage(name).read_all()
        self._index = {
            table: {int(i): k for k, i in enumerate(rows.ids.tolist())} for table, rows in self.staged.items()
        }

    def pull(self, table: str, ids: np.ndarray) -> Rows:
        rows = self.store.pull(table, ids)
        index = self._index.get(table)
        if not index:
            return rows
        positions = np.array([index.get(int(i), -1) for i in rows.ids.tolist()], dtype=np.int64)
        hit = positions >= 0
        if hit.any():
            staged = self.staged[table]
            rows.weights[hit] = staged.weights[positions[hit]]
            rows.state[hit] = staged.state[positions[hit]]
        return rows
