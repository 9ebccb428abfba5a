"""Tables, rows, errors and the pure row logic shared by every backend.

Nothing here talks to a server: validation of ids and rows, the binary row layout,
the deterministic initial row of a never-seen id, and the routing hash (id -> shard, bucket).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class ParamServerError(RuntimeError):
    """Base of every parameter-service error."""


class UnknownTable(ParamServerError, KeyError):
    """A table that the store was not opened with."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown table"


class BadRows(ParamServerError, ValueError):
    """Ids or rows that cannot be stored: wrong shape or dimension, NaN/Inf, ids outside int64, duplicates."""


class ShardUnavailable(ParamServerError, ConnectionError):
    """A shard or replica did not answer (down, refused, timed out)."""


class ReplicasBehind(ShardUnavailable):
    """No replica holds the version a reader needs: those that answered are older (e.g. restarted empty)."""


class LogTrimmed(ParamServerError):
    """The changes asked for are older than the retained delta log."""


class Conflict(ParamServerError):
    """A conditional push found rows written by someone else since the version it was based on."""

    def __init__(self, message: str, clashes: dict[str, int]) -> None:
        super().__init__(message)
        self.clashes = clashes  # table -> how many of the pushed ids changed meanwhile


class TableMismatch(ParamServerError):
    """The store already holds a table with another layout (dim, dtype, capacity, shard count)."""


@dataclass(frozen=True)
class TableConfig:
    name: str
    dim: int
    state_dim: int = 1
    storage_dtype: str = "float32"
    init_std: float = 0.01
    seed: int = 0
    # expected number of rows; sizes the hash buckets (rows per bucket ~ settings.ps.rows_per_bucket)
    capacity: int = 1_000_000

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_.-" for c in self.name) or len(self.name) > 64:
            raise ValueError(f"table name must be 1-64 chars of [A-Za-z0-9_.-], got {self.name!r}")
        if not isinstance(self.dim, int) or not 1 <= self.dim <= 65536:
            raise ValueError(f"table {self.name}: dim must be an int in 1..65536, got {self.dim!r}")
        if not isinstance(self.state_dim, int) or not 0 <= self.state_dim <= 65536:
            raise ValueError(f"table {self.name}: state_dim must be an int in 0..65536, got {self.state_dim!r}")
        if self.storage_dtype not in ("float32", "float16"):
            raise ValueError(f"table {self.name}: storage_dtype must be float32 or float16, got {self.storage_dtype!r}")
        if not np.isfinite(self.init_std) or self.init_std < 0:
            raise ValueError(f"table {self.name}: init_std must be finite and >= 0, got {self.init_std!r}")
        if not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"table {self.name}: capacity must be a positive int, got {self.capacity!r}")

    @property
    def row_dtype(self) -> np.dtype:
        """Binary layout of one stored row: vector in the storage dtype, then fp32 optimizer state."""
        wd = "<f2" if self.storage_dtype == "float16" else "<f4"
        return np.dtype([("w", wd, (self.dim,)), ("s", "<f4", (self.state_dim,))])

    @property
    def row_bytes(self) -> int:
        return self.row_dtype.itemsize

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "state_dim": self.state_dim,
            "storage_dtype": self.storage_dtype,
            "init_std": self.init_std,
            "seed": self.seed,
            "capacity": self.capacity,
        }


@dataclass
class Rows:
    ids: np.ndarray  # int64 [n]
    weights: np.ndarray  # float32 [n, dim]
    state: np.ndarray  # float32 [n, state_dim]
    # the committed version these rows were read at (-1 when not read from a store)
    version: int = field(default=-1)

    def __len__(self) -> int:
        return len(self.ids)


# --------------------------------------------------------------------------- validation

_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,119}")


def check_stage_name(name: object) -> str:
    """A staging area's name: 1-120 letters, digits, ``_ . -``, starting with a letter or digit."""
    if not isinstance(name, str) or not _STAGE_NAME.fullmatch(name):
        raise BadRows(f"stage name must be 1-120 characters of [A-Za-z0-9_.-] starting alphanumeric, got {name!r}")
    return name


