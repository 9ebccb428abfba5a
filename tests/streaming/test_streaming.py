"""Unit tests of the stream worker's logic (no Kafka): validation, de-duplication, joiner, features."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.settings import Settings
from feature_repo.contract import RejectReason, Sample, sample_id
from feature_repo.spec import encode_item, encode_user, join_features, validate_encoded
from streaming.processor import Processor
from streaming.records import DictKV, Outgoing, ProcessorConfig, RawRecord, headers_dict

T0 = 1_700_000_000.0
WINDOW = 10.0


def restored_from_changelog(table: DictKV) -> DictKV:
    """A table as a new process restores it: every value through its JSON changelog record."""
    return DictKV({key: orjson.loads(orjson.dumps(value)) for key, value in table.items()})


def restarted(proc: Processor, clock: Clock) -> Processor:
    """A new worker process over ``proc``'s dedup and joins tables as their changelogs restore them."""
    return Processor(
        proc.config,
        restored_from_changelog(proc.dedup),
        restored_from_changelog(proc.joins),
        DictKV(),
        DictKV(),
        wall=clock,
        resolved=restored_from_changelog(proc.resolved),
    )


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def config(**stream) -> ProcessorConfig:
    """The processor's config from the settings' defaults, with some stream fields replaced."""
    return ProcessorConfig.from_settings(Settings().override(stream=stream))


def make(now: float = T0 + 100) -> tuple[Processor, Clock]:
    clock = Clock(now)
    cfg = config(
        attribution_window_s=WINDOW, early_click_wait_s=5, dedup_window_s=60, resolved_retention_s=30, idle_advance_s=2
    )
    return Processor(cfg, DictKV(), DictKV(), DictKV(), DictKV(), wall=clock), clock


class Feed:
    """Numbers records of one partition like Kafka offsets."""

    def __init__(self, partition: int = 0) -> None:
        self.partition = partition
        self.offset = 0

    def raw(self, value: bytes | None, key: bytes | None = b"u1") -> RawRecord:
        record = RawRecord(self.partition, self.offset, key, value)
        self.offset += 1
        return record

    def event(self, **fields) -> RawRecord:
        return self.raw(orjson.dumps({"schema_version": 1, **fields}))


def impression(eid: str, ts: float, req: str = "r1", item: str = "i1", user: str = "u1", **extra) -> dict:
    return {
        "event_type": "impression",
        "event_id": eid,
        "timestamp": ts,
        "request_id": req,
        "user_id": user,
        "item_id": item,
        "position": 0,
        **extra,
    }


def click(eid: str, ts: float, req: str = "r1", item: str = "i1", user: str = "u1") -> dict:
    return {
        "event_type": "click",
        "event_id": eid,
        "timestamp": ts,
        "request_id": req,
        "user_id": user,
        "item_id": item,
    }


def samples_of(out) -> list[Sample]:
    return [Sample.from_json(o.value) for o in out if o.kind == "samples"]


def test_every_malformed_kind_is_dead_lettered_with_reason_and_good_neighbours_survive():
    proc, _ = make()
    feed = Feed(partition=2)
    good_before = feed.event(**impression("e1", T0 + 1))
    bad = {
        "bad_json": b'{"event_type": "click", "event_id": ',
        "not_utf8": b"\xff\xfe{}",
        "not_an_object": b"[1, 2]",
        "unknown_event_type": orjson.dumps({"event_type": "purchase", "event_id": "x", "timestamp": T0}),
        "missing_field": orjson.dumps({k: v for k, v in click("e9", T0 + 1).items() if k != "item_id"}),
        "wrong_type": orjson.dumps({**impression("e8", T0 + 1), "position": "first"}),
        "future_timestamp": orjson.dumps(click("e7", T0 + 100 + 7 * 86400)),
        "stale_timestamp": orjson.dumps(click("e6", 1000.0)),
        "oversized": orjson.dumps({**click("e5", T0 + 1), "pad": "x" * 70_000}),
        "unsupported_version": orjson.dumps({**click("e4", T0 + 1), "schema_version": 2}),
        "missing_value": None,
    }
    records = [good_before] + [feed.raw(value) for value in bad.values()]
    good_after = feed.event(**click("e2", T0 + 2))
    result = proc.process_batch(records + [good_after])
    letters = [o for o in result.out if o.kind == "deadletter"]
    assert [headers_dict(o.headers)["reason"] for o in letters] == list(bad)
    for letter, record in zip(letters, records[1:]):
        meta = headers_dict(letter.headers)
        assert letter.value == (record.value or b"")  # the original bytes, untouched
        assert meta["source_partition"] == "2" and meta["source_offset"] == str(record.offset)
        assert meta["message"]
    # the good impression and its click, on both sides of the bad records, made a positive sample
    [sample] = samples_of(result.out)
    assert sample.label == 1 and sample.sample_id == sample_id("r1", "i1")


