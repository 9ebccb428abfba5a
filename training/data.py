"""The sample reader: a window of ``recsys.samples`` turned into de-duplicated columns and batches.

A window is the offsets from the last successful job's end offsets up to the end offsets
at job start (``read_window``). Records that break the contract or the feature spec are
counted by reason and skipped, never fatal; duplicates (same sample id, e.g. after a
producer retry) are kept once. The newest ``eval_fraction`` of the samples by event time,
leaving out those whose non-click may not have been emitted yet (``split_by_time``),
becomes the evaluation set. Ids are mapped per table to local indices [0, n) of the job's
working set, the row order of the job's embedding tables.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from pydantic import ValidationError

from feature_repo.contract import Sample
from feature_repo.spec import SPEC, FeatureSpec, validate_encoded
from training.model import POSITION_FEATURE, position_value

if TYPE_CHECKING:
    import torch
    from torchrec import KeyedJaggedTensor

    from core.kafka import Brokers


@dataclass
class ReadStats:
    records: int = 0
    samples: int = 0
    duplicates: int = 0
    rejected: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few rejection messages

    def reject(self, reason: str, message: str) -> None:
        self.rejected[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{reason}: {message[:300]}")

    def to_dict(self) -> dict:
        return {
            "records": self.records,
            "samples": self.samples,
            "duplicates": self.duplicates,
            "rejected": dict(self.rejected),
            "examples": list(self.examples),
        }


@dataclass
class Columns:
    """Samples as columns, in event-time order."""

    sample_ids: list[str]
    labels: np.ndarray  # float32 [N]
    event_time: np.ndarray  # float64 [N]
    dense: np.ndarray  # float32 [N, n_dense]
    lengths: dict[str, np.ndarray]  # feature -> int64 [N]
    values: dict[str, np.ndarray]  # feature -> int64 [sum(lengths)], raw (hashed) ids
    offsets: dict[str, np.ndarray] = field(default_factory=dict)  # feature -> int64 [N + 1]
    # float32 [N]: the logging policy's propensity of each impression, NaN where it logged none; None: all unknown
    propensity: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name, lengths in self.lengths.items():
            self.offsets[name] = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, feature: str, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lengths and concatenated raw ids of ``feature`` for the samples at ``index``."""
        return gather_jagged(self.lengths[feature], self.offsets[feature], self.values[feature], index)


