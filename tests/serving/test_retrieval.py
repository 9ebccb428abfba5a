"""The retrieval index: only items with a profile are candidates, popularity is clicks (pure logic, no Kafka).

Client-supplied candidate ids come back on the events topic as impressions (serving logs
what it served); before the fix 32 of one user's top 100 retrieved items were such junk ids.
The end-to-end check through real Kafka is test_retrieval_follows_the_event_stream.
"""

from __future__ import annotations

import time

from serving.retrieval import PopularityIndex

JUNK = ["no-such-item", "🙂", "x" * 256, "'; DROP TABLE items; --"]


def _profile(index: PopularityIndex, item: str, genre: str = "drama", ts: float | None = None) -> None:
    index.observe({"event_type": "item_profile", "item_id": item, "timestamp": ts or time.time(), "genres": [genre]})


def _event(index: PopularityIndex, kind: str, item: str, user: str = "u1") -> None:
    index.observe({"event_type": kind, "item_id": item, "user_id": user, "timestamp": time.time(), "position": 0})


def test_junk_ids_in_impressions_and_clicks_never_become_candidates():
    index = PopularityIndex()
    _profile(index, "known-a")
    _profile(index, "known-b")
    for junk in JUNK:
        for _ in range(50):
            _event(index, "impression", junk)
            _event(index, "click", junk)
    _event(index, "click", "known-b")
    for user in ("u1", "stranger", None):
        assert set(index.candidates(user, 100)) == {"known-a", "known-b"}
    assert index.candidates("u1", 1) == ["known-b"]
    assert len(index) == 2  # what /metrics reports as retrieval items


def test_clicks_raise_a_known_item_over_one_that_is_only_shown():
    index = PopularityIndex()
    now = time.time()
    _profile(index, "clicked", ts=now - 10)
    _profile(index, "shown", ts=now)  # the more recent one
    for _ in range(100):
        _event(index, "impression", "shown")
    _event(index, "impression", "clicked")
    _event(index, "click", "clicked")
    assert index.candidates("anyone", 2) == ["clicked", "shown"]


def test_a_click_read_before_its_items_profile_counts_once_the_profile_arrives():
    # profile and click sit on different partitions: read back at start-up in no particular order
    index = PopularityIndex()
    _profile(index, "early")
    for _ in range(3):
        _event(index, "click", "late")
    assert index.candidates("u1", 10) == ["early"]  # not known yet: not a candidate
    _profile(index, "late")
    assert index.candidates("u1", 10) == ["late", "early"]  # its clicks were kept


def test_the_follower_recognises_the_contract_s_impressions_unparsed():
    """The follower skips records starting with IMPRESSION_PREFIX: it must be what the impression builder writes."""
    import orjson

    from feature_repo.contract import click_event, impression_event
    from serving.retrieval import IMPRESSION_PREFIX

    shown = impression_event(
        event_id="r-0",
        timestamp=1.0,
        request_id="r",
        user_id="u",
        item_id="i",
        position=0,
        model_version="m/1@ps1",
        features=({}, {}),
        propensity=1.0,
        policy="exploit",
    )
    assert orjson.dumps(shown).startswith(IMPRESSION_PREFIX)
    clicked = click_event(event_id="c", timestamp=1.0, request_id="r", user_id="u", item_id="i")
    assert not orjson.dumps(clicked).startswith(IMPRESSION_PREFIX)