def test_dead_letters_and_late_clicks_keep_the_records_own_headers():
    proc, _ = make()
    client = (("trace_id", b"t-42"), ("reason", b"client's own"), ("empty", None))
    bad = RawRecord(0, 0, b"u1", b"[1, 2]", headers=client)
    result = proc.process_batch([bad])
    [letter] = [o for o in result.out if o.kind == "deadletter"]
    assert letter.headers[:3] == (("trace_id", b"t-42"), ("reason", b"client's own"), ("empty", b""))
    assert headers_dict(letter.headers)["reason"] == "not_an_object"  # ours come last and win by name
    assert headers_dict(letter.headers)["trace_id"] == "t-42"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["impression", "click"]),
    st.sampled_from(["event_type", "schema_version", "position", "user_id", "timestamp", "features", "propensity"]),
    JSON_VALUES,
)
def test_no_event_value_is_an_internal_error(event_type, field, value):
    proc, _ = make()
    event = impression("e1", T0) if event_type == "impression" else click("c1", T0)
    out = proc.process_batch([Feed().raw(json.dumps({"schema_version": 1, **event, field: value}).encode())]).out
    reasons = [headers_dict(o.headers)["reason"] for o in out if o.kind == "deadletter"]
    assert set(reasons) <= {r.value for r in RejectReason}


def test_logged_features_that_break_the_spec_are_dead_lettered():
    proc, _ = make()
    feed = Feed()
    result = proc.process_batch([feed.event(**impression("e1", T0, features={"sparse": {"gender": [1]}, "dense": {}}))])
    [letter] = result.out
    assert letter.kind == "deadletter" and headers_dict(letter.headers)["reason"] == "bad_value"


def test_client_retry_is_dropped_but_a_redelivery_of_the_same_offset_is_processed():
    proc, _ = make()
    feed = Feed()
    first = feed.event(**impression("e1", T0))
    proc.process_batch([first])
    retry = feed.event(**click("c1", T0 + 1))
    retry_again = RawRecord(0, feed.offset, b"u1", retry.value)  # same event id, later offset: a client retry
    result = proc.process_batch([retry, retry_again])
    assert len(samples_of(result.out)) == 1
    assert proc.seen["c1"] == (0, retry.offset)
    # the table holds the ids in one chunk per batch and partition, keyed by the chunk's first offset
    assert sorted(proc.dedup) == [f"0:{first.offset}", f"0:{retry.offset}"]
    # after a crash the same record (same offset) comes again: it is not a duplicate
    restored = Processor(proc.config, restored_from_changelog(proc.dedup), DictKV(), DictKV(), DictKV(), wall=proc.wall)
    restored.process_batch([first])
    assert restored.joins[sample_id("r1", "i1")]["st"] == "o"
    # and the retry is still one (without the restored ids it would join the impression: a second sample)
    assert restored.process_batch([retry_again]).out == []


def test_records_delivered_again_to_the_same_owner_are_skipped_even_after_their_resolution_expired():
    proc, clock = make()
    feed = Feed()
    handled = [feed.event(**impression("e1", T0)), feed.event(**click("c1", T0 + 1))]
    assert [s.label for s in samples_of(proc.process_batch(handled).out)] == [1]
    clock.now += 120  # past the resolved retention: the resolution is forgotten
    proc.process_batch([feed.event(**impression("e2", T0 + 2, req="r2"))])
    assert sample_id("r1", "i1") not in proc.joins
    # a seek back to the committed offset hands the same records out again (same offsets, same process)
    again = proc.process_batch(handled)
    assert again.out == [] and sample_id("r1", "i1") not in proc.joins
    # and no window closes on them later: the sample keeps its one label
    later = proc.process_batch([feed.event(**impression("e3", T0 + 700, req="r3"))]).out
    assert sample_id("r1", "i1") not in {s.sample_id for s in samples_of(later)}


def test_dedup_chunks_are_capped(monkeypatch):
    from streaming import processor

    monkeypatch.setattr(processor, "DEDUP_CHUNK_IDS", 2)
    proc, _ = make()
    feed = Feed(partition=1)
    proc.process_batch([feed.event(**impression(f"e{n}", T0, req=f"r{n}")) for n in range(5)])
    assert {key: chunk["ids"] for key, chunk in proc.dedup.items()} == {
        "1:0": ["e0", "e1"],
        "1:2": ["e2", "e3"],
        "1:4": ["e4"],
    }