def gather_jagged(
    lengths: np.ndarray, offsets: np.ndarray, values: np.ndarray, index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lengths and concatenated values of the jagged rows at ``index``."""
    picked = lengths[index]
    if len(values) == len(lengths):  # every row has exactly one value: plain indexing
        return picked, values[index]
    starts = offsets[index]
    # position of every wanted value: each row's start plus 0..len-1
    within = np.arange(int(picked.sum()), dtype=np.int64) - np.repeat(np.cumsum(picked) - picked, picked)
    return picked, values[np.repeat(starts, picked) + within]


def parse_samples(
    raw_values: Iterable[bytes | None], spec: FeatureSpec = SPEC, stats: ReadStats | None = None
) -> tuple[list[Sample], ReadStats]:
    """Valid, de-duplicated samples of the raw records (first occurrence wins) and the reading stats."""
    stats = stats or ReadStats()
    seen: set[str] = set()
    samples: list[Sample] = []
    # hundreds of thousands of small objects and no cycles: the cyclic GC would only rescan them
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        _parse_into(raw_values, spec, stats, seen, samples)
    finally:
        if was_enabled:
            gc.enable()
    stats.samples = len(samples)
    return samples, stats


def _parse_into(
    raw_values: Iterable[bytes | None], spec: FeatureSpec, stats: ReadStats, seen: set[str], samples: list[Sample]
) -> None:
    for raw in raw_values:
        stats.records += 1
        if raw is None:
            stats.reject("empty", "record without a value")
            continue
        try:
            sample = Sample.from_json(raw)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "(root)"
            stats.reject("bad_sample", f"{where}: {first['msg']}")
            continue
        try:
            validate_encoded(sample.sparse, sample.dense)
        except ValueError as exc:
            stats.reject("spec_mismatch", str(exc))
            continue
        if sample.sample_id in seen:
            stats.duplicates += 1
            continue
        seen.add(sample.sample_id)
        samples.append(sample)


def to_columns(samples: Sequence[Sample], spec: FeatureSpec = SPEC) -> Columns:
    """Columns of the samples, sorted by event time (stable: ties keep their reading order)."""
    order = sorted(range(len(samples)), key=lambda i: samples[i].event_time)
    ordered = [samples[i] for i in order]
    dense_names = spec.dense_names
    dense = np.zeros((len(ordered), len(dense_names) + 1), dtype=np.float32)
    for row, sample in enumerate(ordered):
        for col, name in enumerate(dense_names):
            dense[row, col] = sample.dense[name]
        dense[row, -1] = position_value(sample.position)
    lengths: dict[str, np.ndarray] = {}
    values: dict[str, np.ndarray] = {}
    for name in spec.sparse_names:
        per_sample = [s.sparse[name] for s in ordered]
        lengths[name] = np.fromiter((len(v) for v in per_sample), dtype=np.int64, count=len(per_sample))
        values[name] = np.fromiter((i for v in per_sample for i in v), dtype=np.int64, count=int(lengths[name].sum()))
    return Columns(
        sample_ids=[s.sample_id for s in ordered],
        labels=np.fromiter((s.label for s in ordered), dtype=np.float32, count=len(ordered)),
        event_time=np.fromiter((s.event_time for s in ordered), dtype=np.float64, count=len(ordered)),
        dense=dense,
        lengths=lengths,
        values=values,
        propensity=np.fromiter(
            (np.nan if s.propensity is None else s.propensity for s in ordered), dtype=np.float32, count=len(ordered)
        ),
    )


def ips_weights(columns: Columns, max_weight: float) -> np.ndarray:
    """Per sample, the clipped inverse-propensity weight min(1 / propensity, max_weight); 1 where none was logged.

    Clipping trades a little bias back for bounded variance: an explored item at a position the
    greedy list would not have put it has propensity share / n, i.e. a weight of n / share unclipped.
    """
    if columns.propensity is None:
        return np.ones(len(columns), dtype=np.float32)
    with np.errstate(divide="ignore"):
        inverse = 1.0 / columns.propensity.astype(np.float64)
    return np.where(np.isnan(inverse), 1.0, np.minimum(inverse, max_weight)).astype(np.float32)


def dense_feature_names(spec: FeatureSpec = SPEC) -> list[str]:
    return [*spec.dense_names, POSITION_FEATURE]


@dataclass
class Split:
    train: np.ndarray  # row indices into Columns
    eval: np.ndarray


def split_by_time(labels: np.ndarray, eval_fraction: float) -> Split:
    """Hold out the newest *settled* ``eval_fraction`` of time-ordered samples (at least one when n >= 2).

    A window cut while traffic flows ends unbalanced: the stream emits a positive at the click
    but a negative only when the impression's attribution window closes, so the window's newest
    impressions are there with their clicks and without their non-clicks (those land in the next
    window); held out as they are, they make an evaluation set of clicks only. The newest
    negative marks how far the stream had closed impressions when the window was cut: every
    impression up to its event time is settled (its label, whichever, is in the window). So
    evaluation is the newest ``eval_fraction`` (of all n samples) of the samples up to the newest
    negative; the unsettled tail after it is trained on with the rest. A window that drained
    before it was cut ends with a negative and splits as the plain newest fraction.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    labels = np.asarray(labels)
    n = len(labels)
    negatives = np.flatnonzero(labels == 0)
    settled = int(negatives[-1]) + 1 if len(negatives) else 0
    n_eval = 0 if settled < 2 else min(settled - 1, max(1, int(round(n * eval_fraction))))
    eval_rows = np.arange(settled - n_eval, settled, dtype=np.int64)
    train_rows = np.concatenate((np.arange(0, settled - n_eval), np.arange(settled, n))).astype(np.int64)
    return Split(train_rows, eval_rows)


@dataclass
class WorkingSet:
    """Per table: the sorted unique raw ids of the window (row i of the job's table holds ids[i])."""

    ids: dict[str, np.ndarray]
    trained: dict[str, np.ndarray]  # per table: bool mask over ids, True where a training sample uses the id
    local: dict[str, np.ndarray]  # per table: local index of every value of Columns.values

    @property
    def rows(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self.ids.items()}


def working_set(columns: Columns, train_rows: np.ndarray) -> WorkingSet:
    ids, trained, local = {}, {}, {}
    for name, values in columns.values.items():
        uniq, inverse = np.unique(values, return_inverse=True)
        ids[name] = uniq
        local[name] = inverse.astype(np.int64)
        mask = np.zeros(len(uniq), dtype=bool)
        if len(train_rows):
            _, train_values = columns.gather(name, train_rows)
            mask[np.searchsorted(uniq, np.unique(train_values))] = True
        trained[name] = mask
    return WorkingSet(ids, trained, local)


@dataclass
class Batch:
    dense: torch.Tensor  # [B, n_dense]
    sparse: KeyedJaggedTensor  # local indices
    labels: torch.Tensor  # [B]
    size: int
    weights: torch.Tensor | None = None  # [B] per-sample loss weights (inverse propensities), None: unweighted


def make_batch(
    columns: Columns,
    local_values: Mapping[str, np.ndarray],
    index: np.ndarray,
    features: Sequence[str],
    weights: np.ndarray | None = None,
) -> Batch:
    """One batch of the samples at ``index`` with ids replaced by their local indices (``weights``: per row of
    ``columns``)."""
    import torch
    from torchrec import KeyedJaggedTensor

    all_lengths, all_values = [], []
    for name in features:
        lengths, values = gather_jagged(columns.lengths[name], columns.offsets[name], local_values[name], index)
        all_lengths.append(lengths)
        all_values.append(values)
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=list(features),
        values=torch.from_numpy(np.concatenate(all_values)),
        lengths=torch.from_numpy(np.concatenate(all_lengths).astype(np.int32)),
    )
    return Batch(
        torch.from_numpy(columns.dense[index]),
        sparse,
        torch.from_numpy(columns.labels[index]),
        len(index),
        None if weights is None else torch.from_numpy(weights[index]),
    )


