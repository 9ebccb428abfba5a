"""The closed loop on real services: a real serving app (fallback scorer, rows from a Redis replica, impression
logging and retrieval on real Kafka) and the simulator's users clicking on what it shows."""

from __future__ import annotations

import asyncio
import time

import pytest

from core.kafka import ensure_topics, read_topic
from core.settings import Settings
from feature_repo.contract import Click, Impression, parse_event
from paramserver import open_reader
from serving.app import create_app
from serving.components import Components
from serving.features import StaticFeatures
from serving.model import EmbeddingDotScorer, ModelHandle
from serving.params import RowFetcher
from tests.serving.test_serving_integration import DIM, TABLES, _replicate, _seed_training_copy, _settings, serve
from traffic.closed_loop import ClosedLoop, ClosedLoopConfig, kafka_sink
from traffic.simulator import SimConfig, World

pytestmark = pytest.mark.integration


def _events(settings: Settings) -> list:
    async def read() -> list:
        return [parse_event(r.value) async for r in read_topic(settings.kafka.bootstrap, settings.kafka.topic_events)]

    return asyncio.run(read())


def test_clicks_land_on_served_lists_and_match_the_truth(redis_factory, test_settings):
    world = World(SimConfig(users=40, items=80, slate_size=5, seed=3, click_delay_mean_s=0.2, click_delay_max_s=1.0))
    train, replica = redis_factory("closed-loop-train"), redis_factory("closed-loop-replica")
    _seed_training_copy(train.url, world.user_ids, world.item_ids, TABLES)
    _replicate(train.url, [replica.url])
    settings = _settings(test_settings)
    asyncio.run(ensure_topics(settings.kafka.bootstrap, {settings.kafka.topic_events: 2}))
    comps = Components(
        model=ModelHandle(None, lambda: EmbeddingDotScorer({"user_id": DIM, "item_id": DIM})),
        rows=RowFetcher(open_reader(Settings().ps, [replica.url]), 1000, 0.5),
        features=StaticFeatures(),
        follow_stream=True,  # retrieval learns the world's items from the profiles the simulator publishes
    )
    with serve(create_app(settings, comps)) as base:
        config = ClosedLoopConfig.from_settings(
            settings.sim, base, 4.0, rate=60.0, concurrency=4, candidates_share=0.5, candidates=30
        )
        loop = ClosedLoop(world, config, kafka_sink(settings.kafka.bootstrap, settings.kafka.topic_events))
        asyncio.run(loop.run())
        # serving sends its impressions in the background: wait until all of them are on the topic
        deadline = time.monotonic() + 60
        while True:
            events = _events(settings)
            logged = sum(isinstance(e, Impression) for e in events)
            if logged >= len(loop.truth) or time.monotonic() > deadline:
                break
            time.sleep(0.5)

    summary = loop.summary()
    assert set(summary["outcomes"]) <= {"served", "empty"}, summary["outcomes"]
    assert summary["served_lists"]["candidates"] > 20 and summary["served_lists"]["retrieval"] > 20
    impressions = {(e.request_id, e.item_id): e for e in events if isinstance(e, Impression)}
    clicks = [e for e in events if isinstance(e, Click)]
    assert logged == len(impressions) == len(loop.truth)  # serving logged exactly the lists the users saw
    assert set(impressions) == {(t.request_id, t.item_id) for t in loop.truth}
    for t in loop.truth:
        assert impressions[(t.request_id, t.item_id)].position == t.position
    for click in clicks:  # every click names a served (request, item) and comes after its impression
        shown = impressions[(click.request_id, click.item_id)]
        assert click.user_id == shown.user_id and click.timestamp > shown.timestamp
    assert sorted((c.request_id, c.item_id) for c in clicks) == sorted(
        (t.request_id, t.item_id) for t in loop.truth if t.clicked
    )
    assert len(clicks) == loop.clicks_sent == summary["clicks"] > 0
    assert {e.model_version for e in impressions.values()} == set(summary["by_model_version"])
    assert summary["profiles_sent"] == sum(e.event_type.endswith("_profile") for e in events) == 40 + 80