def test_an_event_on_another_partition_than_its_users_is_re_published_under_the_user_id():
    homes = {b"u1": 1, b"u2": 0}
    clock = Clock(T0 + 100)
    cfg = config(attribution_window_s=WINDOW, dedup_window_s=60, resolved_retention_s=30, idle_advance_s=2)
    proc = Processor(cfg, DictKV(), DictKV(), DictKV(), DictKV(), wall=clock, home_partition=homes.get)
    on_1, on_0 = Feed(partition=1), Feed(partition=0)
    out = proc.process_batch(
        [
            on_1.event(**impression("e1", T0)),
            # a click with a null key, one with u2's key, a user profile keyed by nothing: all on partition 0
            on_0.raw(orjson.dumps({"schema_version": 1, **click("c1", T0 + 1)}), key=None),
            on_0.raw(orjson.dumps({"schema_version": 1, **click("c2", T0 + 1, item="i2")}), key=b"u2"),
            on_0.raw(
                orjson.dumps(
                    {
                        "schema_version": 1,
                        "event_type": "user_profile",
                        "event_id": "p1",
                        "timestamp": T0,
                        "user_id": "u1",
                    }
                ),
                key=b"",
            ),
            # an item profile goes to every worker's GlobalTable: wherever it is, it is processed there
            on_0.raw(
                orjson.dumps(
                    {
                        "schema_version": 1,
                        "event_type": "item_profile",
                        "event_id": "p2",
                        "timestamp": T0,
                        "item_id": "i1",
                    }
                ),
                key=None,
            ),
            # u2's own event on u2's partition, under a null key: processed in place
            on_0.raw(orjson.dumps({"schema_version": 1, **impression("e2", T0, user="u2")}), key=None),
        ]
    ).out
    forwarded = [o for o in out if o.kind == "events"]
    assert [(o.key, orjson.loads(o.value)["event_id"]) for o in forwarded] == [
        (b"u1", "c1"),
        (b"u1", "c2"),
        (b"u1", "p1"),
    ]
    assert [headers_dict(o.headers)["rekeyed_from"] for o in forwarded] == ["0:0", "0:1", "0:2"]
    assert headers_dict(forwarded[1].headers)["original_key"] == "u2"
    assert "original_key" not in headers_dict(forwarded[0].headers)
    assert not samples_of(out) and not [o for o in out if o.kind == "late"]
    assert (
        proc.items.get("i1") is not None
        and proc.joins.get(
            sample_id(
                "r1",
                "i1",
            )
        )
        is not None
    )
    # the copies, read back from u1's partition, join there; a copy is never forwarded again
    copies = [RawRecord(1, on_1.offset + n, o.key, o.value, headers=o.headers) for n, o in enumerate(forwarded)]
    out = proc.process_batch(copies).out
    assert [(s.item_id, s.label) for s in samples_of(out)] == [("i1", 1)]
    assert [o.kind for o in out if o.kind == "late"] == []  # i2's click waits for its impression there
    assert proc.joins.get(sample_id("r1", "i2"))["p"] == 1
    assert proc.users.get("u1") is not None
    stray = RawRecord(3, 0, b"u1", copies[0].value, headers=copies[0].headers)
    assert [o.kind for o in proc.process_batch([stray]).out] == []  # processed there (a retry of c1: dropped)


def test_click_in_window_is_positive_and_silence_is_negative():
    proc, _ = make()
    feed = Feed()
    out = proc.process_batch(
        [
            feed.event(**impression("e1", T0, item="i1")),
            feed.event(**impression("e2", T0, item="i2")),
            feed.event(**click("c1", T0 + WINDOW - 0.5, item="i1")),
        ]
    ).out
    assert [(s.item_id, s.label) for s in samples_of(out)] == [("i1", 1)]
    # i2 stays open until event time passes its deadline
    out = proc.process_batch([feed.event(**impression("e3", T0 + WINDOW - 0.1, req="r2"))]).out
    assert samples_of(out) == []
    out = proc.process_batch([feed.event(**impression("e4", T0 + WINDOW + 0.1, req="r3"))]).out
    assert [(s.item_id, s.label) for s in samples_of(out)] == [("i2", 0)]


def test_click_after_negative_goes_to_the_late_topic():
    proc, _ = make()
    feed = Feed()
    proc.process_batch([feed.event(**impression("e1", T0)), feed.event(**impression("e2", T0 + 50, req="r9"))])
    late_click = feed.event(**click("c1", T0 + 51))
    out = proc.process_batch([late_click]).out
    [late] = [o for o in out if o.kind == "late"]
    assert late.value == late_click.value
    assert headers_dict(late.headers)["reason"] == "after_negative"
    assert samples_of(out) == []


def test_click_past_the_window_before_expiry_ran_is_negative_and_late():
    # impression, an event far ahead in time and the click in one batch: expiry has not run yet
    proc, _ = make()
    feed = Feed()
    out = proc.process_batch(
        [
            feed.event(**impression("e1", T0)),
            feed.event(**impression("e2", T0 + 50, req="r9")),
            feed.event(**click("c1", T0 + 51)),
        ]
    ).out
    assert [(s.request_id, s.label) for s in samples_of(out)] == [("r1", 0)]
    assert [headers_dict(o.headers)["reason"] for o in out if o.kind == "late"] == ["after_window"]


def test_idle_partition_advances_with_the_wall_clock():
    proc, clock = make(now=T0 + 1)
    proc.process_batch([Feed().event(**impression("e1", T0))])
    clock.now += 1
    assert samples_of(proc.advance_idle()) == []  # not idle long enough
    clock.now += WINDOW + 2
    assert [s.label for s in samples_of(proc.advance_idle())] == [0]


def test_sample_features_use_logged_features_exactly():
    proc, _ = make()
    user, item = encode_user("u1", {"gender": "F", "age": 30}), encode_item("i1", {"genres": ["drama"]})
    sparse, dense = join_features(user, item, "u1", "i1")
    sparse["gender"] = [2]
    feed = Feed()
    proc.process_batch([feed.event(**impression("e1", T0, features={"sparse": sparse, "dense": dense}))])
    [sample] = samples_of(proc.process_batch([feed.event(**click("c1", T0 + 1))]).out)
    assert sample.sparse == sparse and sample.dense == dense


