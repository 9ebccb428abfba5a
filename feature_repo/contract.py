"""The wire contract every room shares: events on ``recsys.events`` and samples on ``recsys.samples``.

JSON on the wire, one object per Kafka record, versioned by ``schema_version``. Unknown
fields are kept (``extra="allow"``) so newer clients do not lose data through older
workers. Types are strict: ``"3"`` is not a position, ``42`` is not a user id.

``parse_event`` is the one entry point for raw bytes: it either returns an event model or
raises ``InvalidEvent`` with a machine-readable reason (for dead-lettering and metrics)
and a message a person can act on.

The writer side sits beside it: ``impression_event``, ``click_event``, ``user_profile_event``
and ``item_profile_event`` build the JSON object of one event (``orjson.dumps`` it), and
``event_key`` gives its Kafka key. They do not validate (serving and the simulator call them
on hot paths); tests/feature_repo/test_contract.py parses what each emits back with ``parse_event``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

SCHEMA_VERSION: Literal[1] = 1

EVENT_TYPES = ("impression", "click", "user_profile", "item_profile")

Id = Annotated[str, Field(min_length=1, max_length=256)]

# The policies that choose a served list (serving.exploration): the greedy top k, or an exploration draw.
EXPLOIT: Literal["exploit"] = "exploit"
EXPLORE: Literal["explore"] = "explore"
Policy = Literal["exploit", "explore"]
POLICIES: tuple[Policy, ...] = (EXPLOIT, EXPLORE)


def _finite_propensity(value: Any) -> Any:
    # before the bounds: NaN fails them with a message ("should be <= 1") that hides the real problem
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"propensity must be a finite number in (0, 1], got {value}")
    return value


# P(this item at this position) under the policy that logged the impression; 0 cannot have been shown
Propensity = Annotated[
    float,
    Field(gt=0, le=1, description="probability that the logging policy showed this item at this position"),
]


class RejectReason(StrEnum):
    NOT_UTF8 = "not_utf8"
    OVERSIZED = "oversized"
    BAD_JSON = "bad_json"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    BAD_VALUE = "bad_value"
    FUTURE_TIMESTAMP = "future_timestamp"
    STALE_TIMESTAMP = "stale_timestamp"


class InvalidEvent(ValueError):
    """A raw record that breaks the contract; ``reason`` is one of RejectReason."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


class FeatureValues(BaseModel):
    """Encoded features as the model sees them: ids per sparse table, values per dense feature."""

    model_config = ConfigDict(strict=True, extra="forbid")

    sparse: dict[str, list[Annotated[int, Field(ge=0, lt=1 << 63)]]]
    dense: dict[str, float]

    @field_validator("dense")
    @classmethod
    def _finite(cls, value: dict[str, float]) -> dict[str, float]:
        for name, number in value.items():
            if not math.isfinite(number):
                raise ValueError(f"dense feature {name!r} is not finite")
        return value


class _Event(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Id
    timestamp: Annotated[float, Field(gt=0, description="event time, seconds since the Unix epoch (UTC)")]

    @field_validator("timestamp")
    @classmethod
    def _finite_time(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("timestamp must be finite")
        return value

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    def kafka_key(self) -> bytes:
        """Records are keyed by user id (item profiles by item id) so one user's events stay ordered."""
        return event_key({"user_id": getattr(self, "user_id", None), "item_id": getattr(self, "item_id", None)})


class Impression(_Event):
    event_type: Literal["impression"] = "impression"
    request_id: Id
    user_id: Id
    item_id: Id
    position: Annotated[int, Field(ge=0, le=10_000)]
    model_version: str | None = None
    features: FeatureValues | None = Field(None, description="feature values serving used (feature logging)")
    propensity: Propensity | None = None
    policy: Policy | None = Field(None, description="the policy that chose the list: exploit (greedy) or explore")

    _propensity_finite = field_validator("propensity", mode="before")(_finite_propensity)


class Click(_Event):
    event_type: Literal["click"] = "click"
    request_id: Id
    user_id: Id
    item_id: Id


class UserProfile(_Event):
    event_type: Literal["user_profile"] = "user_profile"
    user_id: Id
    gender: str | None = None
    age: Annotated[int, Field(ge=0, le=150)] | None = None
    occupation: str | None = None
    zip_code: Annotated[str, Field(max_length=32)] | None = None


class ItemProfile(_Event):
    event_type: Literal["item_profile"] = "item_profile"
    item_id: Id
    category: str | None = None
    genres: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=64)] = Field(default_factory=list)
    year: Annotated[int, Field(ge=1800, le=2200)] | None = None
    title: Annotated[str, Field(max_length=1024)] | None = None


Event = Annotated[Impression | Click | UserProfile | ItemProfile, Field(discriminator="event_type")]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_CLASSES: dict[str, type[Impression] | type[Click] | type[UserProfile] | type[ItemProfile]] = {
    "impression": Impression,
    "click": Click,
    "user_profile": UserProfile,
    "item_profile": ItemProfile,
}


