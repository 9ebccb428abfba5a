"""What every backend shares: the public ParamStore API on top of a few backend primitives.

A backend supplies ``_read`` (rows of one committed version), ``_locked`` (the push lock),
``_write`` (one new version, lock held), ``_changes`` (latest rows changed after a version),
``_scan`` (every stored row, not necessarily of one version), ``_load`` (replace everything)
and ``version``. Validation, initial rows, deltas and snapshots live here once.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from paramserver.rows import (
    BadRows,
    Conflict,
    LogTrimmed,
    ParamServerError,
    Rows,
    TableConfig,
    TableMismatch,
    UnknownTable,
    check_ids,
    check_matrix,
    check_unique,
    encode_rows,
    initial_rows,
    latest_per_id,
)

SNAPSHOT_FORMAT = 1
# rows of one table in a version: ids and their encoded rows as a uint8 [n, row_bytes] matrix
Encoded = dict[str, tuple[np.ndarray, np.ndarray]]


@runtime_checkable
class ParamStore(Protocol):
    tables: dict[str, TableConfig]

    def pull(self, table: str, ids: np.ndarray) -> Rows: ...
    def pull_many(self, requests: dict[str, np.ndarray]) -> dict[str, Rows]: ...
    def push(self, updates: dict[str, Rows], unchanged_since: int | None = None) -> int: ...
    def push_delta(self, table: str, ids: np.ndarray, deltas: np.ndarray) -> int: ...
    def push_deltas(self, deltas: dict[str, tuple[np.ndarray, np.ndarray]]) -> int: ...
    def version(self) -> int: ...
    def changed_since(self, version: int) -> dict[str, np.ndarray]: ...
    def snapshot(self, path: str | os.PathLike) -> SnapshotInfo: ...
    def restore(self, path: str | os.PathLike) -> int: ...
    def read_all(self) -> dict[str, Rows]: ...
    def stage(self, name: str) -> ParamStore: ...
    def stages(self) -> list[str]: ...
    def drop_stage(self, name: str) -> bool: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    version: int
    kind: str  # "full" or "delta"
    rows: dict[str, int]


class BaseStore:
    tables: dict[str, TableConfig]

    # ------------------------------------------------------------------ backend primitives
    def _read(self, config: TableConfig, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Encoded rows (uint8 [n, row_bytes]) of the unique ``ids``, a found mask and the one version read."""
        raise NotImplementedError

    def _locked(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def _write(self, lock: Any, encoded: Encoded) -> int:
        raise NotImplementedError

    def _changes(self, since: int) -> tuple[int, Encoded]:
        raise NotImplementedError

    def _scan(self, config: TableConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError

    def _load(self, version: int, encoded: Encoded) -> None:
        raise NotImplementedError

    def version(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> BaseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ public API
    def table(self, name: str) -> TableConfig:
        try:
            return self.tables[name]
        except (KeyError, TypeError):
            raise UnknownTable(f"unknown table {name!r}; this store has {sorted(self.tables)}") from None

    def pull(self, table: str, ids: np.ndarray) -> Rows:
        """Rows of ``ids`` as of one committed version; never-seen ids get their initial row (not written)."""
        config = self.table(table)
        ids = check_ids(ids)
        if len(ids) == 0:
            return Rows(
                ids, np.zeros((0, config.dim), np.float32), np.zeros((0, config.state_dim), np.float32), self.version()
            )
        uniq, inverse = np.unique(ids, return_inverse=True)
        data, found, version = self._read(config, uniq)
        weights, state = self._decode_with_init(config, uniq, data, found)
        if len(uniq) == len(ids) and (uniq == ids).all():
            return Rows(ids, weights, state, version)
        return Rows(ids, weights[inverse], state[inverse], version)

    def pull_many(self, requests: dict[str, np.ndarray]) -> dict[str, Rows]:
        """Rows of several tables, all of the same committed version (a push to several tables is whole)."""
        out = {table: self.pull(table, ids) for table, ids in requests.items()}
        for attempt in range(40):
            top = max((rows.version for rows in out.values()), default=0)
            behind = [table for table, rows in out.items() if rows.version < top]
            if not behind:
                return out
            if attempt >= 6:  # the writer of ``top`` may be gone: finish its apply
                self._catch_up(top)
            else:
                time.sleep(0.001 * (2**attempt))
            out.update({table: self.pull(table, requests[table]) for table in behind})
        raise ParamServerError("could not read one consistent version across tables (writes too frequent)")

    def _catch_up(self, version: int) -> None:
        """Make every shard apply the committed versions up to ``version`` (backends with shards override)."""

    def push(self, updates: dict[str, Rows], unchanged_since: int | None = None) -> int:
        """Write the rows of every table in ``updates`` as ONE new version (all or nothing); returns it.

        With ``unchanged_since=v`` the push is conditional: if any of its ids was written by a
        version after ``v`` it raises ``Conflict`` and writes nothing (checked under the push
        lock, so no other push can slip in between); ``LogTrimmed`` when the log no longer
        reaches back to ``v``.
        """
        encoded = self._encode_updates(updates)
        with self._locked() as lock:
            if unchanged_since is not None:
                _, changed = self._changes(int(unchanged_since))
                clashes = {
                    name: int(len(np.intersect1d(changed[name][0], ids)))
                    for name, (ids, _) in encoded.items()
                    if name in changed
                }
                clashes = {name: n for name, n in clashes.items() if n}
                if clashes:
                    raise Conflict(f"rows changed since version {unchanged_since}: {clashes}; nothing written", clashes)
            return self._write(lock, encoded)

    def push_delta(self, table: str, ids: np.ndarray, deltas: np.ndarray) -> int:
        """Add ``deltas`` to the stored rows (initial rows where absent) as one new version; returns it.

        ``deltas`` is [n, dim] (vectors only) or [n, dim + state_dim] (vectors, then optimizer
        state). Repeated ids add up. Read-add-write runs under the push lock, so concurrent
        deltas from several trainers to the same row all count.
        """
        return self.push_deltas({table: (ids, deltas)})

    def push_deltas(self, deltas: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
        """``push_delta`` of several tables as ONE new version (all or nothing): an online trainer's flush."""
        summed: dict[str, tuple[TableConfig, np.ndarray, np.ndarray]] = {}
        for table, (ids, rows) in deltas.items():
            config = self.table(table)
            ids = check_ids(ids)
            deltas_arr = np.asarray(rows) if not isinstance(rows, np.ndarray) else rows
            width = deltas_arr.shape[1] if deltas_arr.ndim == 2 else -1
            if width not in (config.dim, config.dim + config.state_dim):
                raise BadRows(
                    f"deltas for {table}: expected shape ({len(ids)}, {config.dim}) or "
                    f"({len(ids)}, {config.dim + config.state_dim}), got {deltas_arr.shape}"
                )
            deltas_arr = check_matrix(deltas_arr, len(ids), width, f"deltas for {table}")
            uniq, inverse = np.unique(ids, return_inverse=True)
            total = np.zeros((len(uniq), width), dtype=np.float64)
            np.add.at(total, inverse, deltas_arr)
            summed[table] = (config, uniq, total)
        if not summed:
            raise BadRows("push_deltas: no tables given")
        with self._locked() as lock:
            encoded: Encoded = {}
            for table, (config, uniq, total) in summed.items():
                data, found, _ = self._read(config, uniq)
                weights, state = self._decode_with_init(config, uniq, data, found)
                new_w = (weights + total[:, : config.dim]).astype(np.float32)
                new_s = (state + total[:, config.dim :]).astype(np.float32) if total.shape[1] > config.dim else state
                check_matrix(new_w, len(uniq), config.dim, f"{table} after delta", config.storage_dtype == "float16")
                check_matrix(new_s, len(uniq), config.state_dim, f"{table} state after delta")
                rows = np.frombuffer(encode_rows(config, new_w, new_s), np.uint8).reshape(len(uniq), config.row_bytes)
                encoded[table] = (uniq, rows)
            return self._write(lock, encoded)

    def changes(self, since: int) -> tuple[int, Encoded]:
        """The latest encoded rows of every id written after version ``since``, and the version they reach.

        ``LogTrimmed`` when the log no longer reaches back to ``since``: how a replica follows its source.
        """
        return self._changes(int(since))

    def changed_since(self, version: int) -> dict[str, np.ndarray]:
        """Ids (unique, sorted) per table written by versions after ``version``."""
        _, encoded = self._changes(int(version))
        return {name: np.unique(ids) for name, (ids, _) in encoded.items() if len(ids)}

    # ------------------------------------------------------------------ staging
    def read_all(self) -> dict[str, Rows]:
        """Every stored row, per table (not necessarily of one version: for stages, which one writer fills)."""
        out: dict[str, Rows] = {}
        for name, config in self.tables.items():
            chunks = list(self._scan(config))
            if not chunks:
                continue
            ids, data = latest_per_id(np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]))
            weights, state = self._decode_with_init(config, ids, data, np.ones(len(ids), dtype=bool))
            out[name] = Rows(ids, weights, state, self.version())
        return out

    def stage(self, name: str) -> BaseStore:
        """The staging area ``name`` beside this store (created empty when new): same tables, own versions.

        Rows a training job produced wait there until its model is promoted
        (``paramserver.staging.promote_stage`` copies them in as one version) or refused
        (``drop_stage``); readers of this store never see them.
        """
        raise NotImplementedError

    def stages(self) -> list[str]:
        """The names of the staging areas beside this store."""
        raise NotImplementedError

    def drop_stage(self, name: str) -> bool:
        """Delete a staging area and its rows; False when there was none of that name."""
        raise NotImplementedError

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, path: str | os.PathLike) -> SnapshotInfo:
        """Write a checkpoint into directory ``path``: a full one the first time, then only changed rows.

        The directory holds a manifest and numbered parts; a delta part holds the latest rows
        of every id changed since the previous part. When the delta log no longer reaches back
        to the last part (retention), a new full part replaces the chain.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(folder)
        tables = {name: cfg.to_dict() for name, cfg in self.tables.items()}
        if manifest is not None and manifest.get("tables") == tables:
            try:
                version, encoded = self._changes(manifest["version"])
            except LogTrimmed:
                manifest = None
            else:
                if version == manifest["version"]:
                    return SnapshotInfo(folder, version, "delta", {})
                return self._write_part(folder, manifest, "delta", version, encoded)
        # fuzzy full scan, made exact by replaying the log written meanwhile (rows of a later
        # version seen by the scan are overwritten by their latest logged value)
        start = self.version()
        scanned: Encoded = {}
        for name, cfg in self.tables.items():
            chunks = list(self._scan(cfg))
            ids = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int64)
            data = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros((0, cfg.row_bytes), np.uint8)
            scanned[name] = (ids, data)
        version, changes = self._changes(start)
        for name, (ids, data) in changes.items():
            base_ids, base_data = scanned.get(name, (np.zeros(0, np.int64), np.zeros((0, data.shape[1]), np.uint8)))
            scanned[name] = latest_per_id(np.concatenate([base_ids, ids]), np.concatenate([base_data, data]))
        fresh = {"format": SNAPSHOT_FORMAT, "tables": tables, "version": 0, "parts": []}
        for old in folder.glob("part-*.npz"):
            old.unlink()
        return self._write_part(folder, fresh, "full", version, scanned)

    def _write_part(self, folder: Path, manifest: dict, kind: str, version: int, encoded: Encoded) -> SnapshotInfo:
        number = len(manifest["parts"]) + 1
        name = f"part-{number:06d}-{kind}-v{version}.npz"
        arrays: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for table, (ids, data) in encoded.items():
            arrays[f"ids__{table}"] = ids.astype(np.int64)
            arrays[f"rows__{table}"] = data
            counts[table] = len(ids)
        tmp = folder / f".{name}.tmp"
        with open(tmp, "wb") as handle:
            np.savez(handle, allow_pickle=False, **arrays)
        os.replace(tmp, folder / name)
        manifest = {
            **manifest,
            "version": version,
            "parts": [
                *manifest["parts"],
                {"file": name, "kind": kind, "from": manifest["version"], "to": version, "rows": counts},
            ],
        }
        _write_json_atomic(folder / "manifest.json", manifest)
        return SnapshotInfo(folder, version, kind, counts)

    def restore(self, path: str | os.PathLike) -> int:
        """Replace the store's contents with the checkpoint in ``path``; the store takes its version."""
        folder = Path(path)
        manifest = read_manifest(folder)
        if manifest is None:
            raise TableMismatch(f"{folder}: no snapshot manifest found")
        for name, cfg in manifest["tables"].items():
            mine = self.tables.get(name)
            if mine is None:
                raise UnknownTable(f"snapshot table {name!r} is not a table of this store ({sorted(self.tables)})")
            layout = ("dim", "state_dim", "storage_dtype")
            if any(cfg[k] != getattr(mine, k) for k in layout):
                raise TableMismatch(
                    f"snapshot table {name}: {[cfg[k] for k in layout]} differs from the store's "
                    f"{[getattr(mine, k) for k in layout]}"
                )
        merged: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for part in manifest["parts"]:
            with np.load(folder / part["file"]) as archive:
                for key in archive.files:
                    if key.startswith("ids__"):
                        table = key[5:]
                        merged.setdefault(table, []).append((archive[key], archive[f"rows__{table}"]))
        encoded: Encoded = {}
        for table, chunks in merged.items():
            ids = np.concatenate([c[0] for c in chunks])
            data = np.concatenate([c[1] for c in chunks])
            if data.ndim != 2 or data.shape[1] != self.tables[table].row_bytes:
                raise TableMismatch(
                    f"snapshot rows of {table} have {data.shape[-1]} bytes, expected {self.tables[table].row_bytes}"
                )
            encoded[table] = latest_per_id(ids, data)
        self._load(int(manifest["version"]), encoded)
        return int(manifest["version"])

    # ------------------------------------------------------------------ helpers
    def _encode_updates(self, updates: dict[str, Rows]) -> Encoded:
        if not isinstance(updates, dict):
            raise BadRows(f"push expects a dict of table -> Rows, got {type(updates).__name__}")
        encoded: Encoded = {}
        for name, rows in updates.items():
            config = self.table(name)
            if not isinstance(rows, Rows):
                raise BadRows(f"push: rows for {name} must be paramserver.Rows, got {type(rows).__name__}")
            ids = check_ids(rows.ids, f"ids for {name}")
            check_unique(ids, f"ids for {name}")
            weights = check_matrix(
                rows.weights, len(ids), config.dim, f"weights for {name}", config.storage_dtype == "float16"
            )
            state = check_matrix(rows.state, len(ids), config.state_dim, f"state for {name}")
            data = np.frombuffer(encode_rows(config, weights, state), np.uint8).reshape(len(ids), config.row_bytes)
            encoded[name] = (ids, data)
        return encoded

    @staticmethod
    def _decode_with_init(
        config: TableConfig, ids: np.ndarray, data: np.ndarray, found: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        packed = np.ascontiguousarray(data).view(config.row_dtype).reshape(len(ids))
        if found.all():
            return packed["w"].astype(np.float32), np.array(packed["s"], dtype=np.float32)
        weights, state = initial_rows(config, ids)
        if found.any():
            weights[found] = packed["w"][found]
            state[found] = packed["s"][found]
        return weights, state


def read_manifest(folder: Path) -> dict | None:
    """The manifest of the snapshot in ``folder``, or None when it holds none."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise TableMismatch(f"{folder}/manifest.json is not valid JSON: {exc}") from None
    if manifest.get("format") != SNAPSHOT_FORMAT:
        raise TableMismatch(f"{folder}: unsupported snapshot format {manifest.get('format')!r}")
    return manifest


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest.")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)
