"""The retrieval stage for requests without candidates: popular and recent items, per category.

It follows ``recsys.events`` from inside the serving process (a consumer without a group:
each serving replica keeps its own view). Only known items are ever candidates: an item
enters the index with its ``item_profile`` event (read back at start-up or seen since), which
also makes it recent and gives its category. Popularity is what users did: clicks, as
exponentially decayed counts (half-life ``serving_retrieval_half_life_s``). Impressions do
not count at all: they are what serving itself showed, candidate ids a client sent included,
so counting them would let any client inject ids (junk ones too) and would feed our own
ranking back into itself. A click on an item not yet profiled is kept aside (bounded) and
credited when the profile arrives, since the profile and the click sit on different
partitions and are read back in no particular order. A user's clicks give the categories
that user favours. Candidates for a user: the most popular items of their favourite
categories, then the globally popular, then the most recent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict

import orjson

from core.aiokafka_private import refresh_metadata
from core.kafka import Brokers, connect_options
from feature_repo.spec import SPEC

log = logging.getLogger(__name__)

_MAX_USERS = 100_000  # users whose favourite categories we remember (least recently active go first)
_MAX_ITEMS = 200_000
_MAX_PENDING = 100_000  # items with clicks but no profile yet (junk ids from clients end here, then fall out)


# how the contract's impression builder serialises (orjson keeps its key order): records that start so are
# impressions, which the index ignores, so the follower skips them unparsed; most of the topic is serving's
# own impressions (k per request), and parsing them on the event loop cost more than every request's routing.
# Anything else (another serialiser) is parsed and ignored as before; test_retrieval checks the prefix.
IMPRESSION_PREFIX = b'{"schema_version":1,"event_type":"impression"'

# per-category picks need the spec's item category; a declaration without one retrieves by popularity only
CATEGORY_FEATURE = "item_category"
_CATEGORY = SPEC.sparse_feature(CATEGORY_FEATURE) if SPEC.has_sparse(CATEGORY_FEATURE) else None


class PopularityIndex:
    """Decayed click counts per item and category, recency of items, favourite categories per user."""

    def __init__(self, half_life_s: float = 3600.0) -> None:
        self.rate = math.log(2) / half_life_s
        self._t0 = time.time()
        # scores are stored as count * exp(rate * (t - t0)): adding never rescales old entries
        self._score: dict[str, float] = {}  # known items only (those with a profile)
        self._pending: OrderedDict[str, float] = OrderedDict()  # clicks on items without a profile yet
        self._category: dict[str, int] = {}
        self._recent: OrderedDict[str, float] = OrderedDict()
        self._user_categories: OrderedDict[str, dict[int, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.events = 0  # records read (impressions too), as observe() and the follower count them

    def _weight(self, ts: float) -> float:
        return math.exp(min(600.0, self.rate * (ts - self._t0)))

    def observe(self, event: dict) -> None:
        kind = event.get("event_type")
        item = event.get("item_id")
        ts = event.get("timestamp")
        if (
            not isinstance(item, str)
            or not isinstance(ts, (int, float))
            or isinstance(ts, bool)
            or not math.isfinite(ts)
        ):
            return
        with self._lock:
            self.events += 1
            if kind == "item_profile":
                genres = event.get("genres") or []
                category = event.get("category") or (genres[0] if isinstance(genres, list) and genres else None)
                self._category[item] = (
                    _CATEGORY.index(category) if _CATEGORY is not None and isinstance(category, str) else 0
                )
                self._touch(item, ts)
                self._score[item] = self._score.get(item, 0.0) + self._pending.pop(item, 0.0)
            elif kind == "click":
                weight = self._weight(ts)
                if item in self._score:
                    self._score[item] += weight
                else:  # not (yet) a known item: never a candidate, but its clicks count once it is
                    self._pending[item] = self._pending.pop(item, 0.0) + weight
                    if len(self._pending) > _MAX_PENDING:
                        self._pending.popitem(last=False)
                user = event.get("user_id")
                category = self._category.get(item, 0)
                if isinstance(user, str) and category:
                    prefs = self._user_categories.pop(user, {})
                    prefs[category] = prefs.get(category, 0.0) + weight
                    self._user_categories[user] = prefs
                    if len(self._user_categories) > _MAX_USERS:
                        self._user_categories.popitem(last=False)
            # impressions (and any other kind) change nothing: see the module docstring
            if len(self._score) > _MAX_ITEMS:  # forget the least popular half
                keep = sorted(self._score, key=self._score.__getitem__, reverse=True)[: _MAX_ITEMS // 2]
                self._score = {i: self._score[i] for i in keep}
                self._recent = OrderedDict((i, t) for i, t in self._recent.items() if i in self._score)
                self._category = {i: c for i, c in self._category.items() if i in self._score}

    def _touch(self, item: str, ts: float) -> None:
        self._recent.pop(item, None)
        self._recent[item] = ts

    def candidates(self, user_id: str | None, n: int) -> list[str]:
        with self._lock:
            ranked = sorted(self._score, key=self._score.__getitem__, reverse=True)
            prefs = self._user_categories.get(user_id or "", {})
            favourite = sorted(prefs, key=prefs.__getitem__, reverse=True)[:3]
            recent = list(reversed(self._recent))
            category = dict(self._category)
        out: dict[str, None] = {}
        per_category = max(1, n // 4)
        for cat in favourite:
            picked = 0
            for item in ranked:
                if picked >= per_category or len(out) >= n:
                    break
                if category.get(item) == cat and item not in out:
                    out[item] = None
                    picked += 1
        for source in (ranked[: n // 2 + 1], recent, ranked):  # half popular, then recent, then the rest
            for item in source:
                if len(out) >= n:
                    return list(out)
                out.setdefault(item, None)
        return list(out)

    def __len__(self) -> int:
        """Known items (those with a profile): the only ones that can be candidates."""
        with self._lock:
            return len(self._score)


async def follow_events(
    index: PopularityIndex, bootstrap: Brokers, topic: str, lookback: int, stop: asyncio.Event, retry_s: float = 2.0
) -> None:
    """Feed ``index`` from ``topic``: the last ``lookback`` records per partition, then new ones.

    Survives a broker outage by reconnecting; malformed records are skipped (the stream
    worker dead-letters them; here they only must not stop the index).
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    while not stop.is_set():
        consumer = AIOKafkaConsumer(
            **connect_options(bootstrap), enable_auto_commit=False, request_timeout_ms=10000, max_poll_records=5000
        )
        try:
            await consumer.start()
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                await refresh_metadata(consumer)
                partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                raise RuntimeError(f"topic {topic} does not exist yet")
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            begins = await consumer.beginning_offsets(tps)
            for tp in tps:
                consumer.seek(tp, max(begins[tp], ends[tp] - lookback))
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    for record in records:
                        if not record.value:
                            continue
                        if record.value.startswith(IMPRESSION_PREFIX):
                            index.events += 1  # read, and changes nothing (as observe() would): left unparsed
                            continue
                        try:
                            event = orjson.loads(record.value)
                        except orjson.JSONDecodeError:
                            continue
                        if isinstance(event, dict):
                            index.observe(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # broker down or topic missing: retry, serving goes on without fresh items
            log.warning("retrieval stream %s: %s; retrying in %.0fs", topic, exc, retry_s)
            try:
                await asyncio.wait_for(stop.wait(), timeout=retry_s)
            except TimeoutError:
                pass
        finally:
            try:
                await consumer.stop()
            except Exception:  # noqa: BLE001 - closing a consumer that never started
                pass