class Sample(BaseModel):
    """One labelled training example: one impression and whether it was clicked."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    sample_id: Id
    request_id: Id
    user_id: Id
    item_id: Id
    label: Literal[0, 1]
    event_time: float
    position: int = 0
    model_version: str | None = None
    # the impression's, when its logging policy said (None: unknown, e.g. impressions of an open-loop client)
    propensity: Propensity | None = None
    policy: Policy | None = None
    sparse: dict[str, list[int]]
    dense: dict[str, float]

    _propensity_finite = field_validator("propensity", mode="before")(_finite_propensity)

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Sample:
        return cls.model_validate_json(raw)


def sample_id(request_id: str, item_id: str) -> str:
    """Deterministic id of the sample of one impression: the same impression always yields the same id."""
    return hashlib.blake2b(f"{request_id}\x1f{item_id}".encode(), digest_size=16).hexdigest()


_TYPE_ERRORS = ("_type", "literal_error", "model_type", "dict_type", "list_type", "is_instance_of", "none_required")
_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _type_name(value: object) -> str:
    """The JSON name of a parsed value's type (what a client wrote, not Python's name for it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "value")


def _classify(error: ValidationError) -> tuple[RejectReason, str]:
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "(root)"
    kind = first["type"]
    value = first.get("input")
    if kind == "missing":
        return RejectReason.MISSING_FIELD, f"missing field {where!r}"
    if kind == "float_type" and type(value) is int:  # an integer beyond any float (only the exact re-parse has one)
        return RejectReason.BAD_VALUE, f"field {where!r}: integer out of range (beyond a 64-bit float)"
    if kind.endswith(_TYPE_ERRORS) or kind in _TYPE_ERRORS:
        return RejectReason.WRONG_TYPE, f"field {where!r}: {first['msg']} (got {_type_name(value)})"
    if kind in _BOUND_ERRORS:
        shown = str(value) if len(str(value)) <= 32 else f"{str(value)[:29]}..."
        return RejectReason.BAD_VALUE, f"field {where!r}: {shown} is out of range ({first['msg']})"
    return RejectReason.BAD_VALUE, f"field {where!r}: {first['msg']}"