def check_ids(ids: object, what: str = "ids") -> np.ndarray:
    """``ids`` as a 1-D int64 array, or BadRows saying why not."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        arr = ids
    else:
        try:
            arr = np.asarray(ids)
        except (ValueError, TypeError, OverflowError) as exc:
            raise BadRows(f"{what}: not an array of integers ({exc})") from None
        if arr.dtype == object:
            flat = arr.ravel().tolist()
            for value in flat:
                if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                    raise BadRows(f"{what}: not an integer: {value!r}")
                if not INT64_MIN <= int(value) <= INT64_MAX:
                    raise BadRows(f"{what}: id {value} is outside int64")
            arr = np.array(flat, dtype=np.int64).reshape(arr.shape)
    if arr.ndim != 1:
        raise BadRows(f"{what}: expected a 1-D array, got shape {arr.shape}")
    if arr.dtype.kind == "u":
        if arr.size and arr.max() > INT64_MAX:
            raise BadRows(f"{what}: id {int(arr.max())} is outside int64")
        return arr.astype(np.int64)
    if arr.dtype.kind != "i":
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        raise BadRows(f"{what}: ids must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def check_matrix(values: object, n: int, width: int, what: str, fp16: bool = False) -> np.ndarray:
    """``values`` as a finite float32 [n, width] array, or BadRows saying why not."""
    try:
        arr = (
            values
            if isinstance(values, np.ndarray) and values.dtype == np.float32
            else np.asarray(values, dtype=np.float32)
        )
    except (ValueError, TypeError) as exc:
        raise BadRows(f"{what}: not a numeric array ({exc})") from None
    if arr.ndim == 1 and width == 0 and arr.size == 0:
        arr = arr.reshape(n, 0)
    if arr.shape != (n, width):
        raise BadRows(f"{what}: expected shape ({n}, {width}), got {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise BadRows(f"{what}: row {bad} holds NaN or Inf")
    if fp16 and arr.size and float(np.abs(arr).max()) > 65504.0:
        raise BadRows(f"{what}: values beyond ±65504 overflow the float16 storage")
    return arr


def check_unique(ids: np.ndarray, what: str) -> None:
    if len(ids) > 1 and len(np.unique(ids)) != len(ids):
        uniq, counts = np.unique(ids, return_counts=True)
        raise BadRows(f"{what}: id {int(uniq[counts > 1][0])} appears more than once in one push")


# --------------------------------------------------------------------------- hashing and init


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, vectorized; uint64 arithmetic wraps as intended."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _salt(*parts: object) -> np.uint64:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def route_hash(table: str, ids: np.ndarray) -> np.ndarray:
    """A uint64 hash of (table, id); low bits pick the shard, high bits the bucket."""
    return _splitmix64(ids.view(np.uint64) ^ _salt("route", table))


def initial_rows(config: TableConfig, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The deterministic first row of each id: normal(0, init_std) from (table, id, seed); state zero.

    Counter-based (a hash of table, seed, id and column), so any process computes the same
    row without coordination. Rounded through the storage dtype, so a pulled initial row is
    bit-identical to the row a push of it would store.
    """
    n, dim = len(ids), config.dim
    base = _splitmix64(ids.view(np.uint64) ^ _salt("init", config.name, config.seed))
    half = (dim + 1) // 2
    cols = np.arange(half, dtype=np.uint64) * np.uint64(2)
    with np.errstate(over="ignore"):
        a = _splitmix64(base[:, None] + cols[None, :] * np.uint64(0xD1B54A32D192ED03))
        b = _splitmix64(a ^ np.uint64(0xA0761D6478BD642F))
    # 53-bit uniforms in (0, 1]; Box-Muller gives two normals per pair
    u1 = ((a >> np.uint64(11)).astype(np.float64) + 1.0) / 9007199254740992.0
    u2 = (b >> np.uint64(11)).astype(np.float64) / 9007199254740992.0
    radius = np.sqrt(-2.0 * np.log(u1))
    normals = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)], axis=1)[:, :dim]
    weights = (normals * config.init_std).astype(np.float32)
    if config.storage_dtype == "float16":
        weights = weights.astype(np.float16).astype(np.float32)
    return weights.reshape(n, dim), np.zeros((n, config.state_dim), dtype=np.float32)


# --------------------------------------------------------------------------- binary rows


def encode_rows(config: TableConfig, weights: np.ndarray, state: np.ndarray) -> bytes:
    packed = np.empty(len(weights), dtype=config.row_dtype)
    packed["w"] = weights
    packed["s"] = state
    return packed.tobytes()


def decode_rows(config: TableConfig, data: bytes | memoryview) -> tuple[np.ndarray, np.ndarray]:
    packed = np.frombuffer(data, dtype=config.row_dtype)
    return packed["w"].astype(np.float32), np.ascontiguousarray(packed["s"], dtype=np.float32)


def latest_per_id(ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the last occurrence of each id (later entries overwrite earlier ones)."""
    if len(ids) == 0:
        return ids, rows
    rev = ids[::-1]
    _, first = np.unique(rev, return_index=True)
    keep = len(ids) - 1 - first
    keep.sort()
    return ids[keep], rows[keep]
