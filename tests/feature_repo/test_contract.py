"""The event contract: every event type validates, every malformed kind is rejected with its own reason."""

from __future__ import annotations

import json
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feature_repo.contract import (
    Click,
    FeatureValues,
    Impression,
    InvalidEvent,
    ItemProfile,
    RejectReason,
    Sample,
    UserProfile,
    click_event,
    event_key,
    impression_event,
    item_profile_event,
    parse_event,
    sample_id,
    user_profile_event,
)

NOW = 1_800_000_000.0


def base(event_type: str, **fields) -> dict:
    return {"schema_version": 1, "event_type": event_type, "event_id": "e-1", "timestamp": NOW - 10, **fields}


VALID = {
    "impression": base(
        "impression",
        request_id="r1",
        user_id="u1",
        item_id="i1",
        position=3,
        model_version="7",
        features={"sparse": {"user_id": [5], "genres": [1, 2]}, "dense": {"user_age": 0.5}},
        propensity=0.25,
        policy="explore",
    ),
    "click": base("click", request_id="r1", user_id="u1", item_id="i1"),
    "user_profile": base("user_profile", user_id="u1", gender="F", age=31, occupation="writer", zip_code="94110"),
    "item_profile": base(
        "item_profile", item_id="i1", category="drama", genres=["drama", "war"], year=1999, title="A film"
    ),
}
CLASSES = {"impression": Impression, "click": Click, "user_profile": UserProfile, "item_profile": ItemProfile}


def parse(data: dict | bytes, **limits) -> object:
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    return parse_event(raw, now=NOW, **limits)


@pytest.mark.parametrize("event_type", sorted(VALID))
def test_every_event_type_validates_and_round_trips(event_type: str) -> None:
    event = parse(VALID[event_type])
    assert isinstance(event, CLASSES[event_type])
    assert event.event_type == event_type
    again = parse(event.to_json())
    assert again == event


def test_unknown_fields_are_kept() -> None:
    event = parse({**VALID["click"], "client": {"app": "ios", "build": 42}})
    assert event.model_extra == {"client": {"app": "ios", "build": 42}}
    assert orjson.loads(event.to_json())["client"] == {"app": "ios", "build": 42}


def test_optional_profile_attributes_may_be_missing() -> None:
    event = parse(base("user_profile", user_id="u2"))
    assert (event.gender, event.age, event.occupation, event.zip_code) == (None, None, None, None)


def test_kafka_key_is_the_user_or_the_item() -> None:
    assert parse(VALID["click"]).kafka_key() == b"u1"
    assert parse(VALID["item_profile"]).kafka_key() == b"i1"


MALFORMED = [
    (b"\xff\xfe{}", RejectReason.NOT_UTF8, "UTF-8"),
    (b'{"event_type": "click", ', RejectReason.BAD_JSON, "invalid JSON"),
    (b"[1, 2]", RejectReason.NOT_AN_OBJECT, "expected a JSON object"),
    ({k: v for k, v in VALID["click"].items() if k != "event_type"}, RejectReason.MISSING_FIELD, "event_type"),
    ({**VALID["click"], "event_type": "purchase"}, RejectReason.UNKNOWN_EVENT_TYPE, "purchase"),
    ({**VALID["click"], "schema_version": 2}, RejectReason.UNSUPPORTED_VERSION, "schema_version"),
    ({k: v for k, v in VALID["click"].items() if k != "item_id"}, RejectReason.MISSING_FIELD, "item_id"),
    ({**VALID["impression"], "position": "3"}, RejectReason.WRONG_TYPE, "position"),
    ({**VALID["click"], "user_id": 42}, RejectReason.WRONG_TYPE, "user_id"),
    ({**VALID["click"], "timestamp": "yesterday"}, RejectReason.WRONG_TYPE, "timestamp"),
    ({**VALID["impression"], "position": -1}, RejectReason.BAD_VALUE, "position"),
    ({**VALID["user_profile"], "age": 400}, RejectReason.BAD_VALUE, "age"),
    ({**VALID["click"], "user_id": ""}, RejectReason.BAD_VALUE, "user_id"),
    (
        {**VALID["impression"], "features": {"sparse": {"user_id": ["x"]}, "dense": {}}},
        RejectReason.WRONG_TYPE,
        "features.sparse.user_id.0",
    ),
    ({**VALID["click"], "timestamp": NOW + 3600}, RejectReason.FUTURE_TIMESTAMP, "in the future"),
    ({**VALID["click"], "timestamp": NOW - 90 * 24 * 3600}, RejectReason.STALE_TIMESTAMP, "older than"),
    ({**VALID["click"], "padding": "x" * 70_000}, RejectReason.OVERSIZED, "exceeds"),
]


