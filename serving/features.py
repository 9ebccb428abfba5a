"""User and candidate features for one request, in one batched online read.

Features are stored encoded (the stream worker applies ``feature_repo.spec``), so serving
only reassembles them into ``EncodedEntity`` objects; the id features (user_id, item_id)
are hashes computed here from the ids themselves. A user or item the store does not know
comes back as ``None``, and ``join_features`` gives it the "missing" encoding: that is the
cold-start path, not an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from feature_repo.spec import SPEC, EncodedEntity, encode_item, encode_user

log = logging.getLogger(__name__)

USER_COLUMNS = tuple(f.name for f in SPEC.sparse if f.entity == "user" and f.name != "user_id") + tuple(
    f.name for f in SPEC.dense if f.entity == "user"
)
ITEM_COLUMNS = tuple(f.name for f in SPEC.sparse if f.entity == "item" and f.name != "item_id") + tuple(
    f.name for f in SPEC.dense if f.entity == "item"
)
_SPARSE = set(SPEC.sparse_names)


class FeaturesUnavailable(RuntimeError):
    """The feature store did not answer."""


@dataclass
class FetchedFeatures:
    user: EncodedEntity | None  # None: the store has no profile of this user (cold start)
    items: dict[str, EncodedEntity | None]


class FeatureSource(Protocol):
    def fetch(
        self, user_ids: Sequence[str], item_ids: Sequence[str]
    ) -> tuple[dict[str, EncodedEntity | None], dict[str, EncodedEntity | None]]:
        """Features of the given users and items; raise FeaturesUnavailable when the store is down."""
        ...

    def healthy(self) -> bool: ...


def assemble(entity: Literal["user", "item"], entity_id: str, columns: Mapping[str, Any]) -> EncodedEntity | None:
    """An EncodedEntity from the stored columns, or None when every column is missing."""
    names = USER_COLUMNS if entity == "user" else ITEM_COLUMNS
    if all(columns.get(n) is None for n in names):
        return None
    base = encode_user(entity_id) if entity == "user" else encode_item(entity_id)
    sparse = dict(base.sparse)
    dense = dict(base.dense)
    for name in names:
        value = columns.get(name)
        if value is None:
            continue
        if name in _SPARSE:
            ids = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
            feature = SPEC.sparse_feature(name)
            ids = [v if 0 <= v < feature.cardinality else 0 for v in ids] or [0]
            sparse[name] = ids if feature.multi_valued else ids[:1]
        else:
            dense[name] = float(value)
    return EncodedEntity(entity, entity_id, sparse, dense)


class FeastFeatures:
    """Online features from the project's Feast store: ONE ``get_online_features`` call per request.

    Row r of the read carries user r and item r (the shorter list padded with its first id),
    so the user's and every candidate's features come back from a single batched lookup.
    Column names follow ``feature_repo.features`` (``sparse_<name>``, ``dense_<name>``).
    """

    def __init__(self, store: Any, item_ttl_s: float = 0.0, max_cached_items: int = 200_000) -> None:
        from feature_repo import features as defs

        self.store = store
        # item profiles change rarely: with a TTL, known items skip the read (the user is always read)
        self.item_ttl_s = item_ttl_s
        self.max_cached_items = max_cached_items
        self._items: dict[str, tuple[float, EncodedEntity | None]] = {}
        self.item_hits = 0
        self.user_key, self.item_key = defs.JOIN_KEYS["user"], defs.JOIN_KEYS["item"]
        self.user_refs = [f"user_features:{c}" for c in defs.columns("user")]
        self.item_refs = [f"item_features:{c}" for c in defs.columns("item")]
        self._names = {defs.sparse_column(f.name): f.name for f in SPEC.sparse}
        self._names.update({defs.dense_column(f.name): f.name for f in SPEC.dense})
        self._ok = True

    def healthy(self) -> bool:
        return self._ok

    def _read(
        self, users: list[str], items: list[str]
    ) -> tuple[dict[str, EncodedEntity | None], dict[str, EncodedEntity | None]]:
        n = max(len(users), len(items))
        rows = []
        for r in range(n):
            row = {}
            if users:
                row[self.user_key] = users[min(r, len(users) - 1)]
            if items:
                row[self.item_key] = items[min(r, len(items) - 1)]
            rows.append(row)
        refs = (self.user_refs if users else []) + (self.item_refs if items else [])
        data = self.store.get_online_features(features=refs, entity_rows=rows).to_dict()
        columns = [ref.split(":", 1)[1] for ref in refs]
        out_users: dict[str, EncodedEntity | None] = {}
        out_items: dict[str, EncodedEntity | None] = {}
        for r in range(n):
            values = {self._names[c]: data[c][r] for c in columns if c in data}
            if r < len(users):
                out_users[users[r]] = assemble("user", users[r], values)
            if r < len(items):
                out_items[items[r]] = assemble("item", items[r], values)
        return out_users, out_items

    def fetch(
        self, user_ids: Sequence[str], item_ids: Sequence[str]
    ) -> tuple[dict[str, EncodedEntity | None], dict[str, EncodedEntity | None]]:
        users = list(dict.fromkeys(user_ids))
        wanted = list(dict.fromkeys(item_ids))
        cached: dict[str, EncodedEntity | None] = {}
        if self.item_ttl_s > 0:
            now = time.monotonic()
            for item in wanted:
                entry = self._items.get(item)
                if entry is not None and entry[0] > now:
                    cached[item] = entry[1]
            self.item_hits += len(cached)
        items = [i for i in wanted if i not in cached] if cached else wanted
        if not users and not items:
            return {}, cached
        try:
            out_users, out_items = self._read(users, items)
        except Exception as exc:  # redis down, timeouts: the caller degrades
            self._ok = False
            raise FeaturesUnavailable(f"feature store: {type(exc).__name__}: {str(exc)[:200]}") from None
        self._ok = True
        if self.item_ttl_s > 0 and items:
            if len(self._items) + len(items) > self.max_cached_items:
                self._items = {}
            expires = time.monotonic() + self.item_ttl_s
            for item in items:
                self._items[item] = (expires, out_items[item])
        out_items.update(cached)
        return out_users, out_items


class RedisFeatures(FeastFeatures):
    """``FeastFeatures`` reading the Redis online store's hashes directly (``feature_repo.store.RedisOnlineReader``).

    Same answers, same item cache; one pipelined round trip without the Feast SDK's per-call
    work, which was most of the features stage's CPU (README "Serving latency").
    """

    def __init__(self, store: Any, reader: Any, item_ttl_s: float = 0.0, max_cached_items: int = 200_000) -> None:
        super().__init__(store, item_ttl_s, max_cached_items)
        self.reader = reader

    def _read(
        self, users: list[str], items: list[str]
    ) -> tuple[dict[str, EncodedEntity | None], dict[str, EncodedEntity | None]]:
        data = self.reader.read({"user": users, "item": items})
        out_users: dict[str, EncodedEntity | None] = {}
        out_items: dict[str, EncodedEntity | None] = {}
        for ids, rows, entity, out in (
            (users, data["user"], "user", out_users),
            (items, data["item"], "item", out_items),
        ):
            for entity_id, row in zip(ids, rows):
                values = {self._names[c]: v for c, v in row.items()} if row is not None else {}
                out[entity_id] = assemble(entity, entity_id, values)  # type: ignore[arg-type]
        return out_users, out_items


class StaticFeatures:
    """Features from a dict (entity id -> encoded entity): for pure-logic tests and the fallback path."""

    def __init__(
        self, users: Mapping[str, EncodedEntity] | None = None, items: Mapping[str, EncodedEntity] | None = None
    ) -> None:
        self.users, self.items = dict(users or {}), dict(items or {})
        self.down = False

    def healthy(self) -> bool:
        return not self.down

    def fetch(
        self, user_ids: Sequence[str], item_ids: Sequence[str]
    ) -> tuple[dict[str, EncodedEntity | None], dict[str, EncodedEntity | None]]:
        if self.down:
            raise FeaturesUnavailable("feature store is down")
        return {u: self.users.get(u) for u in user_ids}, {i: self.items.get(i) for i in item_ids}
