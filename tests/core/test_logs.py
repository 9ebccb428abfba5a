"""core.logs: JSON lines without terminal codes, and repeats of one error rate-limited with their count."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from core.logs import JsonFormatter, RepeatFilter, configure_json_logging, strip_escapes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def root_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def _lines(stream: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_a_broker_outage_flood_is_one_line_per_window_with_the_count_of_the_dropped(root_restored) -> None:
    stream = io.StringIO()
    handler = configure_json_logging("warning", stream=stream, repeat_window_s=10.0)
    clock = Clock()
    handler.repeats.clock = clock
    client = logging.getLogger("aiokafka.test")

    def outage(seconds: int, per_second: int) -> None:
        for _ in range(seconds * per_second):
            client.error("Unable connect to node with id %s: %s", 1, "Connect call failed")
            clock.now += 1 / per_second

    outage(30, 60)  # ~30 s of a restarting broker at 60 identical errors a second: 1,800 calls
    lines = _lines(stream)
    assert 3 <= len(lines) <= 4  # one per 10 s window
    assert all(line["msg"] == "Unable connect to node with id 1: Connect call failed" for line in lines)
    assert "repeated" not in lines[0] and all(line["repeated"] > 500 for line in lines[1:])

    clock.now += 10  # the broker is back: the next line of any kind first writes the count of the last window
    logging.getLogger("aiokafka.test").warning("something else")
    lines = _lines(stream)
    assert lines[-1]["msg"] == "something else" and lines[-2]["repeated"] > 500
    let_through, summary = lines[:-2], lines[-2]
    assert sum(line.get("repeated", 0) for line in let_through) + summary["repeated"] + len(let_through) == 30 * 60

    outage(1, 2)  # two more inside the window just reported: dropped, and counted when the handler closes
    handler.close()
    assert _lines(stream)[-1]["repeated"] == 2


def test_distinct_errors_and_info_lines_are_never_limited(root_restored) -> None:
    stream = io.StringIO()
    configure_json_logging("info", stream=stream, repeat_window_s=60.0)
    log = logging.getLogger("streaming.test")
    for partition in range(4):
        log.info("took partition %d", partition)  # one template, four facts
    log.error("first error")
    log.error("second error")
    log.warning("first error")  # another level: another message
    assert [line["msg"] for line in _lines(stream)] == [
        "took partition 0",
        "took partition 1",
        "took partition 2",
        "took partition 3",
        "first error",
        "second error",
        "first error",
    ]


def test_a_zero_window_limits_nothing_and_a_negative_one_is_refused() -> None:
    limiter = RepeatFilter(0.0)
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "same", None, None)
    assert all(limiter.filter(record) for _ in range(5))
    with pytest.raises(ValueError, match="window_s"):
        RepeatFilter(-1.0)


def test_the_limiter_forgets_the_oldest_messages_beyond_its_bound_and_keeps_their_counts() -> None:
    limiter = RepeatFilter(10.0, max_keys=3, clock=Clock())
    for n in range(10):
        record = logging.LogRecord("x", logging.ERROR, __file__, n, f"error {n}", None, None)
        assert limiter.filter(record)
        assert not limiter.filter(record)  # each dropped once
    assert len(limiter._seen) == 3
    due = limiter.due(flush=True)
    assert sorted(r.msg for r in due) == [f"error {n}" for n in range(10)] and {r.repeated for r in due} == {1}


def test_one_json_object_per_line_without_terminal_codes() -> None:
    try:
        raise RuntimeError("\x1b[31mboom\x1b[0m")
    except RuntimeError:
        import sys

        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "faust.worker", logging.ERROR, __file__, 1, "\x1b[?25l[^Worker]: %s\nsecond line\x08", ("Error",), exc_info
    )
    record.fields = {"partition": 3}
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\x1b" not in line
    entry = orjson.loads(line)
    assert entry["msg"] == "[^Worker]: Error\nsecond line"
    assert entry["level"] == "error" and entry["logger"] == "faust.worker" and entry["partition"] == 3
    assert "RuntimeError: boom" in entry["exc"]
    assert strip_escapes("\x1b[1;32mok\x1b[0m \x1b[?25h") == "ok "


def test_library_handlers_are_replaced_and_warnings_come_out_as_json(root_restored) -> None:
    stream = io.StringIO()
    logging.getLogger().addHandler(logging.StreamHandler(io.StringIO()))  # a library's own handler
    named = logging.getLogger("streaming.own")
    named.addHandler(logging.StreamHandler(io.StringIO()))
    named.propagate = False
    configure_json_logging("warning", stream=stream, levels={"streaming": "info"})
    assert len(logging.getLogger().handlers) == 1
    logging.getLogger("streaming").info("kept")  # a named logger's own level
    logging.getLogger("faust").info("dropped")  # below the root level
    import warnings

    warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    lines = _lines(stream)
    assert [line["msg"] for line in lines][0] == "kept"
    assert any("deprecated thing" in line["msg"] and line["logger"] == "py.warnings" for line in lines)
    assert all(line["msg"] != "dropped" for line in lines)
