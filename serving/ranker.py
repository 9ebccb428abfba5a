"""The ranking path of one request: features, rows, scores, with a degraded answer when a dependency fails.

Synchronous on purpose: the feature store client and the parameter reader are blocking,
so the API runs this in its thread pool and keeps the event loop free for I/O.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter

import numpy as np

from feature_repo.contract import Policy
from feature_repo.spec import SPEC, EncodedEntity, encode_item, encode_user, join_features
from serving.exploration import choose
from serving.features import FeatureSource, FeaturesUnavailable
from serving.metrics import Metrics
from serving.model import ModelHandle, Scorer
from serving.params import RowFetcher, RowsStale, RowsUnavailable
from serving.retrieval import PopularityIndex
from training.pooling import mean_pool

_ENTITY_OF = {f.name: f.entity for f in SPEC.sparse}
_DENSE_NAMES = [(f.name, f.entity) for f in SPEC.dense]
# degraded reasons under which no model scored the candidates (a recommend keeps their given order)
UNSCORED = ("model", "parameter_service", "stale_rows")


@dataclass
class _Features:
    """The encoded user and item features a scoring used, by id."""

    users: dict[str, EncodedEntity]
    items: dict[str, EncodedEntity]

    def pair(self, user_id: str, item_id: str) -> tuple[dict[str, list[int]], dict[str, float]]:
        """Sparse ids and dense values of one pair, in spec order (what the impression logs)."""
        return join_features(self.users[user_id], self.items[item_id], user_id, item_id)


@dataclass
class Scored:
    """Scores of n pairs plus what was used to compute them (for responses and feature logging)."""

    scores: np.ndarray
    model_version: str
    features: _Features
    cold_users: set[str] = field(default_factory=set)
    degraded: list[str] = field(default_factory=list)


@dataclass
class Ranking:
    request_id: str
    user_id: str
    items: list[tuple[str, float]]
    model_version: str
    features: dict[str, tuple[dict[str, list[int]], dict[str, float]]]
    cold_start: bool
    degraded: list[str]
    retrieval: bool
    propensities: list[float]  # per shown item, under the epsilon-greedy logging policy
    policy: Policy


def _now() -> tuple[float, float]:
    """(wall, CPU time of this thread): where a stage begins."""
    return time.perf_counter(), time.thread_time()


class Ranker:
    def __init__(
        self,
        model: ModelHandle,
        rows: RowFetcher | None,
        features: FeatureSource | None,
        index: PopularityIndex | None,
        metrics: Metrics,
        retrieval_candidates: int,
        explore_share: float,
    ) -> None:
        self.model, self.rows, self.features, self.index = model, rows, features, index
        self.metrics = metrics
        self.retrieval_candidates = retrieval_candidates
        self.explore_share = explore_share

    def _stage(self, name: str, started: tuple[float, float]) -> tuple[float, float]:
        return self.metrics.stage(name, *started)

    def score_pairs(self, user_ids: Sequence[str], item_ids: Sequence[str]) -> Scored:
        """Scores of the pairs (user_ids[i], item_ids[i]) with the current model.

        Work is per distinct user and item (a recommend request has one user): ids are looked
        up and pooled once per entity, then gathered per pair.
        """
        t = _now()
        degraded: list[str] = []
        uniq_users = list(dict.fromkeys(user_ids))
        uniq_items = list(dict.fromkeys(item_ids))
        users: dict[str, EncodedEntity | None] = {}
        items: dict[str, EncodedEntity | None] = {}
        if self.features is None:
            degraded.append("feature_store")
        else:
            try:
                users, items = self.features.fetch(uniq_users, uniq_items)
            except FeaturesUnavailable:
                degraded.append("feature_store")
        t = self._stage("features", t)
        cold = {u for u in uniq_users if users.get(u) is None} if "feature_store" not in degraded else set()
        # a user or item without a profile still has its id feature; the rest take the "missing" encoding
        enc_users = [users.get(u) or encode_user(u) for u in uniq_users]
        enc_items = [items.get(i) or encode_item(i) for i in uniq_items]
        entities = {"user": enc_users, "item": enc_items}
        position = {"user": {u: k for k, u in enumerate(uniq_users)}, "item": {i: k for k, i in enumerate(uniq_items)}}
        # map() over C-level getters: these loops run per candidate, a Python generator per step cost more
        gather = {
            "user": np.fromiter(map(position["user"].__getitem__, user_ids), np.int64, count=len(user_ids)),
            "item": np.fromiter(map(position["item"].__getitem__, item_ids), np.int64, count=len(item_ids)),
        }
        n = len(user_ids)
        features = _Features(dict(zip(uniq_users, enc_users)), dict(zip(uniq_items, enc_items)))
        scorer: Scorer | None = self.model.current  # read once: a reload cannot change it under us
        if scorer is None:
            return Scored(np.zeros(n, np.float32), "none", features, cold, degraded + ["model"])
        if self.rows is None:
            return Scored(np.zeros(n, np.float32), scorer.version, features, cold, degraded + ["parameter_service"])
        needed = scorer.tables()
        ids: dict[str, np.ndarray] = {}
        lengths: dict[str, np.ndarray] = {}
        owner: dict[str, str] = {}
        sparse_of = {entity: [e.sparse for e in encoded] for entity, encoded in entities.items()}
        for table in needed:
            if table not in _ENTITY_OF:
                continue
            owner[table] = entity = _ENTITY_OF[table]
            per_entity = list(map(itemgetter(table), sparse_of[entity]))
            lengths[table] = np.fromiter(map(len, per_entity), np.int64, count=len(per_entity))
            ids[table] = np.fromiter(chain.from_iterable(per_entity), np.int64)
        try:
            vectors, version = self.rows.lookup(ids, needed, min_version=self.model.rows_needed)
        except RowsUnavailable as exc:
            self._stage("rows", t)
            # no rows of the served state: no model scores rather than scores of rows it was not trained with
            reason = "stale_rows" if isinstance(exc, RowsStale) else "parameter_service"
            return Scored(np.zeros(n, np.float32), scorer.version, features, cold, degraded + [reason])
        t = self._stage("rows", t)
        pooled: dict[str, np.ndarray] = {}
        for table, vecs in vectors.items():
            if n == 0 or not len(lengths[table]):
                pooled[table] = np.zeros((n, vecs.shape[1] if vecs.ndim == 2 else 0), np.float32)
                continue
            bags = lengths[table]
            # one id per bag (every table but the multi-valued ones): its mean is the row itself, bit for bit
            single = len(vecs) == len(bags) and vecs.dtype == np.float32 and bool((bags == 1).all())
            pooled[table] = (vecs if single else mean_pool(vecs, bags))[gather[owner[table]]]  # as the trainer pools
        dense = np.zeros((n, len(_DENSE_NAMES)), np.float32)
        dense_of = {entity: [e.dense for e in encoded] for entity, encoded in entities.items()}
        for column, (name, entity) in enumerate(_DENSE_NAMES):
            values = np.fromiter(map(itemgetter(name), dense_of[entity]), np.float32, count=len(dense_of[entity]))
            if len(values):
                dense[:, column] = values[gather[entity]]
        scores = np.asarray(scorer.score(pooled, dense), np.float32).reshape(n)
        scores = np.nan_to_num(scores, nan=0.0, posinf=1.0, neginf=0.0)
        self._stage("score", t)
        return Scored(scores, f"{scorer.version}@ps{version}", features, cold, degraded)

    def recommend(self, user_id: str, k: int, candidates: Sequence[str] | None) -> Ranking:
        request_id = uuid.uuid4().hex
        from_retrieval = candidates is None
        if candidates is None:
            t = _now()
            candidates = self.index.candidates(user_id, self.retrieval_candidates) if self.index is not None else []
            self._stage("retrieval", t)
        candidates = list(dict.fromkeys(candidates))
        self.metrics.candidates.observe(len(candidates))
        scored = self.score_pairs([user_id] * len(candidates), candidates)
        if len(candidates) == 0:
            cold = False
        else:
            cold = user_id in scored.cold_users
        if any(reason in scored.degraded for reason in UNSCORED):
            order = list(range(len(candidates)))  # no model scores: keep the candidates' (popularity) order
            scores = np.linspace(1.0, 0.0, num=len(candidates), dtype=np.float32) if candidates else scored.scores
        else:
            # stable: equal scores keep the candidates' order
            order = np.argsort(-scored.scores, kind="stable").tolist()
            scores = scored.scores
        slate = choose(order, k, self.explore_share, request_id)  # the greedy top k, or an exploration draw
        top = slate.shown
        self.metrics.policy.labels(slate.policy).inc()
        for reason in scored.degraded:
            self.metrics.degraded.labels(reason).inc()
        if cold:
            self.metrics.cold_start.inc()
        return Ranking(
            request_id,
            user_id,
            [(candidates[i], float(scores[i])) for i in top],
            scored.model_version,
            {candidates[i]: scored.features.pair(user_id, candidates[i]) for i in top},
            cold,
            scored.degraded,
            from_retrieval,
            slate.propensities,
            slate.policy,
        )
