"""Closed-loop simulator: pure logic (durations, the three policies' values) and runs against a fake serving
(httpx.MockTransport) with an in-memory sink instead of Kafka."""

from __future__ import annotations

import itertools
import math

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client import generate_latest

from core.settings import SimulatorSettings
from feature_repo.contract import Click, parse_event
from traffic.closed_loop import ClosedLoop, ClosedLoopConfig, parse_duration, policy_values
from traffic.simulator import SimConfig, World


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1.5m", 90.0), ("90", 90.0), (" 2M ", 120.0), ("0.5", 0.5)],
)
def test_parse_duration_accepts_units_and_plain_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "5x", "-3s", "0", "0m", "inf", "nan", "5 min", "1h30m", "1e3"])
def test_parse_duration_rejects_malformed_or_non_positive(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_config_takes_the_settings_and_overrides_only_what_is_given():
    sim = SimulatorSettings(rate=7.0, concurrency=3)
    config = ClosedLoopConfig.from_settings(sim, "http://x:1", 10.0, rate=None, concurrency=5)
    assert (config.rate, config.concurrency, config.candidates_share) == (7.0, 5, sim.candidates_share)
    with pytest.raises(ValueError, match="candidates_share"):
        ClosedLoopConfig.from_settings(sim, "http://x:1", 10.0, candidates_share=1.5)


SMALL = World(SimConfig(users=30, items=8, slate_size=3, seed=5))


def _true(world: World, user: int, ordered: tuple[int, ...]) -> float:
    return float(world.click_probability(user, np.array(ordered), np.arange(len(ordered))).sum())


@pytest.mark.parametrize("user", range(0, 30, 3))
def test_oracle_is_the_best_subset_and_random_is_the_mean_over_ordered_lists(user):
    candidates = np.array([0, 2, 3, 5, 6, 7])
    served = SMALL.click_probability(user, np.array([3, 0, 7]), np.array([0, 1, 2]))
    values = policy_values(SMALL, user, candidates, served, k=3)
    best_first = [
        tuple(sorted(c, key=lambda j: -_true(SMALL, user, (j,)))) for c in itertools.combinations(candidates, 3)
    ]
    assert values.oracle == pytest.approx(max(_true(SMALL, user, c) for c in best_first))
    every_list = [_true(SMALL, user, p) for p in itertools.permutations(candidates, 3)]
    assert values.random == pytest.approx(float(np.mean(every_list)))
    assert values.oracle > values.random
    assert values.served == pytest.approx(float(served.sum())) and (values.shown, values.slots) == (3, 3)


def test_policies_show_at_most_the_candidates():
    values = policy_values(SMALL, 0, np.array([4, 1]), np.array([0.1]), k=3)
    assert values.slots == 2 and values.shown == 1
    assert values.oracle == pytest.approx(_true(SMALL, 0, tuple(sorted((4, 1), key=lambda j: -_true(SMALL, 0, (j,))))))


# --------------------------------------------------------------------------- runs against a fake serving


class FakeServing:
    """Answers /v1/recommend like serving (the first k candidates, or items of its own choice), or fails on cue."""

    def __init__(self, world: World, script: list[str] | None = None, versions: tuple[str, ...] = ("m/1@ps1",)) -> None:
        self.world, self.script, self.versions = world, script or ["ok"], versions
        self.answers: dict[str, int] = {}
        self.served: dict[str, list[str]] = {}  # request id -> items shown
        self.calls = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        behaviour = self.script[self.calls % len(self.script)]
        self.calls += 1
        self.answers[behaviour] = self.answers.get(behaviour, 0) + 1
        body = orjson.loads(request.content)
        if behaviour == "refuse":
            raise httpx.ConnectError("connection refused", request=request)
        if behaviour == "hang":
            raise httpx.ReadTimeout("timed out", request=request)
        if behaviour == "shed":
            return httpx.Response(503, json={"detail": "busy"}, headers={"Retry-After": "0"})
        if behaviour == "deadline":
            return httpx.Response(504, json={"detail": "late"})
        if behaviour == "boom":
            return httpx.Response(500, text="internal error")
        if behaviour == "garbage":
            return httpx.Response(200, content=b"{not json")
        items = body.get("candidate_item_ids") or self.world.item_ids[::-1]
        shown = [] if behaviour == "empty" else items[: body["k"]]
        request_id = f"r{self.calls}"
        self.served[request_id] = shown
        return httpx.Response(
            200,
            json={
                "request_id": request_id,
                "user_id": body["user_id"],
                "model_version": self.versions[self.calls % len(self.versions)],
                "policy": "explore" if self.calls % 3 == 0 else "exploit",
                "items": [{"item_id": i, "score": 1.0, "position": p} for p, i in enumerate(shown)],
            },
        )


class ListSink:
    def __init__(self) -> None:
        self.batches: list[list] = []

    async def __call__(self, records) -> int:
        batch: list = []
        self.batches.append(batch)
        if hasattr(records, "__aiter__"):
            async for record in records:
                batch.append(record)
        else:
            batch.extend(records)
        return len(batch)


def _run(world: World, fake: FakeServing, **config) -> tuple[ClosedLoop, ListSink]:
    import asyncio

    values = {
        "duration_s": 0.6,
        "rate": 2000.0,
        "concurrency": 4,
        "candidates_share": 0.5,
        "candidates": 20,
        "request_timeout_s": 5.0,
        "max_retry_after_s": 10.0,
        "bucket_s": 0.2,
        **config,
    }
    sink = ListSink()
    loop = ClosedLoop(
        world, ClosedLoopConfig(serving_url="http://serving", **values), sink, httpx.MockTransport(fake.handler)
    )
    asyncio.run(loop.run())
    return loop, sink


FAST_CLICKS = {"click_delay_mean_s": 0.01, "click_delay_max_s": 0.05}


def test_clicks_follow_the_true_probabilities_and_name_served_pairs():
    world = World(SimConfig(users=200, items=60, slate_size=5, seed=11, **FAST_CLICKS))
    fake = FakeServing(world)
    loop, sink = _run(world, fake)
    profiles, clicks = sink.batches
    assert len(profiles) == 200 + 60 and {r.kind for r in profiles} == {"user_profile", "item_profile"}
    assert len(loop.truth) > 1000
    # realised clicks per position against the sum of the true probabilities: within 4 standard deviations
    for position in range(5):
        shown = [t for t in loop.truth if t.position == position]
        p = np.array([t.probability for t in shown])
        realised = sum(t.clicked for t in shown)
        assert abs(realised - p.sum()) <= 4 * math.sqrt((p * (1 - p)).sum()) + 1
    # position bias: the true probability falls with the position for the same user and item
    assert world.click_probability(0, np.array([3, 3]), np.array([0, 4])).tolist() == sorted(
        world.click_probability(0, np.array([3, 3]), np.array([0, 4])).tolist(), reverse=True
    )
    events = [parse_event(r.value) for r in clicks]
    assert all(isinstance(e, Click) for e in events)
    assert [r.key for r in clicks] == [e.user_id.encode() for e in events]
    sent = sorted((e.request_id, e.item_id) for e in events)
    assert sent == sorted((t.request_id, t.item_id) for t in loop.truth if t.clicked)
    assert all(e.item_id in fake.served[e.request_id] for e in events)
    assert loop.clicks_sent == len(events) == loop.clicks
    assert loop.served_lists["candidates"] > 0 and loop.served_lists["retrieval"] > 0


def test_every_failure_is_counted_by_kind_and_never_clicked():
    world = World(SimConfig(users=50, items=40, slate_size=4, seed=2, **FAST_CLICKS))
    script = ["ok", "refuse", "hang", "shed", "deadline", "boom", "garbage", "empty", "ok"]
    fake = FakeServing(world, script)
    loop, sink = _run(world, fake)
    kinds = {
        "ok": "served",
        "refuse": "connection_error",
        "hang": "client_timeout",
        "shed": "shed_503",
        "deadline": "deadline_504",
        "boom": "http_500",
        "garbage": "bad_response",
        "empty": "empty",
    }
    expected: dict[str, int] = {}
    for behaviour, count in fake.answers.items():
        expected[kinds[behaviour]] = expected.get(kinds[behaviour], 0) + count
    assert loop.metrics.outcomes == expected
    assert set(expected) == set(kinds.values())  # every kind happened
    served_ids = {rid for rid, items in fake.served.items() if items}
    assert {t.request_id for t in loop.truth} == served_ids
    assert {parse_event(r.value).request_id for r in sink.batches[1]} <= served_ids
    assert loop.metrics.total.requests == expected["served"]
    assert loop.summary()["requests_sent"] == fake.calls


def test_a_shed_request_pauses_every_user_for_its_retry_after():
    world = World(SimConfig(users=10, items=10, slate_size=2, seed=0, **FAST_CLICKS))

    def shed(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"detail": "busy"}, headers={"Retry-After": "30"})

    fake = FakeServing(world)
    fake.handler = shed  # type: ignore[method-assign]
    loop, _ = _run(world, fake, concurrency=1)
    assert loop.metrics.outcomes == {"shed_503": 1}  # the pause outlasts the run
    capped, _ = _run(world, fake, concurrency=1, max_retry_after_s=0.0)
    assert capped.metrics.outcomes["shed_503"] > 1


