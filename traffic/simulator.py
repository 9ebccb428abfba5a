"""A traffic simulator: a world of users and items with hidden preferences.

Users and items carry attributes from the feature spec's vocabularies; their hidden
preference vectors are built from those attributes plus individual noise, so the
attributes are informative but ids matter too. A click on an impression happens with

    p = sigmoid(affinity_scale * <u, v> + item_bias + base_logit - position_bias * log2(1 + position))

and arrives after an exponential delay. Events come out in event-time order. With the
same seed and start time the output is byte-for-byte identical.

The oracle AUC (the AUC of the true click probabilities on the emitted impressions) is
the ceiling any model can reach on this traffic.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from core.metrics import roc_auc
from feature_repo.contract import click_event, event_key, impression_event, item_profile_event, user_profile_event
from feature_repo.spec import GENRES, OCCUPATIONS

BAD_KINDS: tuple[str, ...] = (
    "bad_json",
    "wrong_type",
    "missing_field",
    "unknown_event_type",
    "future_timestamp",
    "oversized",
    "non_utf8",
)


@dataclass(frozen=True)
class SimConfig:
    users: int = 1000
    items: int = 500
    requests: int = 2000
    slate_size: int = 10
    dim: int = 8
    seed: int = 0
    start_time: float | None = None  # event time of the first event; None: so that the period ends now
    requests_per_second: float = 200.0  # event-time density of requests
    affinity_scale: float = 2.0
    position_bias: float = 0.35
    base_logit: float = -2.2
    click_delay_mean_s: float = 2.0
    click_delay_max_s: float = 20.0
    bad_fraction: float = 0.0
    oversized_bytes: int = 96 * 1024

    def __post_init__(self) -> None:
        for name in ("users", "items", "requests", "slate_size", "dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.slate_size > self.items:
            raise ValueError(f"slate_size ({self.slate_size}) cannot exceed items ({self.items})")
        if not 0.0 <= self.bad_fraction < 1.0:
            raise ValueError(f"bad_fraction must be in [0, 1), got {self.bad_fraction}")
        if self.requests_per_second <= 0:
            raise ValueError("requests_per_second must be positive")


@dataclass(frozen=True)
class SimRecord:
    """One Kafka record as the simulator publishes it."""

    key: bytes | None
    value: bytes
    timestamp: float
    kind: str  # an event type, or "bad:<kind>" for injected malformed records


@dataclass
class Truth:
    """Ground truth of one impression."""

    request_id: str
    user_id: str
    item_id: str
    position: int
    probability: float
    clicked: bool


@dataclass
class SimStats:
    events: dict[str, int] = field(default_factory=dict)
    bad: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.events.values()) + sum(self.bad.values())


class World:
    """Users and items with attributes and hidden vectors, derived from the seed alone."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        rng = np.random.default_rng(config.seed)
        d = config.dim
        scale = 1.0 / math.sqrt(d)
        self.user_ids = [f"u{i}" for i in range(config.users)]
        self.item_ids = [f"i{j}" for j in range(config.items)]

        self.user_gender = rng.choice(["M", "F"], size=config.users)
        self.user_age = np.clip(rng.normal(32, 11, size=config.users), 7, 80).astype(int)
        self.user_occupation = rng.integers(0, len(OCCUPATIONS), size=config.users)
        self.user_zip = rng.integers(10000, 99999, size=config.users)
        age_bucket = np.digitize(self.user_age, [18, 25, 35, 45, 50, 56])
        gender_vec = rng.normal(0, scale, size=(2, d))
        age_vec = rng.normal(0, scale, size=(7, d))
        occupation_vec = rng.normal(0, scale, size=(len(OCCUPATIONS), d))
        self.user_vec = (
            gender_vec[(self.user_gender == "F").astype(int)]
            + age_vec[age_bucket]
            + occupation_vec[self.user_occupation]
            + rng.normal(0, scale, size=(config.users, d))
        )

        n_genres = rng.integers(1, 4, size=config.items)
        self.item_genres = [list(rng.choice(len(GENRES), size=k, replace=False)) for k in n_genres]
        self.item_year = rng.integers(1950, 2024, size=config.items)
        genre_vec = rng.normal(0, 1.2 * scale, size=(len(GENRES), d))
        self.item_vec = np.stack([genre_vec[g].mean(axis=0) for g in self.item_genres]) + rng.normal(
            0, 0.8 * scale, size=(config.items, d)
        )
        self.item_bias = rng.normal(0, 0.6, size=config.items)
        activity = 1.0 / np.arange(1, config.users + 1) ** 0.6
        self.user_activity = rng.permutation(activity / activity.sum())

    def click_probability(self, user: int, items: np.ndarray, positions: np.ndarray) -> np.ndarray:
        c = self.config
        logits = (
            c.affinity_scale * (self.item_vec[items] @ self.user_vec[user])
            + self.item_bias[items]
            + c.base_logit
            - c.position_bias * np.log2(1 + positions)
        )
        return 1.0 / (1.0 + np.exp(-logits))

    def user_profile(self, i: int, event_id: str, ts: float) -> dict[str, Any]:
        return user_profile_event(
            event_id=event_id,
            timestamp=ts,
            user_id=self.user_ids[i],
            gender=str(self.user_gender[i]),
            age=int(self.user_age[i]),
            occupation=OCCUPATIONS[int(self.user_occupation[i])],
            zip_code=str(int(self.user_zip[i])),
        )

    def item_profile(self, j: int, event_id: str, ts: float) -> dict[str, Any]:
        genres = [GENRES[int(g)] for g in self.item_genres[j]]
        return item_profile_event(
            event_id=event_id,
            timestamp=ts,
            item_id=self.item_ids[j],
            category=genres[0],
            genres=genres,
            year=int(self.item_year[j]),
        )


