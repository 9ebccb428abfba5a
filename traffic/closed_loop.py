"""Closed-loop traffic: the simulator's users ask serving for recommendations and click on what it shows.

The world (users, items, hidden preferences, visit frequencies, profiles) is the open-loop
simulator's ``World``; only the source of the lists changes. A simulated user arrives (drawn by
``World.user_activity``), calls ``POST /v1/recommend`` (with candidates drawn from the world's
items for ``candidates_share`` of the requests, otherwise letting serving's retrieval choose),
and clicks each shown item with its true probability at the position it was served at, after an
exponential delay. Clicks go to Kafka with the served request id and item id; impressions are
not published here, serving logs them with the features it used. Profiles go out first, so the
stream has features for the world's users and items.

Only the simulator knows the true click probabilities, so it also keeps the online metrics:
for every served list the expected clicks of the list as served, of a random policy (k items
drawn from the same candidate set, shown at positions 0..k-1) and of the oracle policy (the k
candidates with the highest true probability, best first), per model version and per time
bucket. The random policy's value is its exact expectation, not one draw: position j shows a
uniformly random candidate, so its expected clicks are the mean probability of all candidates
at j. The oracle's order does not depend on the position, since position bias shifts every
item's logit by the same amount.

Serving errors are counted by kind and never end the run: a shed request (503) pauses every
user for its ``Retry-After`` (capped), and a list that was not served gets no click.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import math
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

from core.kafka import Brokers, publish
from core.metrics import roc_auc
from core.settings import SimulatorSettings
from feature_repo.contract import EXPLOIT, click_event, event_key
from serving.schemas import RecommendResponse
from traffic.simulator import SimRecord, Truth, World

POLICIES = ("served", "random", "oracle")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*$", re.IGNORECASE)
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds of ``30s``, ``5m``, ``1.5h`` or plain seconds (``90``); ValueError saying what is accepted otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"invalid duration {text!r}: give seconds or a number with s, m or h (30s, 5m, 1h)")
    seconds = float(match[1]) * _UNIT_S[match[2].lower()]
    if not 0 < seconds < math.inf:
        raise ValueError(f"duration must be positive, got {text!r}")
    return seconds


# --------------------------------------------------------------------------- the three policies


@dataclass(frozen=True)
class PolicyValues:
    """Expected clicks of one request's list as served, and of the random and oracle policies on its candidates."""

    served: float  # sum of the shown items' true probabilities at their served positions
    shown: int
    random: float
    oracle: float
    slots: int  # how many items the random and oracle policies show: min(k, candidates)


def policy_values(
    world: World, user: int, candidates: np.ndarray, served_probability: np.ndarray, k: int
) -> PolicyValues:
    """The expected clicks of the three policies on one request (``candidates``: world item indices)."""
    slots = min(k, len(candidates))
    positions = np.arange(slots)
    # probability of every candidate at every slot: rows candidates, columns positions
    grid = world.click_probability(user, candidates[:, None], positions[None, :])
    best_first = np.argsort(-grid[:, 0], kind="stable")[:slots]
    return PolicyValues(
        served=float(served_probability.sum()),
        shown=len(served_probability),
        random=float(grid.mean(axis=0).sum()),
        oracle=float(grid[best_first, positions].sum()),
        slots=slots,
    )


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


@dataclass
class Aggregate:
    """Served lists, impressions, realised clicks and the three policies' expected clicks of a group of requests."""

    requests: int = 0
    impressions: int = 0
    clicks: int = 0
    expected_served: float = 0.0
    expected_random: float = 0.0
    expected_oracle: float = 0.0
    slots: int = 0

    def add(self, values: PolicyValues, clicks: int) -> None:
        self.requests += 1
        self.impressions += values.shown
        self.clicks += clicks
        self.expected_served += values.served
        self.expected_random += values.random
        self.expected_oracle += values.oracle
        self.slots += values.slots

    def as_dict(self) -> dict[str, Any]:
        """The counts with the CTRs they give (None where nothing was shown): what the summary and series hold."""
        return {
            **asdict(self),
            "realised_ctr": _ratio(self.clicks, self.impressions),
            "served_ctr": _ratio(self.expected_served, self.impressions),
            "random_ctr": _ratio(self.expected_random, self.slots),
            "oracle_ctr": _ratio(self.expected_oracle, self.slots),
        }


