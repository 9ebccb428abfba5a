"""Labelled samples straight from the ratings with the feature spec's encodings (no Kafka).

The AutoInt protocol: rating > 3 positive, < 3 negative, 3 dropped; for the quality
benchmark. ``feature_arrays`` gives the same values as columns, for a million ratings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feature_repo.contract import SCHEMA_VERSION, Sample, sample_id
from feature_repo.spec import SPEC, encode_item, encode_user, join_features
from traffic.movielens.dataset import MovieLens


def samples(data: MovieLens, drop_neutral: bool = True) -> list[Sample]:
    """Labelled samples of the ratings with the spec's encodings, in time order.

    With ``drop_neutral`` (the AutoInt protocol) ratings of 3 are left out; otherwise they
    are negatives, exactly as the replay labels them (no click). Event time is the rating's.
    """
    users, items = data.encoded()
    out: list[Sample] = []
    for index in range(len(data)):
        rating = float(data.rating[index])
        if drop_neutral and rating == 3:
            continue
        user_id, item_id = data.rating_user[index], data.rating_item[index]
        sparse, dense = join_features(users.get(user_id), items.get(item_id), user_id, item_id)
        request_id = data.request_id(index)
        # trusted, spec-encoded values: skip re-validation, which would triple the time on 1M ratings
        out.append(
            Sample.model_construct(
                schema_version=SCHEMA_VERSION,
                sample_id=sample_id(request_id, item_id),
                request_id=request_id,
                user_id=user_id,
                item_id=item_id,
                label=1 if rating > 3 else 0,
                event_time=float(data.timestamp[index]),
                position=0,
                model_version=None,
                sparse=sparse,
                dense=dense,
            )
        )
    return out


@dataclass
class FeatureArrays:
    """Samples of the ratings as columns (for benchmarks that would not build a million objects).

    The same values ``samples`` gives, in the same (time) order: ``values[f]`` holds the
    concatenated ids of sparse feature ``f``, ``lengths[f]`` how many belong to each sample.
    """

    request_ids: list[str]
    user_ids: list[str]
    item_ids: list[str]
    labels: np.ndarray  # int8 [N]
    event_time: np.ndarray  # float64 [N]
    dense: np.ndarray  # float32 [N, len(SPEC.dense)], spec order
    lengths: dict[str, np.ndarray]  # int64 [N]
    values: dict[str, np.ndarray]  # int64 [sum(lengths)]

    def __len__(self) -> int:
        return len(self.labels)

    def sample_ids(self) -> list[str]:
        return [sample_id(r, i) for r, i in zip(self.request_ids, self.item_ids)]


def feature_arrays(data: MovieLens, drop_neutral: bool = True) -> FeatureArrays:
    """Columns equal to ``samples(data, drop_neutral)``, built by indexing per-entity encodings."""
    keep = np.flatnonzero(data.rating != 3) if drop_neutral else np.arange(len(data))
    user_ids = [data.rating_user[i] for i in keep]
    item_ids = [data.rating_item[i] for i in keep]
    user_index = {u: n for n, u in enumerate(dict.fromkeys(user_ids))}
    item_index = {i: n for n, i in enumerate(dict.fromkeys(item_ids))}
    users = [encode_user(u, data.users[u].__dict__ if u in data.users else None) for u in user_index]
    items = [
        encode_item(i, {"genres": list(data.items[i].genres), "year": data.items[i].year} if i in data.items else None)
        for i in item_index
    ]
    u_rows = np.fromiter((user_index[u] for u in user_ids), dtype=np.int64, count=len(keep))
    i_rows = np.fromiter((item_index[i] for i in item_ids), dtype=np.int64, count=len(keep))
    lengths: dict[str, np.ndarray] = {}
    values: dict[str, np.ndarray] = {}
    for sparse_feature in SPEC.sparse:
        entities, rows = (users, u_rows) if sparse_feature.entity == "user" else (items, i_rows)
        per_len = np.array([len(e.sparse[sparse_feature.name]) for e in entities], dtype=np.int64)
        flat = np.array([v for e in entities for v in e.sparse[sparse_feature.name]], dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(per_len)[:-1]))
        picked = per_len[rows]
        within = np.arange(int(picked.sum()), dtype=np.int64) - np.repeat(np.cumsum(picked) - picked, picked)
        lengths[sparse_feature.name] = picked
        values[sparse_feature.name] = flat[np.repeat(starts[rows], picked) + within]
    dense = np.zeros((len(keep), len(SPEC.dense)), dtype=np.float32)
    for col, dense_feature in enumerate(SPEC.dense):
        entities, rows = (users, u_rows) if dense_feature.entity == "user" else (items, i_rows)
        dense[:, col] = np.array([e.dense[dense_feature.name] for e in entities], dtype=np.float32)[rows]
    return FeatureArrays(
        [data.request_id(int(i)) for i in keep],
        user_ids,
        item_ids,
        (data.rating[keep] > 3).astype(np.int8),
        data.timestamp[keep].copy(),
        dense,
        lengths,
        values,
    )
