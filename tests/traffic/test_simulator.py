"""The traffic simulator: reproducible, event-time ordered, realistic AUC ceiling, bad records that fail validation."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from core.metrics import roc_auc
from feature_repo.contract import InvalidEvent, RejectReason, parse_event
from traffic.recording import read_jsonl, rebase, write_jsonl
from traffic.simulator import BAD_KINDS, SimConfig, Simulation

START = 1_800_000_000.0
EXPECTED_REASON = {
    "bad_json": RejectReason.BAD_JSON,
    "wrong_type": RejectReason.WRONG_TYPE,
    "missing_field": RejectReason.MISSING_FIELD,
    "unknown_event_type": RejectReason.UNKNOWN_EVENT_TYPE,
    "future_timestamp": RejectReason.FUTURE_TIMESTAMP,
    "oversized": RejectReason.OVERSIZED,
    "non_utf8": RejectReason.NOT_UTF8,
}


def small(**overrides) -> SimConfig:
    return SimConfig(**{"users": 200, "items": 100, "requests": 500, "start_time": START, **overrides})


def test_same_seed_gives_identical_bytes_and_other_seeds_differ() -> None:
    first = [r.value for r in Simulation(small(seed=7)).records()]
    second = [r.value for r in Simulation(small(seed=7)).records()]
    other = [r.value for r in Simulation(small(seed=8)).records()]
    assert first == second
    assert first != other


def test_events_are_valid_and_in_event_time_order() -> None:
    sim = Simulation(small())
    records = list(sim.records())
    times = [r.timestamp for r in records]
    assert times == sorted(times)
    for record in records:
        event = parse_event(record.value, now=START + 3600)
        assert record.kind == event.event_type
        assert record.key == event.kafka_key()
    assert sim.stats.events["impression"] == 500 * 10 == len(sim.truth)
    assert sim.stats.events["click"] == sum(t.clicked for t in sim.truth)
    assert sim.stats.events["user_profile"] == 200 and sim.stats.events["item_profile"] == 100


def test_every_click_follows_its_impression() -> None:
    sim = Simulation(small())
    shown: dict[tuple[str, str], float] = {}
    for record in sim.records():
        event = orjson.loads(record.value)
        key = (event.get("request_id"), event.get("item_id"))
        if event["event_type"] == "impression":
            shown[key] = event["timestamp"]
        elif event["event_type"] == "click":
            assert key in shown and event["timestamp"] > shown[key]


def test_oracle_auc_is_a_realistic_ceiling_for_default_settings() -> None:
    sim = Simulation(SimConfig(start_time=START))
    for _ in sim.records():
        pass
    auc = sim.oracle_auc()
    assert 0.6 <= auc <= 0.95, auc
    assert 0.02 < sim.click_through_rate() < 0.5


def test_position_bias_lowers_click_rate_further_down_the_slate() -> None:
    sim = Simulation(small(requests=3000))
    for _ in sim.records():
        pass
    by_position = np.zeros(10)
    for truth in sim.truth:
        by_position[truth.position] += truth.clicked
    assert by_position[0] > by_position[9] * 1.3


def test_bad_records_are_injected_of_every_kind_and_each_fails_with_its_reason() -> None:
    sim = Simulation(small(bad_fraction=0.05, requests=2000))
    seen: dict[str, int] = {}
    good = 0
    for record in sim.records():
        if record.kind.startswith("bad:"):
            kind = record.kind[4:]
            seen[kind] = seen.get(kind, 0) + 1
            with pytest.raises(InvalidEvent) as caught:
                parse_event(record.value, now=START + 3600)
            assert caught.value.reason is EXPECTED_REASON[kind]
        else:
            parse_event(record.value, now=START + 3600)
            good += 1
    assert set(seen) == set(BAD_KINDS)
    assert good == sum(sim.stats.events.values())  # bad records come in addition, never instead of good ones


def test_roc_auc_matches_known_values() -> None:
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == pytest.approx(0.5)
    assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


@pytest.mark.parametrize(
    "field, value", [("users", 0), ("slate_size", 1000), ("bad_fraction", 1.5), ("requests_per_second", 0)]
)
def test_invalid_configuration_is_rejected(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        small(**{field: value})


def test_jsonl_round_trip_keeps_bytes_and_reports_bad_lines(tmp_path) -> None:
    sim = Simulation(small(bad_fraction=0.05, requests=100))
    records = list(sim.records())
    path = tmp_path / "events.jsonl"
    assert write_jsonl(records, path) == len(records)
    with open(path, "ab") as handle:
        handle.write(b'this is not json\n{"key": "u1"}\n')
    errors: list[str] = []
    loaded = list(read_jsonl(path, errors))
    assert [(r.key, r.value, r.timestamp) for r in loaded] == [(r.key, r.value, r.timestamp) for r in records]
    assert len(errors) == 2 and ":" in errors[0]

    shifted = list(rebase(loaded, START + 1000))
    assert shifted[0].timestamp == START + 1000
    first_valid = next(r for r in shifted if r.kind == "user_profile")
    assert orjson.loads(first_valid.value)["timestamp"] == pytest.approx(START + 1000)
    bad_json = next(r for r, orig in zip(shifted, loaded) if r.kind == "bad:bad_json")
    assert bad_json.value == next(o.value for o in loaded if o.kind == "bad:bad_json")


def test_replay_files_are_read_in_either_format(tmp_path) -> None:
    from feature_repo.contract import click_event
    from traffic.recording import is_recording, read_any, shift_times, time_span

    sim = Simulation(small(requests=5))
    recording = tmp_path / "recording.jsonl"
    write_jsonl(sim.records(), recording)
    plain = tmp_path / "client.jsonl"
    events = [
        click_event(event_id=f"c{n}", timestamp=START + n, request_id="r", user_id="u7", item_id="i") for n in (0, 9)
    ]
    plain.write_bytes(b"\n" + b"\n".join(orjson.dumps(e) for e in events) + b'\n{"no": "time"}\n[1]\n')
    assert is_recording(recording) and not is_recording(plain)

    errors: list[str] = []
    loaded = list(read_any(plain, errors))
    assert [(r.key, r.timestamp, r.kind) for r in loaded] == [(b"u7", START, "click"), (b"u7", START + 9, "click")]
    assert len(errors) == 2 and all("not an event line" in e for e in errors)
    assert time_span(loaded) == (START, START + 9)
    moved = list(shift_times(loaded, 100.0))
    assert [orjson.loads(r.value)["timestamp"] for r in moved] == [START + 100, START + 109]
    assert len(list(read_any(recording, []))) == sim.stats.total