def _exact(raw: bytes) -> Any:
    """The record parsed keeping integers beyond 64 bits as integers (orjson reads them as floats), or None."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # more than 4300 digits, or nested deeper than the stdlib parser goes
        return None


def _validate(data: Any) -> Event:
    """The checks after JSON syntax: object shape, event type, schema version, fields."""
    if not isinstance(data, dict):
        raise InvalidEvent(RejectReason.NOT_AN_OBJECT, f"expected a JSON object, got {_type_name(data)}")
    if "event_type" not in data:
        raise InvalidEvent(RejectReason.MISSING_FIELD, "missing field 'event_type'")
    event_type = data["event_type"]
    if not isinstance(event_type, str):
        raise InvalidEvent(
            RejectReason.WRONG_TYPE, f"field 'event_type': should be a string (got {_type_name(event_type)})"
        )
    if event_type not in EVENT_CLASSES:
        raise InvalidEvent(
            RejectReason.UNKNOWN_EVENT_TYPE,
            f"unknown event_type {event_type[:64]!r}; expected one of {', '.join(EVENT_TYPES)}",
        )
    version = data.get("schema_version", SCHEMA_VERSION)
    if type(version) is not int:  # "1", 1.0 and true are type errors, not versions
        raise InvalidEvent(
            RejectReason.WRONG_TYPE, f"field 'schema_version': should be an integer (got {_type_name(version)})"
        )
    if version != SCHEMA_VERSION:
        shown = str(version) if len(str(version)) <= 16 else f"{str(version)[:13]}..."
        raise InvalidEvent(
            RejectReason.UNSUPPORTED_VERSION,
            f"schema_version {shown} is not supported (this worker reads {SCHEMA_VERSION})",
        )
    try:
        return EVENT_CLASSES[event_type].model_validate(data)
    except ValidationError as exc:
        raise InvalidEvent(*_classify(exc)) from None


def parse_event(
    raw: bytes,
    *,
    max_bytes: int = 64 * 1024,
    max_future_skew_s: float = 300.0,
    max_age_s: float = 30 * 24 * 3600.0,
    now: float | None = None,
) -> Event:
    """Validate one raw Kafka record against the contract.

    Raises InvalidEvent with the first problem found, checked in this order: size, UTF-8,
    JSON syntax, object shape, event type, schema version, fields, timestamp window. Never
    raises anything else, whatever the bytes (tests/feature_repo/test_contract.py fuzzes it).
    """
    if len(raw) > max_bytes:
        raise InvalidEvent(RejectReason.OVERSIZED, f"{len(raw)} bytes exceeds the {max_bytes}-byte limit")
    try:
        data = orjson.loads(raw)  # checks UTF-8 too; the failure is told apart below
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as not_utf8:
            raise InvalidEvent(RejectReason.NOT_UTF8, f"not valid UTF-8 at byte {not_utf8.start}") from None
        if "number is infinity" in str(exc):  # valid JSON, a number beyond a 64-bit float
            raise InvalidEvent(RejectReason.BAD_VALUE, f"a number is out of range: {exc}") from None
        raise InvalidEvent(RejectReason.BAD_JSON, f"invalid JSON: {exc}") from None
    try:
        event = _validate(data)
    except InvalidEvent as exc:
        # orjson reads an integer beyond 64 bits as a float: the exact parse tells "out of range" from "got number"
        if exc.reason is not RejectReason.WRONG_TYPE or (exact := _exact(raw)) is None:
            raise
        event = _validate(exact)  # raises the exact reason
    current = time.time() if now is None else now
    if event.timestamp > current + max_future_skew_s:
        raise InvalidEvent(
            RejectReason.FUTURE_TIMESTAMP,
            f"timestamp {event.timestamp:.3f} is {event.timestamp - current:.0f}s in the future "
            f"(limit {max_future_skew_s:.0f}s)",
        )
    if event.timestamp < current - max_age_s:
        raise InvalidEvent(
            RejectReason.STALE_TIMESTAMP, f"timestamp {event.timestamp:.3f} is older than {max_age_s:.0f}s"
        )
    return event


def event_from_dict(data: dict[str, Any]) -> Event:
    """Build an event from a trusted dict (no timestamp window check); raises pydantic errors."""
    return EVENT_ADAPTER.validate_python(data)


# --------------------------------------------------------------------------- the writer side

# Feature values an impression logs, as the spec's encoders give them: (sparse ids, dense values).
LoggedFeatures = tuple[Mapping[str, Sequence[int]], Mapping[str, float]]


def _head(event_type: str, event_id: str, timestamp: float) -> dict[str, Any]:
    # key order is part of the bytes: the simulator promises same seed => same bytes
    return {"schema_version": SCHEMA_VERSION, "event_type": event_type, "event_id": event_id, "timestamp": timestamp}


def impression_event(
    *,
    event_id: str,
    timestamp: float,
    request_id: str,
    user_id: str,
    item_id: str,
    position: int,
    model_version: str | None = None,
    features: LoggedFeatures | None = None,
    propensity: float | None = None,
    policy: Policy | None = None,
) -> dict[str, Any]:
    """An ``impression``: ``item_id`` was shown to ``user_id`` at ``position`` of request ``request_id``.

    ``propensity`` and ``policy`` come from the policy that chose the list (``serving.exploration``).
    """
    event = _head("impression", event_id, timestamp)
    event.update(request_id=request_id, user_id=user_id, item_id=item_id, position=position)
    if model_version is not None:
        event["model_version"] = model_version
    if features is not None:
        event["features"] = {"sparse": features[0], "dense": features[1]}
    _put_known(event, propensity=propensity, policy=policy)
    return event


def click_event(*, event_id: str, timestamp: float, request_id: str, user_id: str, item_id: str) -> dict[str, Any]:
    """A ``click`` on the impression of ``item_id`` in request ``request_id``."""
    event = _head("click", event_id, timestamp)
    event.update(request_id=request_id, user_id=user_id, item_id=item_id)
    return event


def user_profile_event(
    *,
    event_id: str,
    timestamp: float,
    user_id: str,
    gender: str | None = None,
    age: int | None = None,
    occupation: str | None = None,
    zip_code: str | None = None,
) -> dict[str, Any]:
    """A ``user_profile``; attributes left None are left out (the parser reads them as unknown)."""
    event = _head("user_profile", event_id, timestamp)
    event["user_id"] = user_id
    _put_known(event, gender=gender, age=age, occupation=occupation, zip_code=zip_code)
    return event


def item_profile_event(
    *,
    event_id: str,
    timestamp: float,
    item_id: str,
    category: str | None = None,
    genres: Sequence[str] = (),
    year: int | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """An ``item_profile``; attributes left None are left out, ``genres`` is always written."""
    event = _head("item_profile", event_id, timestamp)
    event["item_id"] = item_id
    _put_known(event, category=category)
    event["genres"] = list(genres)
    _put_known(event, year=year, title=title)
    return event


def _put_known(event: dict[str, Any], **attributes: object) -> None:
    for name, value in attributes.items():
        if value is not None:
            event[name] = value


def event_key(event: Mapping[str, Any]) -> bytes:
    """The Kafka key of an event: its user id, or for an item profile its item id (one user's events stay ordered)."""
    owner = event.get("user_id") or event.get("item_id")
    if not isinstance(owner, str) or not owner:
        raise ValueError("an event needs a user_id or an item_id to be keyed")
    return owner.encode()