def batches(
    columns: Columns,
    local_values: Mapping[str, np.ndarray],
    rows: np.ndarray,
    batch_size: int,
    features: Sequence[str],
    weights: np.ndarray | None = None,
) -> Iterator[Batch]:
    for start in range(0, len(rows), batch_size):
        yield make_batch(columns, local_values, rows[start : start + batch_size], features, weights)


def partition(rows: np.ndarray, world: int, rank: int) -> np.ndarray:
    """This rank's contiguous share of ``rows``; every rank gets the same count (a remainder < world is dropped)."""
    per_rank = len(rows) // world
    return rows[rank * per_rank : (rank + 1) * per_rank]


# --------------------------------------------------------------------------- Kafka


async def _read_values(
    bootstrap: Brokers, topic: str, start: Mapping[int, int], stop: Mapping[int, int]
) -> list[bytes | None]:
    from core.kafka import read_topic

    return [record.value async for record in read_topic(bootstrap, topic, dict(start), dict(stop))]


def read_window(
    bootstrap: Brokers, topic: str, start: Mapping[int, int], stop: Mapping[int, int], spec: FeatureSpec = SPEC
) -> tuple[list[Sample], ReadStats]:
    """Valid, de-duplicated samples of ``topic`` between ``start`` (inclusive) and ``stop`` (exclusive) offsets."""
    raw = asyncio.run(_read_values(bootstrap, topic, start, stop))
    return parse_samples(raw, spec)


def window_size(start: Mapping[int, int], stop: Mapping[int, int]) -> int:
    """Records between the offsets (partitions missing from ``start`` start at 0)."""
    return sum(max(0, end - start.get(p, 0)) for p, end in stop.items())