@pytest.mark.parametrize(
    ("raw", "reason", "mentions"), MALFORMED, ids=[f"{m[1].value}-{i}" for i, m in enumerate(MALFORMED)]
)
def test_malformed_records_are_rejected_with_a_specific_reason(raw, reason: RejectReason, mentions: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse(raw)
    assert caught.value.reason is reason
    assert mentions in caught.value.message


def test_limits_are_configurable() -> None:
    event = {**VALID["click"], "timestamp": NOW + 3600}
    assert parse(event, max_future_skew_s=7200).timestamp == NOW + 3600
    with pytest.raises(InvalidEvent) as caught:
        parse(VALID["click"], max_bytes=64)
    assert caught.value.reason is RejectReason.OVERSIZED


def test_real_clock_is_the_default_reference() -> None:
    fresh = {**VALID["click"], "timestamp": time.time()}
    assert parse_event(orjson.dumps(fresh)).timestamp == fresh["timestamp"]


def test_feature_values_reject_non_finite_dense_values() -> None:
    with pytest.raises(ValueError, match="not finite"):
        FeatureValues(sparse={}, dense={"user_age": float("nan")})


def test_sample_round_trip_and_deterministic_id() -> None:
    sid = sample_id("r1", "i1")
    assert sid == sample_id("r1", "i1")
    assert sid != sample_id("r1", "i2") and sid != sample_id("r2", "i1")
    sample = Sample(
        sample_id=sid,
        request_id="r1",
        user_id="u1",
        item_id="i1",
        label=1,
        event_time=NOW,
        position=2,
        sparse={"user_id": [1]},
        dense={"user_age": 0.1},
    )
    assert Sample.from_json(sample.to_json()) == sample
    with pytest.raises(ValueError):
        Sample.model_validate({**sample.model_dump(), "label": 2})


@pytest.mark.parametrize(
    "literal, reason, mentions",
    [
        ("0", RejectReason.BAD_VALUE, "propensity"),
        ("-0.5", RejectReason.BAD_VALUE, "propensity"),
        ("1.0000001", RejectReason.BAD_VALUE, "propensity"),
        ("2", RejectReason.BAD_VALUE, "propensity"),
        # JSON has no NaN or infinity: their usual spellings are not JSON
        ("NaN", RejectReason.BAD_JSON, "invalid JSON"),
        ("Infinity", RejectReason.BAD_JSON, "invalid JSON"),
        # valid JSON syntax, but beyond any 64-bit float
        ("1e999", RejectReason.BAD_VALUE, "out of range"),
    ],
)
def test_a_propensity_outside_0_1_or_not_finite_is_rejected_with_a_reason(
    literal: str, reason: RejectReason, mentions: str
) -> None:
    raw = orjson.dumps({**VALID["impression"], "propensity": 0.5}).replace(
        b'"propensity":0.5', b'"propensity":' + literal.encode()
    )
    assert literal.encode() in raw
    with pytest.raises(InvalidEvent) as caught:
        parse(raw)
    assert caught.value.reason == reason
    assert mentions in caught.value.message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_propensity_from_python_is_refused_naming_it(value: float) -> None:
    with pytest.raises(ValueError, match="propensity must be a finite number"):
        Impression.model_validate({**VALID["impression"], "propensity": value})


def test_an_impression_without_propensity_or_policy_still_parses_and_a_bad_policy_does_not() -> None:
    old = {k: v for k, v in VALID["impression"].items() if k not in ("propensity", "policy")}
    event = parse(old)
    assert isinstance(event, Impression) and event.propensity is None and event.policy is None
    assert parse({**old, "propensity": 1}).propensity == 1.0  # an integer 1 is a probability too
    with pytest.raises(InvalidEvent, match="policy"):
        parse({**old, "policy": "thompson"})
    with pytest.raises(InvalidEvent, match="propensity"):
        parse({**old, "propensity": "0.5"})


def test_a_sample_carries_the_propensity_and_refuses_a_bad_one() -> None:
    fields = dict(
        sample_id="s",
        request_id="r1",
        user_id="u1",
        item_id="i1",
        label=0,
        event_time=NOW,
        sparse={},
        dense={},
    )
    sample = Sample.from_json(orjson.dumps({**fields, "propensity": 0.05, "policy": "explore"}))
    assert (sample.propensity, sample.policy) == (0.05, "explore")
    assert Sample.from_json(orjson.dumps(fields)).propensity is None  # a sample written before propensities
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="propensity"):
            Sample.model_validate({**fields, "propensity": bad})


# --------------------------------------------------------------------------- the writer side

BUILT = {
    "impression": impression_event(
        event_id="e-1",
        timestamp=NOW - 10,
        request_id="r1",
        user_id="u1",
        item_id="i1",
        position=3,
        model_version="7",
        features=({"user_id": [5], "genres": [1, 2]}, {"user_age": 0.5}),
        propensity=0.25,
        policy="explore",
    ),
    "click": click_event(event_id="e-1", timestamp=NOW - 10, request_id="r1", user_id="u1", item_id="i1"),
    "user_profile": user_profile_event(
        event_id="e-1", timestamp=NOW - 10, user_id="u1", gender="F", age=31, occupation="writer", zip_code="94110"
    ),
    "item_profile": item_profile_event(
        event_id="e-1",
        timestamp=NOW - 10,
        item_id="i1",
        category="drama",
        genres=("drama", "war"),
        year=1999,
        title="A film",
    ),
}