def test_sample_features_take_the_latest_stream_profiles_at_impression_time():
    proc, _ = make()
    feed = Feed()
    user_old = {
        "event_type": "user_profile",
        "event_id": "p1",
        "timestamp": T0 - 10,
        "user_id": "u1",
        "gender": "M",
        "age": 20,
        "occupation": "artist",
        "zip_code": "94110",
    }
    user_new = {**user_old, "event_id": "p2", "timestamp": T0 - 5, "gender": "F", "age": 40}
    item = {
        "event_type": "item_profile",
        "event_id": "p3",
        "timestamp": T0 - 10,
        "item_id": "i1",
        "category": "comedy",
        "genres": ["comedy", "drama"],
        "year": 1999,
    }
    result = proc.process_batch(
        [feed.event(**user_new), feed.event(**user_old), feed.event(**item), feed.event(**impression("e1", T0))]
    )
    assert result.users["u1"][0] == encode_user("u1", user_new)  # the older profile arriving late lost
    assert result.items["i1"][0] == encode_item("i1", item)
    # a profile change after the impression does not change the sample
    proc.process_batch([feed.event(**{**user_new, "event_id": "p4", "timestamp": T0 + 1, "age": 70})])
    [sample] = samples_of(proc.process_batch([feed.event(**click("c1", T0 + 2))]).out)
    expected = join_features(encode_user("u1", user_new), encode_item("i1", item), "u1", "i1")
    assert (sample.sparse, sample.dense) == expected
    validate_encoded(sample.sparse, sample.dense)


def test_a_restart_resolves_again_what_had_not_reached_the_changelog_and_nothing_that_had():
    proc, clock = make()
    feed = Feed()
    proc.process_batch([feed.event(**impression("e1", T0, item="i1")), feed.event(**impression("e2", T0, item="i2"))])
    # the tables as a restarted worker restores them if it crashed after the next batch's samples were
    # acknowledged but before its changelog records were (the app sends them in that order)
    dedup_before, joins_before = restored_from_changelog(proc.dedup), restored_from_changelog(proc.joins)
    second = [feed.event(**click("c1", T0 + 1, item="i1")), feed.event(**impression("e3", T0 + 30, req="r2"))]
    first_run = samples_of(proc.process_batch(second).out)
    assert sorted((s.item_id, s.label) for s in first_run) == [("i1", 1), ("i2", 0)]
    # the resolved entries keep what later records need, not the sample (it is durable before they are)
    assert set(proc.joins[sample_id("r1", "i1")]) == {"st", "p", "ts", "at"}

    # that batch's offsets were never committed: its records come again and resolve the same way
    replay = Processor(proc.config, dedup_before, joins_before, DictKV(), DictKV(), wall=clock)
    again = samples_of(replay.process_batch(second).out)
    assert sorted((s.sample_id, s.label) for s in again) == sorted((s.sample_id, s.label) for s in first_run)

    # once the changelog holds the resolutions, a restarted worker emits nothing again for them
    restored = restarted(proc, clock)
    assert samples_of(restored.process_batch([feed.event(**impression("e4", T0 + 31, req="r3"))]).out) == []
    late = restored.process_batch([feed.event(**click("c2", T0 + 32, item="i2"))]).out
    assert [headers_dict(o.headers)["reason"] for o in late if o.kind == "late"] == ["after_negative"]
    # resolved entries are forgotten after their retention (wall time)
    clock.now += 31
    restored.process_batch([feed.event(**impression("e5", T0 + 33, req="r4"))])
    assert sample_id("r1", "i1") not in restored.joins


def test_dedup_ids_expire_after_the_window():
    proc, _ = make()
    feed = Feed()
    proc.process_batch([feed.event(**impression("e1", T0))])
    proc.process_batch([feed.event(**impression("e2", T0 + 61, req="r2"))])
    assert "e1" not in proc.seen and "e2" in proc.seen
    assert list(proc.dedup) == ["0:1"]  # e1's chunk is gone from the table (a tombstone in its changelog)


def test_sample_wire_format_is_the_contract_sample():
    proc, _ = make()
    feed = Feed()
    proc.process_batch([feed.event(**impression("e1", T0, model_version="m7", propensity=0.25, policy="explore"))])
    [out] = [o for o in proc.process_batch([feed.event(**click("c1", T0 + 1))]).out]
    sample = Sample.from_json(out.value)
    assert out.key == b"u1"
    assert orjson.loads(out.value) == orjson.loads(sample.to_json())
    assert list(orjson.loads(out.value)) == list(Sample.model_fields)  # the same fields in the same order
    assert sample.model_version == "m7" and sample.event_time == T0
    assert sample.propensity == 0.25 and sample.policy == "explore"


@pytest.mark.parametrize("value", [b"", b"null", b"{}", b'{"event_type": null}', b"\x00" * 10])
def test_odd_bytes_never_raise(value):
    proc, _ = make()
    out = proc.process_batch([Feed().raw(value)]).out
    assert [o.kind for o in out] == ["deadletter"]


def test_idle_time_without_open_impressions_is_not_banked():
    proc, clock = make(now=T0 + 1)
    feed = Feed()
    proc.process_batch(
        [feed.event(**{"event_type": "user_profile", "event_id": "p1", "timestamp": T0, "user_id": "u1"})]
    )
    clock.now += 100
    proc.advance_idle()
    out = proc.process_batch(
        [
            feed.event(**impression("e1", T0 + 1)),
        ]
    ).out
    assert samples_of(out) == []
    [sample] = samples_of(proc.process_batch([feed.event(**click("c1", T0 + 2))]).out)
    assert sample.label == 1


