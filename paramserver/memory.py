"""The in-process backend: same semantics as the Redis one, for unit tests and single-process runs."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np

from paramserver.base import BaseStore, Encoded
from paramserver.rows import LogTrimmed, TableConfig, TableMismatch, check_stage_name


class MemoryStore(BaseStore):
    def __init__(self, tables: list[TableConfig]) -> None:
        self.tables = {}
        for cfg in tables:
            if cfg.name in self.tables and self.tables[cfg.name] != cfg:
                raise TableMismatch(f"table {cfg.name} given twice with different configs")
            self.tables[cfg.name] = cfg
        self._rows: dict[str, dict[int, bytes]] = {name: {} for name in self.tables}
        self._changed_at: dict[str, dict[int, int]] = {name: {} for name in self.tables}
        self._version = 0
        self._floor = 0  # changes before this version are unknown (a restore replaced the contents)
        self._data_lock = threading.Lock()  # readers see one version: writes swap under it
        self._push_lock = threading.Lock()  # serializes pushes (and read-modify-write deltas)
        self._stages: dict[str, MemoryStore] = {}

    def stage(self, name: str) -> MemoryStore:
        name = check_stage_name(name)
        with self._push_lock:
            if name not in self._stages:
                self._stages[name] = MemoryStore(list(self.tables.values()))
            return self._stages[name]

    def stages(self) -> list[str]:
        return sorted(self._stages)

    def drop_stage(self, name: str) -> bool:
        with self._push_lock:
            return self._stages.pop(check_stage_name(name), None) is not None

    def version(self) -> int:
        return self._version

    def _read(self, config: TableConfig, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        with self._data_lock:
            rows = self._rows[config.name]
            raw = [rows.get(i) for i in ids.tolist()]
            version = self._version
        found = np.fromiter((r is not None for r in raw), dtype=bool, count=len(raw))
        empty = bytes(config.row_bytes)
        data = np.frombuffer(b"".join(empty if r is None else r for r in raw), np.uint8)
        return data.reshape(len(ids), config.row_bytes), found, version

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._push_lock:
            yield None

    def _write(self, lock: None, encoded: Encoded) -> int:
        prepared = {name: dict(zip(ids.tolist(), (bytes(r) for r in data))) for name, (ids, data) in encoded.items()}
        with self._data_lock:
            version = self._version + 1
            for name, rows in prepared.items():
                self._rows[name].update(rows)
                stamp = self._changed_at[name]
                for i in rows:
                    stamp[i] = version
            self._version = version
        return version

    def _changes(self, since: int) -> tuple[int, Encoded]:
        with self._data_lock:
            if since < self._floor:
                raise LogTrimmed(
                    f"changes since version {since} are unknown: the store was restored at version {self._floor}"
                )
            out: Encoded = {}
            for name, stamps in self._changed_at.items():
                ids = [i for i, v in stamps.items() if v > since]
                if ids:
                    rows = self._rows[name]
                    data = np.frombuffer(b"".join(rows[i] for i in ids), np.uint8).reshape(len(ids), -1)
                    out[name] = (np.array(ids, dtype=np.int64), data)
            return self._version, out

    def _scan(self, config: TableConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with self._data_lock:
            items = list(self._rows[config.name].items())
        if items:
            ids = np.array([i for i, _ in items], dtype=np.int64)
            yield ids, np.frombuffer(b"".join(r for _, r in items), np.uint8).reshape(len(items), config.row_bytes)

    def _load(self, version: int, encoded: Encoded) -> None:
        with self._push_lock, self._data_lock:
            self._rows = {name: {} for name in self.tables}
            self._changed_at = {name: {} for name in self.tables}
            for name, (ids, data) in encoded.items():
                self._rows[name] = dict(zip(ids.tolist(), (bytes(r) for r in data)))
            self._version = version
            self._floor = version
