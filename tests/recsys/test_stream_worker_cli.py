"""`recsys stream status --wait` against a real worker, and the worker's log: JSON lines only."""

from __future__ import annotations

import orjson
import pytest

from tests.recsys.test_cli import recsys
from tests.streaming.test_streaming_kafka import LAUNCHERS, PARTITIONS, make_setup, simulation  # noqa: F401 - a fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a real worker: Feast and Faust start-up


def _table(stdout: str) -> dict[int, tuple[str, int, int]]:
    """partition -> (committed, end, lag) from the status table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 4 and cells[0].isdigit():
            rows[int(cells[0])] = (cells[1], int(cells[2]), int(cells[3]))
    return rows


def test_status_wait_returns_once_a_real_worker_drained_the_stream_and_its_log_is_json_lines(
    make_setup,  # noqa: F811 - the fixture imported above
    monkeypatch,
) -> None:
    # Faust's own info lines too: they must come out in the same format
    monkeypatch.setitem(LAUNCHERS, "recsys-info", [*LAUNCHERS["recsys"], "--loglevel", "info"])

    _, records = simulation(requests=120, bad_fraction=0.05)
    setup = make_setup()
    published = setup.publish(records)
    assert published == len(records)

    before = recsys("stream", "status", env=setup.env)
    assert before.returncode == 0, before.stderr
    assert "drained: no" in before.stdout and "open impressions: unknown" in before.stdout
    assert sum(lag for _, _, lag in _table(before.stdout).values()) == published

    worker = setup.start_worker("recsys-info")
    # generous: a worker's start-up (Feast, Faust, the group join) on a loaded machine; a bound, not a timing
    done = recsys("stream", "status", "--wait", "--timeout", "240", env=setup.env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr + worker.tail()
    assert "drained: yes" in done.stdout and "lag: 0 records" in done.stdout
    rows = _table(done.stdout)
    assert sorted(rows) == list(range(PARTITIONS))
    assert sum(end for _, end, _ in rows.values()) == published
    assert all(committed == str(end) for committed, end, _ in rows.values() if end)
    assert "open impressions: unknown" not in done.stdout  # the worker's joins changelog is read
    # the simulation sends every click after its impression: none is held once the stream drained
    assert "pending clicks: 0 (clicks held for their impression" in done.stdout

    setup.stop_all()
    text = worker.log.read_text()
    assert "\x1b" not in text and "\x08" not in text  # no colours, no spinner's cursor codes
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "the worker logged nothing"
    for line in lines:
        entry = orjson.loads(line)  # every line one JSON object, Faust's and aiokafka's lines included
        assert isinstance(entry, dict) and {"ts", "level", "logger", "msg"} <= entry.keys(), line
    loggers = {orjson.loads(line)["logger"].split(".")[0] for line in lines}
    assert {"streaming", "faust"} <= loggers, loggers