def test_a_partition_not_read_to_its_end_is_not_idle():
    behind = {"value": True}
    clock = Clock(T0 + 1)
    proc = Processor(
        config(attribution_window_s=WINDOW, idle_advance_s=2),
        DictKV(),
        DictKV(),
        DictKV(),
        DictKV(),
        wall=clock,
        caught_up=lambda p, offset: not behind["value"],
    )
    proc.process_batch([Feed().event(**impression("e1", T0))])
    clock.now += 100
    assert samples_of(proc.advance_idle()) == []  # the worker lags: more records may hold the click
    behind["value"] = False
    assert [s.label for s in samples_of(proc.advance_idle())] == [0]


def test_a_quiet_partition_taken_after_restart_closes_its_windows():
    proc, clock = make()
    feed = Feed()
    proc.process_batch(
        [
            feed.event(**impression("e1", T0, item="i1")),
            feed.event(**impression("e2", T0, item="i2")),
            feed.event(**click("c1", T0 + 1, item="i1")),
        ]
    )
    # restart: nothing left to read on partition 0, one impression still waits for its window
    restored = restarted(proc, clock)
    restored.take_quiet_partition(0, feed.offset)
    clock.now += 1
    assert samples_of(restored.advance_idle()) == []
    clock.now += WINDOW + 3
    assert [(s.item_id, s.label) for s in samples_of(restored.advance_idle())] == [("i2", 0)]


@pytest.mark.parametrize("known", ["none", "user", "item", "both"])
def test_stream_features_equal_join_features_in_spec_order_whether_profiles_are_known_or_not(known):
    proc, _ = make()
    user = encode_user("u7", {"gender": "F", "age": 31, "occupation": "writer", "zip": "90210"})
    item = encode_item("i9", {"genres": ["drama", "comedy"]})
    if known in ("user", "both"):
        proc.users.put(0, "u7", {"ts": T0, "sp": user.sparse, "dn": user.dense})
    if known in ("item", "both"):
        proc.items.put(0, "i9", {"ts": T0, "sp": item.sparse, "dn": item.dense})
    sparse, dense = (orjson.loads(orjson.dumps(part)) for part in proc.features_for("u7", "i9"))
    expected_sparse, expected_dense = join_features(
        user if known in ("user", "both") else None, item if known in ("item", "both") else None, "u7", "i9"
    )
    assert list(sparse.items()) == list(expected_sparse.items())
    assert list(dense.items()) == list(expected_dense.items())


class _FakeTable:
    def __init__(self, name: str) -> None:
        self.data: dict = {}
        self.changelog_topic = type("Topic", (), {"get_topic_name": lambda _self: f"app-{name}-changelog"})()


class _FakeConsumer:
    def __init__(self, topic: str) -> None:
        from faust.types import TP

        self.tps = [TP(topic, p) for p in range(3)]
        self._committed_offset: dict = {}
        self.positions: dict = {}
        self.highwaters: dict = {}

    def assignment(self):
        return set(self.tps)

    async def position(self, tp):
        return self.positions.get(tp)

    def highwater(self, tp):
        return self.highwaters.get(tp)


def test_a_partition_whose_records_are_handed_over_but_not_processed_is_not_taken_as_quiet():
    """The crash-test bug: the consumer's position moves when records are handed over, before they are
    processed; taking the partition as quiet then closed windows from restored state ahead of them."""
    import asyncio

    from streaming.worker import StreamWorker

    settings = Settings().override(kafka={"topic_events": "events.t"})
    consumer = _FakeConsumer("events.t")
    app = type("App", (), {"consumer": consumer, "rebalancing": False, "in_recovery": False})()
    worker = StreamWorker(app, settings, {n: _FakeTable(n) for n in ("dedup", "joins", "resolved", "users", "items")})
    worker.ready = True
    p0, p1, p2 = consumer.tps
    consumer.highwaters = {p0: 100, p1: 50, p2: 0}
    consumer.positions = {p0: 100, p1: 50, p2: 0}  # everything handed over...
    consumer._committed_offset = {p0: 40, p1: 50}  # ...but only p1's records (and empty p2) are done
    quiet = asyncio.run(worker._quiet_partitions())
    assert sorted(quiet) == [(1, 50), (2, 0)]