@pytest.mark.parametrize("event_type", sorted(BUILT))
def test_every_builder_emits_what_the_parser_reads_back_to_the_same_values(event_type: str) -> None:
    built = BUILT[event_type]
    event = parse(built)
    assert isinstance(event, CLASSES[event_type])
    assert event == parse(VALID[event_type])  # the same event as the hand-written one
    assert event.model_dump(mode="json", exclude_none=True) == built
    assert event.model_extra == {}  # no field the model does not know
    assert event_key(built) == event.kafka_key()


def test_builders_start_with_the_version_and_leave_unknown_attributes_out() -> None:
    click = BUILT["click"]
    assert list(click)[:4] == ["schema_version", "event_type", "event_id", "timestamp"]
    assert click["schema_version"] == 1
    bare = [
        impression_event(event_id="e", timestamp=NOW, request_id="r", user_id="u", item_id="i", position=0),
        user_profile_event(event_id="e", timestamp=NOW, user_id="u"),
        item_profile_event(event_id="e", timestamp=NOW, item_id="i"),
    ]
    assert [sorted(set(e) - {"schema_version", "event_type", "event_id", "timestamp"}) for e in bare] == [
        ["item_id", "position", "request_id", "user_id"],
        ["user_id"],
        ["genres", "item_id"],
    ]
    for event in bare:
        assert parse(event).event_type == event["event_type"]
    with pytest.raises(ValueError, match="user_id or an item_id"):
        event_key({"event_type": "click"})


# --------------------------------------------------------------------------- type confusions, fuzzed

TYPE_CONFUSIONS = [
    (
        {**VALID["click"], "event_type": ["click"]},
        RejectReason.WRONG_TYPE,
        "'event_type': should be a string (got array)",
    ),
    ({**VALID["click"], "event_type": {"k": 1}}, RejectReason.WRONG_TYPE, "(got object)"),
    ({**VALID["click"], "event_type": True}, RejectReason.WRONG_TYPE, "(got boolean)"),
    ({**VALID["click"], "schema_version": "1"}, RejectReason.WRONG_TYPE, "'schema_version': should be an integer"),
    ({**VALID["click"], "schema_version": True}, RejectReason.WRONG_TYPE, "(got boolean)"),
    ({**VALID["click"], "schema_version": 1.0}, RejectReason.WRONG_TYPE, "(got number)"),
    ({**VALID["impression"], "position": 2**70}, RejectReason.BAD_VALUE, "1180591620717411303424 is out of range"),
    ({**VALID["impression"], "position": 2**64}, RejectReason.BAD_VALUE, "is out of range"),
    ({**VALID["click"], "schema_version": 2**70}, RejectReason.UNSUPPORTED_VERSION, "is not supported"),
    ({**VALID["click"], "user_id": 2**70}, RejectReason.WRONG_TYPE, "(got integer)"),
    ({**VALID["click"], "timestamp": 10**400}, RejectReason.BAD_VALUE, "out of range"),
    ({**VALID["impression"], "position": 3.0}, RejectReason.WRONG_TYPE, "(got number)"),
]


@pytest.mark.parametrize(("data", "reason", "mentions"), TYPE_CONFUSIONS, ids=[m[2] for m in TYPE_CONFUSIONS])
def test_type_confusions_get_their_exact_reason(data: dict, reason: RejectReason, mentions: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse(json.dumps(data).encode())  # the stdlib writes integers beyond 64 bits exactly (orjson refuses)
    assert caught.value.reason is reason
    assert mentions in caught.value.message


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
FIELDS = sorted({name for event in VALID.values() for name in event} | {"features"})


def _parses_or_gives_a_documented_reason(raw: bytes) -> None:
    try:
        parse(raw)
    except InvalidEvent as exc:
        assert exc.reason in set(RejectReason)
        assert exc.message


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_parse_event_never_raises_on_any_json_value(value) -> None:
    _parses_or_gives_a_documented_reason(json.dumps(value).encode())


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(VALID)), st.sampled_from(FIELDS), JSON)
def test_parse_event_never_raises_when_one_field_of_a_valid_event_is_any_json_value(event_type, field, value) -> None:
    _parses_or_gives_a_documented_reason(json.dumps({**VALID[event_type], field: value}).encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_parse_event_never_raises_on_any_bytes(raw: bytes) -> None:
    _parses_or_gives_a_documented_reason(raw)


def test_every_reason_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## The contract") : readme.index("<!-- room sections")]
    assert [r.value for r in RejectReason if f"`{r.value}`" not in section] == []