def test_summary_series_and_prometheus_agree_per_model_version(tmp_path):
    world = World(SimConfig(users=80, items=50, slate_size=5, seed=4, **FAST_CLICKS))
    fake = FakeServing(world, versions=("fallback@ps0", "champion/1@ps3"))
    loop, _ = _run(world, fake)
    loop.write_summary(tmp_path / "summary.json")
    loop.write_series(tmp_path / "series.jsonl")
    loop.write_truth(tmp_path / "truth.jsonl")
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    series = [orjson.loads(line) for line in (tmp_path / "series.jsonl").read_bytes().splitlines()]
    truth = [orjson.loads(line) for line in (tmp_path / "truth.jsonl").read_bytes().splitlines()]
    assert set(summary["by_model_version"]) == {"fallback@ps0", "champion/1@ps3"}
    for version, agg in summary["by_model_version"].items():
        lines = [s for s in series if s["model_version"] == version]
        assert sum(s["impressions"] for s in lines) == agg["impressions"]
        assert sum(s["clicks"] for s in lines) == agg["clicks"]
        assert agg["random_ctr"] <= agg["oracle_ctr"]
    assert len({s["bucket"] for s in series}) > 1  # 0.6 s of traffic in 0.2 s buckets
    assert summary["total"]["impressions"] == len(truth) == summary["impressions"]
    assert summary["total"]["clicks"] == sum(t["clicked"] for t in truth) == summary["clicks_sent"]
    assert 0.5 < summary["oracle_auc"] <= 1.0
    exported = generate_latest(loop.metrics.registry).decode()
    impressions = summary["by_model_version"]["fallback@ps0"]["impressions"]
    assert f'recsys_sim_impressions_total{{model_version="fallback@ps0"}} {float(impressions)}' in exported
    assert f'recsys_sim_requests_total{{outcome="served"}} {float(summary["outcomes"]["served"])}' in exported
    assert 'recsys_sim_expected_ctr{model_version="champion/1@ps3",policy="oracle"}' in exported
    # exploit and explore lists are kept apart per model version, and add up to the version's figures
    for version, by_policy in summary["by_model_version_and_policy"].items():
        assert set(by_policy) == {"exploit", "explore"}
        for field in ("requests", "impressions", "clicks"):
            assert sum(a[field] for a in by_policy.values()) == summary["by_model_version"][version][field]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--closed-loop", "--duration", "5x"], "invalid duration '5x'"),
        (["--closed-loop", "--requests", "5"], "--requests: not an option of --closed-loop"),
        (["--duration", "5m"], "--duration: not an option of the open loop"),
        (["--closed-loop", "--serving", "ftp://x"], "expected http(s)://host[:port]"),
        (["--closed-loop", "--rate", "0"], "requests/s must be positive"),
    ],
)
def test_cli_rejects_bad_closed_loop_input_with_exit_2(args, message):
    from typer.testing import CliRunner

    from recsys.cli import app

    result = CliRunner().invoke(app, ["simulate", *args], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