class _FakeProducer:
    """aiokafka's producer as StreamWorker.submit uses it; each handed batch waits for the test to ack it."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.handed: list[tuple[str, list, asyncio.Future]] = []  # (topic, records, ack future)
        partitions = {0, 1, 2, 3}
        self.client = SimpleNamespace(
            cluster=SimpleNamespace(
                partitions_for_topic=lambda topic: partitions, available_partitions_for_topic=lambda topic: partitions
            )
        )

    def create_batch(self):
        records: list = []
        return type("Batch", (), {"records": records, "append": lambda _self, **record: records.append(record) or 1})()

    async def send_batch(self, batch, topic, partition):
        import asyncio

        ack = asyncio.get_running_loop().create_future()
        self.handed.append((topic, batch.records, ack))
        return ack

    def topics_handed(self) -> list[str]:
        return [topic for topic, _, _ in self.handed]

    def ack(self, topic_part: str) -> None:
        for topic, _, ack in self.handed:
            if topic_part in topic and not ack.done():
                ack.set_result(None)


def test_changelog_records_go_out_only_after_the_samples_are_acknowledged_and_in_submit_order():
    """What lets a restored worker trust "resolved" in its tables: the sample was durable first."""
    import asyncio

    from streaming.worker import StreamWorker

    settings = Settings().override(kafka={"topic_samples": "samples.t"})
    producer = _FakeProducer()
    app = type("App", (), {"producer": type("P", (), {"_ensure_producer": lambda _self: producer})()})()
    worker = StreamWorker(app, settings, {n: _FakeTable(n) for n in ("dedup", "joins", "resolved", "users", "items")})

    async def scenario() -> None:
        async def settle() -> None:
            for _ in range(5):
                await asyncio.sleep(0)

        worker.changelog[("app-joins-changelog", "s1")] = (0, {"st": "p"})
        first = await worker.submit([Outgoing("samples", b"u1", b"sample-1")])
        worker.changelog[("app-joins-changelog", "s1")] = (0, {"st": "n"})  # the same key, newer value
        second = await worker.submit([Outgoing("samples", b"u2", b"sample-2")])
        await settle()
        assert producer.topics_handed() == ["samples.t", "samples.t"]  # no changelog record yet
        producer.handed[1][2].set_result(None)  # the second batch's sample is acknowledged first...
        await settle()
        assert producer.topics_handed() == ["samples.t", "samples.t"]  # ...its changelog waits for the first's
        producer.handed[0][2].set_result(None)
        await settle()
        changelog_values = [
            r["value"] for topic, records, _ in producer.handed if "changelog" in topic for r in records
        ]
        assert changelog_values == [b'{"st":"p"}', b'{"st":"n"}']
        assert not first.done() and not second.done()  # durable only once the changelog is acknowledged too
        producer.ack("changelog")
        await settle()
        assert first.done() and second.done()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- propensities and served CTR


def served(metric: str, model_version: str, policy: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        f"recsys_served_{metric}_total", {"model_version": model_version, "policy": policy}
    )
    return value or 0.0


def test_samples_carry_the_impressions_propensity_and_policy_also_after_a_restart():
    proc, clock = make()
    feed = Feed()
    proc.process_batch(
        [
            feed.event(**impression("e1", T0, item="i1", propensity=0.05, policy="explore")),
            feed.event(**impression("e2", T0, item="i2", propensity=0.91, policy="exploit")),
            feed.event(**impression("e3", T0, item="i3")),  # an open-loop client: no logging policy known
        ]
    )
    # a new process restores the open entries from their changelog records before the labels are known
    restored = restarted(proc, clock)
    out = restored.process_batch(
        [feed.event(**click("c1", T0 + 1, item="i1")), feed.event(**impression("e4", T0 + 30, req="r2"))]
    ).out
    got = {s.item_id: (s.label, s.propensity, s.policy) for s in samples_of(out)}
    assert got == {"i1": (1, 0.05, "explore"), "i2": (0, 0.91, "exploit"), "i3": (0, None, None)}
    # an unknown propensity costs nothing in the open entry (one changelog record per impression)
    assert "pr" not in restored.joins[sample_id("r2", "i1")]


def test_served_counters_count_emitted_samples_by_model_version_and_policy():
    proc, _ = make()
    feed = Feed()
    version = f"m-{uuid.uuid4().hex[:8]}@ps3"  # a label value no other test uses: the registry is global
    before = {(m, p): served(m, version, p) for m in ("impressions", "clicks") for p in ("explore", "exploit", "none")}
    shown = [("r1", "a", "exploit"), ("r1", "b", "exploit"), ("r2", "c", "explore"), ("r2", "d", "explore")]
    shown += [("r3", "e", None)]
    records = []
    for n, (req, item, policy) in enumerate(shown):
        extra = {"propensity": 0.5, "policy": policy} if policy else {}
        records.append(feed.event(**impression(f"e{n}", T0, req=req, item=item, model_version=version, **extra)))
    clicked = [("r1", "a"), ("r2", "c"), ("r2", "d"), ("r3", "e")]
    records += [feed.event(**click(f"c{n}", T0 + 1, req=r, item=i)) for n, (r, i) in enumerate(clicked)]
    out = proc.process_batch(records).out
    # a's click made its sample; b waits for its window, so it is not counted yet
    assert served("impressions", version, "exploit") - before[("impressions", "exploit")] == 1
    out += proc.process_batch([feed.event(**impression("late", T0 + 30, req="r9", item="z"))]).out
    labels = {(s.request_id, s.item_id): s.label for s in samples_of(out)}
    for policy, requests in (("exploit", {"r1"}), ("explore", {"r2"}), ("none", {"r3"})):
        emitted = [label for (req, _), label in labels.items() if req in requests]
        assert served("impressions", version, policy) - before[("impressions", policy)] == len(emitted)
        assert served("clicks", version, policy) - before[("clicks", policy)] == sum(emitted)
    assert served("impressions", version, "exploit") - before[("impressions", "exploit")] == 2
    assert served("clicks", version, "exploit") - before[("clicks", "exploit")] == 1


def test_served_model_version_labels_are_capped_and_unknown_ones_bucketed():
    from streaming.metrics import OTHER_LABEL, UNKNOWN_LABEL, ServedCounters

    counters = ServedCounters(max_versions=2)
    tag = uuid.uuid4().hex[:8]
    assert [counters.version_label(f"{tag}-{n}") for n in (1, 2, 1, 3)] == [
        f"{tag}-1",
        f"{tag}-2",
        f"{tag}-1",
        OTHER_LABEL,
    ]
    assert counters.version_label(None) == UNKNOWN_LABEL
    assert ServedCounters(max_versions=5).version_label("v" * 500) == OTHER_LABEL
    before = served("impressions", OTHER_LABEL, "explore")
    counters.add({(f"{tag}-4", "explore", 0): 3})
    assert served("impressions", OTHER_LABEL, "explore") - before == 3


WAIT = 5.0  # make()'s early-click wait


def late_reasons(out) -> list[str]:
    return [headers_dict(o.headers)["reason"] for o in out if o.kind == "late"]


def test_a_click_before_its_impression_waits_for_it_and_makes_a_positive():
    proc, _ = make()
    feed = Feed()
    out = proc.process_batch([feed.event(**click("c1", T0 + 1))]).out
    assert out == [] and proc.joins.get(sample_id("r1", "i1"))["st"] == "c"  # held
    out = proc.process_batch([feed.event(**impression("e1", T0)), feed.event(**impression("e2", T0, item="i2"))]).out
    assert [(s.item_id, s.label) for s in samples_of(out)] == [("i1", 1)]
    assert late_reasons(out) == []
    # its impression's retry, and a retry of the click, change nothing
    out = proc.process_batch([feed.event(**impression("e3", T0)), feed.event(**click("c2", T0 + 1))]).out
    assert samples_of(out) == [] and late_reasons(out) == []


def test_a_held_click_survives_a_restart_and_still_joins():
    proc, clock = make()
    feed = Feed()
    proc.process_batch([feed.event(**click("c1", T0 + 1))])
    again = restarted(proc, clock)
    out = again.process_batch([feed.event(**impression("e1", T0))]).out
    assert [(s.item_id, s.label) for s in samples_of(out)] == [("i1", 1)]


def test_a_held_click_whose_impression_never_comes_goes_late_as_itself_after_the_wait():
    proc, clock = make()
    feed = Feed()
    held = RawRecord(
        0, feed.offset, b"u1", orjson.dumps({"schema_version": 1, **click("c1", T0)}), headers=(("t", b"\xff"),)
    )
    feed.offset += 1
    assert proc.process_batch([held]).out == []
    # event time passes the wait on a restored worker (the held click is in the table, not only in memory)
    proc = restarted(proc, clock)
    out = proc.process_batch([feed.event(**impression("e9", T0 + WAIT + 1, req="r9"))]).out
    [late] = [o for o in out if o.kind == "late"]
    assert late.value == held.value and late.key == held.key and late.headers[0] == ("t", b"\xff")
    meta = headers_dict(late.headers)
    assert meta["reason"] == "no_impression" and meta["source_offset"] == "0" and "never came" in meta["message"]
    # the impression coming after that is one without a click: it waits for its window like any other
    out = proc.process_batch([feed.event(**impression("e1", T0))]).out
    assert samples_of(out) == [] and proc.joins.get(sample_id("r1", "i1"))["st"] == "o"
    out = proc.process_batch([feed.event(**impression("e8", T0 + WINDOW + 1, req="r8"))]).out
    assert [(s.request_id, s.label) for s in samples_of(out)] == [("r1", 0)]


def test_a_click_whose_wait_is_over_when_it_comes_is_late_at_once_saying_why():
    proc, _ = make()
    feed = Feed()
    proc.process_batch([feed.event(**impression("e9", T0 + 100, req="r9"))])
    out = proc.process_batch([feed.event(**click("c1", T0))]).out
    assert late_reasons(out) == ["too_old_to_wait"]
    assert "never came" in headers_dict(out[0].headers)["message"]


def test_a_held_click_after_its_impressions_window_is_late_and_the_impression_negative():
    proc, _ = make()
    feed = Feed()
    proc.process_batch([feed.event(**click("c1", T0 + WINDOW + 2))])
    out = proc.process_batch([feed.event(**impression("e1", T0))]).out
    assert [(s.item_id, s.label) for s in samples_of(out)] == [("i1", 0)]
    assert late_reasons(out) == ["after_window"]


def test_a_quiet_stream_ends_the_wait_of_a_held_click():
    proc, clock = make()
    proc.process_batch([Feed().event(**click("c1", T0))])
    clock.now += 1  # not idle yet
    assert late_reasons(proc.advance_idle()) == []
    clock.now += WAIT + 1  # idle, and event time follows the clock past the wait
    assert late_reasons(proc.advance_idle()) == ["no_impression"]


def test_a_log_sent_again_after_de_duplication_and_the_joins_forgot_it_gives_no_id_a_second_label():
    proc, clock = make()
    feed = Feed()

    def log() -> list:
        return [
            feed.event(**impression("e1", T0)),
            feed.event(**click("c1", T0 + 1)),
            feed.event(**impression("e2", T0, req="r2")),
            feed.event(**impression("e3", T0 + WINDOW + 1, req="r3")),  # closes r2's window: negative
            feed.event(**click("c2", T0 + WINDOW + 2, req="r2")),  # late: after r2's negative
        ]

    out = proc.process_batch(log()).out
    assert sorted((s.request_id, s.label) for s in samples_of(out)) == [("r1", 1), ("r2", 0)]
    assert late_reasons(out) == ["after_window"]  # r2's window closed in this batch
    # event time moves past the de-dup window, wall time past the resolved entries' retention: both forget
    proc.process_batch([feed.event(**impression("e4", T0 + 80, req="r4"))])
    clock.now += 31
    proc.process_batch([feed.event(**impression("e5", T0 + 81, req="r5"))])
    assert proc.joins.get(sample_id("r1", "i1")) is None and "e1" not in proc.seen
    proc = restarted(proc, clock)  # the label memory is in the resolved table too
    out = proc.process_batch(log()).out  # the same log, re-sent by its client
    assert samples_of(out) == []
    assert late_reasons(out) == ["after_negative"]  # r2's click, again: its sample has label 0
    assert len(proc.resolved) >= 1 and len(proc.resolved) < 5  # chunks, not one record per sample


def test_the_label_memory_is_forgotten_once_no_event_of_it_can_be_accepted():
    clock = Clock(T0 + 100)
    cfg = dataclasses.replace(
        config(attribution_window_s=WINDOW, early_click_wait_s=5, resolved_retention_s=30, idle_advance_s=2),
        max_event_age_s=100,
        max_future_skew_s=10,
    )
    proc = Processor(cfg, DictKV(), DictKV(), DictKV(), DictKV(), wall=clock)
    feed = Feed()
    proc.process_batch([feed.event(**impression("e1", T0)), feed.event(**click("c1", T0 + 1))])
    assert proc.partitions[0].labels == {sample_id("r1", "i1"): 1}
    clock.now = T0 + 200
    proc.process_batch([feed.event(**impression("e2", T0 + 105, req="r2"))])
    assert sample_id("r1", "i1") in proc.partitions[0].labels  # T0 + 105 - 110 < T0: still acceptable
    proc.process_batch([feed.event(**impression("e3", T0 + 115, req="r3"))])
    assert sample_id("r1", "i1") not in proc.partitions[0].labels
    assert all(sample_id("r1", "i1") not in chunk["ids"] for _, chunk in proc.resolved.items())


# ---------------------------------------------------------------------- bounded recovery (#18 item 3)


def test_a_click_redelivered_after_a_restart_longer_than_every_retention_is_not_misrouted():
    proc, clock = make()
    feed = Feed()
    history = [
        feed.event(**impression("e1", T0, item="i1")),
        feed.event(**impression("e2", T0, item="i2")),
        feed.event(**click("c1", T0 + 1, item="i1")),
        feed.event(**impression("e3", T0 + 30, req="r2")),  # closes the window of i2: negative
    ]
    first = samples_of(proc.process_batch(history).out)
    assert sorted((s.item_id, s.label) for s in first) == [("i1", 1), ("i2", 0)]
    # a crash after the changelog held all of it but before the offsets were committed, and a restart that
    # restores its tables for longer than the resolved entries' retention (wall time)
    clock.now += 10 * proc.config.resolved_retention_s
    restored = restarted(proc, clock)
    # the re-delivered records come back in batches: the first one's expiry forgets the resolved entries
    assert restored.process_batch(history[:2]).out == []
    assert sample_id("r1", "i1") not in restored.joins
    out = restored.process_batch(history[2:]).out
    assert [o.kind for o in out] == [], "the re-delivered click made a sample or went late"
    # a click the client sends again (a new event id) is a duplicate too, not a late click
    assert restored.process_batch([feed.event(**click("c1-again", T0 + 31, item="i1"))]).out == []


def test_an_open_entry_restored_beside_its_label_is_dropped_not_resolved_a_second_time():
    proc, clock = make()
    feed = Feed()
    proc.process_batch([feed.event(**impression("e1", T0, item="i1"))])
    stale = restored_from_changelog(proc.joins)  # the open entry as an early changelog record holds it
    assert [s.label for s in samples_of(proc.process_batch([feed.event(**click("c1", T0 + 1))]).out)] == [1]
    proc.process_batch([feed.event(**impression("e9", T0 + 2, req="r9"))])
    clock.now += 2 * proc.config.resolved_retention_s
    proc.process_batch([feed.event(**impression("e10", T0 + 3, req="r10"))])  # the resolved entry is deleted
    assert sample_id("r1", "i1") not in proc.joins
    # A restart whose read of the changelog outlived delete.retention.ms: the cleaner removed the records that
    # resolved and deleted the entry after the reader had passed its open record; the label chunk is there.
    joins = restored_from_changelog(proc.joins)
    joins[sample_id("r1", "i1")] = stale[sample_id("r1", "i1")]
    restored = Processor(
        proc.config,
        restored_from_changelog(proc.dedup),
        joins,
        DictKV(),
        DictKV(),
        wall=clock,
        resolved=restored_from_changelog(proc.resolved),
    )
    out = restored.process_batch([feed.event(**impression("e11", T0 + 60, req="r11"))]).out  # past every window
    assert sample_id("r1", "i1") not in [s.sample_id for s in samples_of(out)], "a second label"
    assert sample_id("r1", "i1") not in restored.joins
    assert restored.process_batch([feed.event(**click("c1-again", T0 + 61))]).out == []


def test_changelog_topics_get_the_segment_and_cleaner_settings_unless_switched_off():
    from streaming.tables import changelog_configs

    stream = Settings().override(stream={"changelog_segment_ms": 5000, "changelog_delete_retention_ms": 0}).stream
    tuned = changelog_configs(stream)
    assert tuned["cleanup.policy"] == "compact"
    assert tuned["segment.ms"] == "5000" and tuned["delete.retention.ms"] == "0"
    assert {"segment.bytes", "min.cleanable.dirty.ratio"} <= set(tuned)
    assert changelog_configs(stream.model_copy(update={"changelog_compaction": False})) == {"cleanup.policy": "compact"}