class Simulation:
    """Generates the event stream of one simulated period; iterate ``records()`` once."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.world = World(config)
        self.start_time = config.start_time if config.start_time is not None else time.time() - self.duration()
        self.tag = hashlib.blake2b(f"{config.seed}:{self.start_time:.6f}".encode(), digest_size=4).hexdigest()
        self.truth: list[Truth] = []
        self.stats = SimStats()
        self._counter = 0

    def duration(self) -> float:
        """Event-time span of the simulated period, last clicks included."""
        return self.config.requests / self.config.requests_per_second + self.config.click_delay_max_s

    def _event_id(self) -> str:
        self._counter += 1
        return f"e-{self.tag}-{self._counter}"

    def _encode(self, event: dict[str, Any]) -> SimRecord:
        kind = event["event_type"]
        self.stats.events[kind] = self.stats.events.get(kind, 0) + 1
        return SimRecord(event_key(event), orjson.dumps(event), event["timestamp"], kind)

    def _bad(self, rng: np.random.Generator, ts: float) -> SimRecord:
        kind = BAD_KINDS[int(rng.integers(len(BAD_KINDS)))]
        self.stats.bad[kind] = self.stats.bad.get(kind, 0) + 1
        base = click_event(
            event_id=self._event_id(), timestamp=ts, request_id=f"r-{self.tag}-bad", user_id="u-bad", item_id="i-bad"
        )
        if kind == "bad_json":
            value = orjson.dumps(base)[:-7]
        elif kind == "wrong_type":
            value = orjson.dumps({**base, "event_type": "impression", "position": "first"})
        elif kind == "missing_field":
            value = orjson.dumps({k: v for k, v in base.items() if k != "item_id"})
        elif kind == "unknown_event_type":
            value = orjson.dumps({**base, "event_type": "purchase"})
        elif kind == "future_timestamp":
            value = orjson.dumps({**base, "timestamp": ts + 7 * 24 * 3600})
        elif kind == "oversized":
            value = orjson.dumps({**base, "padding": "x" * self.config.oversized_bytes})
        else:  # non_utf8
            value = b"\xff\xfe" + orjson.dumps(base)[2:]
        return SimRecord(b"u-bad", value, ts, f"bad:{kind}")

    def records(self) -> Iterator[SimRecord]:
        """Profiles first, then impressions and clicks in event-time order, with bad records mixed in."""
        c, w = self.config, self.world
        rng = np.random.default_rng(c.seed + 1)
        bad_rng = np.random.default_rng(c.seed + 2)
        t0 = self.start_time

        def maybe_bad(ts: float) -> Iterator[SimRecord]:
            if c.bad_fraction and bad_rng.random() < c.bad_fraction:
                yield self._bad(bad_rng, ts)

        for i in range(c.users):
            yield self._encode(w.user_profile(i, self._event_id(), t0))
            yield from maybe_bad(t0)
        for j in range(c.items):
            yield self._encode(w.item_profile(j, self._event_id(), t0))
            yield from maybe_bad(t0)

        pending: list[tuple[float, int, dict[str, Any]]] = []  # clicks waiting for their event time
        sequence = 0
        users = rng.choice(c.users, size=c.requests, p=w.user_activity)
        positions = np.arange(c.slate_size)
        for r in range(c.requests):
            ts = t0 + (r + 1) / c.requests_per_second
            while pending and pending[0][0] <= ts:
                yield self._encode(heapq.heappop(pending)[2])
                yield from maybe_bad(ts)
            user = int(users[r])
            slate = rng.choice(c.items, size=c.slate_size, replace=False)
            probability = w.click_probability(user, slate, positions)
            clicked = rng.random(c.slate_size) < probability
            delays = np.minimum(rng.exponential(c.click_delay_mean_s, size=c.slate_size), c.click_delay_max_s)
            request_id = f"r-{self.tag}-{r}"
            for position, item in enumerate(slate):
                item_id = w.item_ids[int(item)]
                self.truth.append(
                    Truth(
                        request_id,
                        w.user_ids[user],
                        item_id,
                        position,
                        float(probability[position]),
                        bool(clicked[position]),
                    )
                )
                yield self._encode(
                    impression_event(
                        event_id=self._event_id(),
                        timestamp=round(ts, 6),
                        request_id=request_id,
                        user_id=w.user_ids[user],
                        item_id=item_id,
                        position=position,
                    )
                )
                yield from maybe_bad(ts)
                if clicked[position]:
                    click_ts = round(ts + 0.001 + float(delays[position]), 6)
                    sequence += 1
                    heapq.heappush(
                        pending,
                        (
                            click_ts,
                            sequence,
                            click_event(
                                event_id=self._event_id(),
                                timestamp=click_ts,
                                request_id=request_id,
                                user_id=w.user_ids[user],
                                item_id=item_id,
                            ),
                        ),
                    )
        while pending:
            yield self._encode(heapq.heappop(pending)[2])

    def oracle_auc(self) -> float:
        """AUC of the true click probabilities on the impressions emitted so far."""
        if not self.truth:
            return float("nan")
        scores = np.fromiter((t.probability for t in self.truth), dtype=np.float64, count=len(self.truth))
        labels = np.fromiter((t.clicked for t in self.truth), dtype=bool, count=len(self.truth))
        return roc_auc(scores, labels)

    def click_through_rate(self) -> float:
        return sum(t.clicked for t in self.truth) / len(self.truth) if self.truth else float("nan")
