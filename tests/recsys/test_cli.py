"""The CLI: lists every room, rejects bad arguments and configuration with clear messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import orjson
import pytest

from core.settings import PROJECT_ROOT


def recsys(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=PROJECT_ROOT,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_help_lists_every_room() -> None:
    done = recsys("--help")
    assert done.returncode == 0
    for command in ("services", "topics", "simulate", "replay", "events", "stream", "ps", "train", "serve"):
        assert command in done.stdout


def test_bad_arguments_are_rejected_without_a_traceback() -> None:
    done = recsys("simulate", "--users", "0", "--out", "/dev/null")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "users" in done.stderr


def test_bad_configuration_is_reported(tmp_path) -> None:
    done = recsys("topics", env={"RECSYS_KAFKA_BOOTSTRAP": "no-port-here"})
    assert done.returncode == 2
    assert "invalid configuration" in done.stderr and "host:port" in done.stderr


def test_unreachable_kafka_is_a_clear_error(tmp_path) -> None:
    from core.procs import free_port

    done = recsys("simulate", "--requests", "5", env={"RECSYS_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"})
    assert done.returncode == 1
    assert "unreachable" in done.stderr and "recsys services up" in done.stderr
    assert "Traceback" not in done.stderr


def test_simulate_to_file_reports_oracle_auc(tmp_path) -> None:
    out, truth = tmp_path / "events.jsonl", tmp_path / "truth.jsonl"
    done = recsys(
        "simulate",
        "--requests",
        "300",
        "--users",
        "100",
        "--items",
        "50",
        "--seed",
        "3",
        "--start-time",
        "1800000000",
        "--out",
        str(out),
        "--truth",
        str(truth),
    )
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["impressions"] == 3000 and 0.5 < report["oracle_auc"] < 1.0
    assert len(out.read_bytes().splitlines()) == report["records"]
    assert len(truth.read_bytes().splitlines()) == 3000


@pytest.mark.integration
def test_simulate_replay_and_read_back_through_kafka(tmp_path, kafka_bootstrap: str, unique_topic: str) -> None:
    env = {"RECSYS_KAFKA_BOOTSTRAP": kafka_bootstrap, "RECSYS_TOPIC_EVENTS": unique_topic}
    path = tmp_path / "events.jsonl"
    made = recsys(
        "simulate",
        "--requests",
        "100",
        "--users",
        "30",
        "--items",
        "20",
        "--bad-fraction",
        "0.05",
        "--out",
        str(path),
        env=env,
    )
    assert made.returncode == 0, made.stderr
    records = orjson.loads(made.stdout)["records"]
    with open(path, "ab") as handle:
        handle.write(b"garbage line\n")
    replayed = recsys("replay", str(path), env=env)
    assert replayed.returncode == 3  # published the good lines, reported the bad one
    assert f"published {records} records" in replayed.stderr and "1 malformed lines skipped" in replayed.stderr

    summary = recsys("events", "summary", env=env)
    assert summary.returncode == 0, summary.stderr
    assert f"{records} records" in summary.stdout
    assert "impression" in summary.stdout and "invalid:" in summary.stdout


@pytest.mark.integration
def test_model_show_and_rollback_without_a_champion_say_so(tmp_path, redis_server) -> None:
    env = {
        "RECSYS_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "RECSYS_PS_SHARDS": json.dumps([redis_server.url]),
        "RECSYS_PS_NAMESPACE": "climodel",
    }
    shown = recsys("model", "show", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["champion"] is None
    done = recsys("model", "rollback", env=env)
    assert done.returncode == 1 and "no champion to roll back" in done.stderr and "Traceback" not in done.stderr
    down = recsys("model", "show", env={**env, "RECSYS_PS_SHARDS": '["redis://127.0.0.1:9/0"]'})
    assert down.returncode == 1 and "parameter service" in down.stderr and "Traceback" not in down.stderr