class OnlineMetrics:
    """Aggregates per model version and per (time bucket, model version), outcomes by kind, and their Prometheus twins.

    The Prometheus metrics live in their own registry (``registry``), served by the simulator
    process with ``prometheus_client.start_http_server(port, registry=metrics.registry)``.
    """

    def __init__(self, bucket_s: float, started_at: float) -> None:
        self.bucket_s = bucket_s
        self.started_at = started_at  # wall time of bucket 0's start
        self.total = Aggregate()
        self.by_version: dict[str, Aggregate] = {}
        # exploration lowers the served average by design: exploit and explore lists are kept apart too
        self.by_policy: dict[str, Aggregate] = {}
        self.by_version_policy: dict[tuple[str, str], Aggregate] = {}
        self.by_bucket: dict[tuple[int, str], Aggregate] = {}
        self.outcomes: dict[str, int] = {}
        self.registry = r = CollectorRegistry()
        self._requests = Counter("recsys_sim_requests", "recommendation requests by outcome", ["outcome"], registry=r)
        self._impressions = Counter(
            "recsys_sim_impressions", "items shown to simulated users", ["model_version"], registry=r
        )
        self._clicks = Counter(
            "recsys_sim_clicks", "clicks of simulated users (realised)", ["model_version"], registry=r
        )
        self._expected = Counter(
            "recsys_sim_expected_clicks",
            "expected clicks of the served list and of the random and oracle policies on the same requests",
            ["model_version", "policy"],
            registry=r,
        )
        self._slots = Counter(
            "recsys_sim_policy_slots",
            "items each policy showed (served: impressions); CTR = rate(expected_clicks) / rate(policy_slots)",
            ["model_version", "policy"],
            registry=r,
        )
        self._ctr = Gauge(
            "recsys_sim_expected_ctr",
            "expected CTR since the start, per policy",
            ["model_version", "policy"],
            registry=r,
        )
        self.clicks_queued = Counter("recsys_sim_clicks_queued", "clicks handed to the Kafka producer", registry=r)

    def outcome(self, kind: str) -> None:
        self.outcomes[kind] = self.outcomes.get(kind, 0) + 1
        self._requests.labels(kind).inc()

    def record(
        self, model_version: str, at: float, values: PolicyValues, clicks: int, served_by: str = EXPLOIT
    ) -> None:
        """One served list (received at wall time ``at``, chosen by serving's policy ``served_by``) with its
        realised clicks."""
        bucket = max(0, int((at - self.started_at) // self.bucket_s))
        for aggregate in (
            self.total,
            self.by_version.setdefault(model_version, Aggregate()),
            self.by_policy.setdefault(served_by, Aggregate()),
            self.by_version_policy.setdefault((model_version, served_by), Aggregate()),
            self.by_bucket.setdefault((bucket, model_version), Aggregate()),
        ):
            aggregate.add(values, clicks)
        self._impressions.labels(model_version).inc(values.shown)
        self._clicks.labels(model_version).inc(clicks)
        version = self.by_version[model_version]
        for policy, expected, slots, cumulative in (
            ("served", values.served, values.shown, version.expected_served / max(1, version.impressions)),
            ("random", values.random, values.slots, version.expected_random / max(1, version.slots)),
            ("oracle", values.oracle, values.slots, version.expected_oracle / max(1, version.slots)),
        ):
            self._expected.labels(model_version, policy).inc(expected)
            self._slots.labels(model_version, policy).inc(slots)
            self._ctr.labels(model_version, policy).set(cumulative)

    def by_version_and_policy(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{model version: {serving policy (exploit/explore): aggregate}}``, JSON-ready."""
        nested: dict[str, dict[str, dict[str, Any]]] = {}
        for (version, policy), aggregate in sorted(self.by_version_policy.items()):
            nested.setdefault(version, {})[policy] = aggregate.as_dict()
        return nested

    def series(self) -> list[dict[str, Any]]:
        """One entry per time bucket and model version, oldest first (the JSONL time series)."""
        return [
            {
                "bucket": bucket,
                "start": self.started_at + bucket * self.bucket_s,
                "end": self.started_at + (bucket + 1) * self.bucket_s,
                "model_version": version,
                **aggregate.as_dict(),
            }
            for (bucket, version), aggregate in sorted(self.by_bucket.items())
        ]


# --------------------------------------------------------------------------- the run


_FROM_SETTINGS = (
    "rate",
    "concurrency",
    "candidates_share",
    "candidates",
    "request_timeout_s",
    "max_retry_after_s",
    "bucket_s",
)


@dataclass(frozen=True)
class ClosedLoopConfig:
    """How the simulated users call serving (defaults: ``SimulatorSettings``, RECSYS_SIM_*)."""

    serving_url: str
    duration_s: float
    rate: float
    concurrency: int
    candidates_share: float
    candidates: int
    request_timeout_s: float
    max_retry_after_s: float
    bucket_s: float

    @classmethod
    def from_settings(
        cls, sim: SimulatorSettings, serving_url: str, duration_s: float, **overrides: Any
    ) -> ClosedLoopConfig:
        """The settings' values, with the overrides that are not None (CLI options left unset)."""
        values: dict[str, Any] = {name: getattr(sim, name) for name in _FROM_SETTINGS}
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(serving_url=serving_url, duration_s=duration_s, **values)

    def __post_init__(self) -> None:
        if not self.duration_s > 0 or not self.rate > 0:
            raise ValueError("duration and rate must be positive")
        if self.concurrency < 1 or self.candidates < 1:
            raise ValueError("concurrency and candidates must be at least 1")
        if not 0.0 <= self.candidates_share <= 1.0:
            raise ValueError(f"candidates_share must be in [0, 1], got {self.candidates_share}")


def profile_records(world: World, id_prefix: str) -> list[SimRecord]:
    """A profile event of every user and item of the world (event ids ``<id_prefix>-<n>``)."""
    now = time.time()
    events = [world.user_profile(i, f"{id_prefix}-u{i}", now) for i in range(len(world.user_ids))]
    events += [world.item_profile(j, f"{id_prefix}-i{j}", now) for j in range(len(world.item_ids))]
    return [SimRecord(event_key(e), orjson.dumps(e), now, e["event_type"]) for e in events]


# sends records to Kafka (``kafka_sink``) or anywhere else (tests); returns how many it sent
Sink = Callable[[Iterable[SimRecord] | AsyncIterable[SimRecord]], Coroutine[Any, Any, int]]


def kafka_sink(bootstrap: Brokers, topic: str) -> Sink:
    """A sink publishing through the project's one publish loop (``core.kafka.publish``)."""

    async def send(records: Iterable[SimRecord] | AsyncIterable[SimRecord]) -> int:
        return (await publish(records, bootstrap, topic)).records

    return send


class ClosedLoop:
    """One closed-loop run: ``await run()`` once, then read ``summary()``, ``metrics``, ``truth``."""

    def __init__(
        self,
        world: World,
        config: ClosedLoopConfig,
        sink: Sink,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.world, self.config, self.sink, self.transport = world, config, sink, transport
        self.k = world.config.slate_size
        self.rng = np.random.default_rng(world.config.seed + 3)  # the open-loop run uses +1 and +2
        self.started_at = time.time()
        self.tag = hashlib.blake2b(f"{world.config.seed}:{self.started_at:.6f}".encode(), digest_size=4).hexdigest()
        self.metrics = OnlineMetrics(config.bucket_s, self.started_at)
        self.truth: list[Truth] = []
        self.unknown_items = 0  # served items the world does not know: nobody clicks them
        self.served_lists = {"candidates": 0, "retrieval": 0}  # served lists by where their candidates came from
        self.profiles_sent = 0
        self.clicks_sent = 0
        self.elapsed_s = 0.0
        self._item_index = {item_id: j for j, item_id in enumerate(world.item_ids)}
        self._pending: list[tuple[float, int, dict[str, Any]]] = []  # clicks waiting for their time
        self._sequence = 0
        self._wake = asyncio.Event()
        self._requests_over = False
        self._next_slot = 0.0  # monotonic time of the next request
        self._paused_until = 0.0

    @property
    def clicks(self) -> int:
        return self.metrics.total.clicks

    @property
    def clicks_pending(self) -> int:
        return len(self._pending)

    def _event_id(self, kind: str) -> str:
        self._sequence += 1
        return f"{kind}-{self.tag}-{self._sequence}"

    async def run(self, on_progress: Callable[[ClosedLoop], None] | None = None, progress_every_s: float = 1.0) -> None:
        """Publish the profiles, then send requests for ``duration_s`` and the clicks they earn, until the last
        click is out (at most ``click_delay_max_s`` after the last request). A Kafka failure raises; serving
        failures are counted."""
        self.profiles_sent = await self.sink(profile_records(self.world, f"p-{self.tag}"))
        started = time.monotonic()
        self.started_at = self.metrics.started_at = time.time()
        self._next_slot = started
        deadline = started + self.config.duration_s
        clicks = asyncio.create_task(self.sink(self._due_clicks()))
        limits = httpx.Limits(
            max_connections=self.config.concurrency, max_keepalive_connections=self.config.concurrency
        )
        try:
            async with httpx.AsyncClient(
                base_url=self.config.serving_url,
                timeout=self.config.request_timeout_s,
                limits=limits,
                transport=self.transport,
            ) as client:
                users = [asyncio.create_task(self._user_loop(client, deadline)) for _ in range(self.config.concurrency)]
                await self._watch(users, clicks, on_progress, progress_every_s)
            self._requests_over = True
            self._wake.set()
            await self._watch([clicks], clicks, on_progress, progress_every_s)
            self.clicks_sent = clicks.result()
        finally:
            clicks.cancel()
            self.elapsed_s = time.monotonic() - started

    async def _watch(
        self,
        tasks: list[asyncio.Task],
        clicks: asyncio.Task,
        on_progress: Callable[[ClosedLoop], None] | None,
        every_s: float,
    ) -> None:
        """Wait for ``tasks``, reporting progress; a failed click sender (Kafka) ends the run at once."""
        remaining = set(tasks)
        try:
            while remaining:
                done, _ = await asyncio.wait(remaining | {clicks}, timeout=every_s, return_when="FIRST_COMPLETED")
                if clicks.done() and clicks.exception() is not None:
                    raise clicks.exception()  # type: ignore[misc]
                for task in done - {clicks}:
                    task.result()  # a bug in a user loop is raised, not swallowed
                remaining -= done
                if on_progress is not None:
                    on_progress(self)
        finally:
            for task in remaining - {clicks}:
                task.cancel()

    async def _user_loop(self, client: httpx.AsyncClient, deadline: float) -> None:
        while await self._take_slot(deadline):
            await self._visit(client)

    async def _take_slot(self, deadline: float) -> bool:
        """Wait for the next request time of the target rate (or the end of a Retry-After pause); False at the end."""
        now = time.monotonic()
        slot = max(self._next_slot, self._paused_until, now)
        if slot >= deadline:
            return False
        self._next_slot = slot + 1.0 / self.config.rate  # late requests are not made up for in a burst
        if slot > now:
            await asyncio.sleep(slot - now)
        return True

    async def _visit(self, client: httpx.AsyncClient) -> None:
        """One user's visit: ask for a list, look at it, decide the clicks."""
        w, rng = self.world, self.rng
        user = int(rng.choice(len(w.user_ids), p=w.user_activity))
        body: dict[str, Any] = {"user_id": w.user_ids[user], "k": self.k}
        if rng.random() < self.config.candidates_share:
            candidates = rng.choice(len(w.item_ids), size=min(self.config.candidates, len(w.item_ids)), replace=False)
            body["candidate_item_ids"] = [w.item_ids[int(j)] for j in candidates]
        else:
            candidates = np.arange(len(w.item_ids))  # serving's retrieval may pick any item of the world
        try:
            response = await client.post("/v1/recommend", json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            self.metrics.outcome("connection_error")
            return
        except httpx.TimeoutException:
            self.metrics.outcome("client_timeout")
            return
        except httpx.TransportError:  # the connection broke mid-request
            self.metrics.outcome("connection_error")
            return
        if response.status_code != 200:
            self._failed(response)
            return
        try:
            served = RecommendResponse.model_validate_json(response.content)
        except ValidationError:
            self.metrics.outcome("bad_response")
            return
        if served.user_id != body["user_id"] or any(item.position < 0 for item in served.items):
            self.metrics.outcome("bad_response")
            return
        if not served.items:
            self.metrics.outcome("empty")  # nothing shown: no impression, and nothing to compare policies on
            return
        self.metrics.outcome("served")
        self.served_lists["candidates" if "candidate_item_ids" in body else "retrieval"] += 1
        self._look_and_click(user, served, candidates)

    def _failed(self, response: httpx.Response) -> None:
        if response.status_code == 503:
            self.metrics.outcome("shed_503")
            try:
                wait_s = float(response.headers.get("retry-after", "1"))
            except ValueError:
                wait_s = 1.0  # an HTTP-date or junk: wait a second, as for a missing header
            wait_s = min(max(wait_s, 0.0), self.config.max_retry_after_s)
            self._paused_until = max(self._paused_until, time.monotonic() + wait_s)
        elif response.status_code == 504:
            self.metrics.outcome("deadline_504")
        else:
            self.metrics.outcome(f"http_{response.status_code}")

    def _look_and_click(self, user: int, served: RecommendResponse, candidates: np.ndarray) -> None:
        w, c, rng = self.world, self.world.config, self.rng
        now = time.time()
        index = np.array([self._item_index.get(item.item_id, -1) for item in served.items], np.int64)
        positions = np.array([item.position for item in served.items], np.int64)
        known = index >= 0
        self.unknown_items += int((~known).sum())
        probability = np.zeros(len(index))
        if known.any():
            probability[known] = w.click_probability(user, index[known], positions[known])
        clicked = rng.random(len(index)) < probability
        delays = np.minimum(rng.exponential(c.click_delay_mean_s, size=len(index)), c.click_delay_max_s)
        user_id = w.user_ids[user]
        for item, p, click, delay in zip(served.items, probability, clicked, delays):
            self.truth.append(Truth(served.request_id, user_id, item.item_id, item.position, float(p), bool(click)))
            if click:
                at = round(now + 0.001 + float(delay), 6)
                event = click_event(
                    event_id=self._event_id("c"),
                    timestamp=at,
                    request_id=served.request_id,
                    user_id=user_id,
                    item_id=item.item_id,
                )
                heapq.heappush(self._pending, (at, self._sequence, event))
                self._wake.set()
        values = policy_values(w, user, candidates, probability, self.k)
        self.metrics.record(served.model_version, now, values, int(clicked.sum()), served.policy)

    async def _due_clicks(self) -> AsyncIterator[SimRecord]:
        """The clicks as they fall due, until the requests are over and the last click is out."""
        while True:
            now = time.time()
            while self._pending and self._pending[0][0] <= now:
                at, _, event = heapq.heappop(self._pending)
                self.metrics.clicks_queued.inc()
                yield SimRecord(event_key(event), orjson.dumps(event), at, "click")
            if self._requests_over and not self._pending:
                return
            self._wake.clear()  # no await since the check above: nothing was pushed in between
            timeout = self._pending[0][0] - now if self._pending else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    # ----------------------------------------------------------------------- results

    def oracle_auc(self) -> float:
        """AUC of the true probabilities on the served impressions: the ceiling of any model on this traffic."""
        if not self.truth:
            return float("nan")
        scores = np.fromiter((t.probability for t in self.truth), np.float64, count=len(self.truth))
        labels = np.fromiter((t.clicked for t in self.truth), bool, count=len(self.truth))
        return roc_auc(scores, labels)

    def summary(self) -> dict[str, Any]:
        """Everything the run measured, JSON-ready (undefined figures are None, never NaN)."""
        auc = self.oracle_auc()
        return {
            "serving_url": self.config.serving_url,
            "started_at": self.started_at,
            "duration_s": self.config.duration_s,
            "elapsed_s": round(self.elapsed_s, 3),
            "target_rate": self.config.rate,
            "concurrency": self.config.concurrency,
            "candidates_share": self.config.candidates_share,
            "slate_size": self.k,
            "requests_sent": sum(self.metrics.outcomes.values()),
            "outcomes": dict(sorted(self.metrics.outcomes.items())),
            "profiles_sent": self.profiles_sent,
            "impressions": len(self.truth),
            "clicks": self.clicks,
            "clicks_sent": self.clicks_sent,
            "unknown_items": self.unknown_items,
            "served_lists": dict(self.served_lists),
            "oracle_auc": auc if math.isfinite(auc) else None,
            "total": self.metrics.total.as_dict(),
            "by_model_version": {v: a.as_dict() for v, a in sorted(self.metrics.by_version.items())},
            "by_policy": {p: a.as_dict() for p, a in sorted(self.metrics.by_policy.items())},
            "by_model_version_and_policy": self.metrics.by_version_and_policy(),
            "bucket_s": self.config.bucket_s,
        }

    def write_summary(self, path: Path) -> None:
        path.write_bytes(orjson.dumps(self.summary(), option=orjson.OPT_INDENT_2) + b"\n")

    def write_series(self, path: Path) -> None:
        path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in self.metrics.series()))

    def write_truth(self, path: Path, append: bool = False) -> None:
        """One line per served impression, the open-loop ``--truth`` format (request, user, item, position,
        probability, clicked); ``append``: after the lines already there (several runs, one file)."""
        with path.open("ab" if append else "wb") as out:
            out.write(b"".join(orjson.dumps(asdict(t)) + b"\n" for t in self.truth))
