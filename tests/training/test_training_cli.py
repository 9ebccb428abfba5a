"""`recsys train` says clearly which service is unreachable, and rejects bad options, before any rank starts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from core.procs import free_port
from recsys.cli import app

runner = CliRunner()


def _env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def _dead_url() -> str:
    return f"127.0.0.1:{free_port()}"


def test_bad_options_are_rejected() -> None:
    result = runner.invoke(app, ["train", "--ranks", "0"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["train", "--truth", "/nonexistent/truth.jsonl"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["train", "--topic", "no spaces allowed"])
    assert result.exit_code == 2 and "invalid topic name" in result.output


def test_bad_backend_setting_is_a_clear_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    result = runner.invoke(app, ["train", "--backend", "mpi"])
    assert result.exit_code == 2
    assert "invalid configuration" in result.output and "RECSYS_TRAIN_BACKEND" in result.output


@pytest.mark.integration
def test_unreachable_kafka_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    dead = _dead_url()
    _env(monkeypatch, RECSYS_KAFKA_BOOTSTRAP=dead, RECSYS_MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/m.db")
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1
    assert f"Kafka at {dead} is unreachable" in result.output


@pytest.mark.integration
def test_unreachable_parameter_service_is_named(
    monkeypatch: pytest.MonkeyPatch, kafka_bootstrap: str, tmp_path
) -> None:
    dead = f"redis://{_dead_url()}/0"
    _env(
        monkeypatch,
        RECSYS_KAFKA_BOOTSTRAP=kafka_bootstrap,
        RECSYS_PS_SHARDS=json.dumps([dead]),
        RECSYS_MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/m.db",
    )
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1
    assert "parameter service" in result.output and "RECSYS_PS_SHARDS" in result.output


@pytest.mark.integration
def test_unreachable_mlflow_is_named(monkeypatch: pytest.MonkeyPatch, kafka_bootstrap: str, redis_server) -> None:
    dead = f"http://{_dead_url()}"
    _env(
        monkeypatch,
        RECSYS_KAFKA_BOOTSTRAP=kafka_bootstrap,
        RECSYS_PS_SHARDS=json.dumps([redis_server.url]),
        RECSYS_PS_NAMESPACE="trcli",
        RECSYS_MLFLOW_TRACKING_URI=dead,
    )
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1
    assert f"MLflow at {dead} is unreachable" in result.output


def test_online_trainer_rejects_bad_settings_with_the_variable_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, RECSYS_ONLINE_FLUSH_INTERVAL_S="30")  # more than the 5 s the issue allows
    result = runner.invoke(app, ["train", "online"])
    assert result.exit_code == 2
    assert "invalid configuration" in result.output and "RECSYS_ONLINE_FLUSH_INTERVAL_S" in result.output
    result = runner.invoke(app, ["train", "online", "--metrics-port", "70000"])
    assert result.exit_code == 2


@pytest.mark.integration
def test_online_trainer_refuses_a_dense_reset_without_the_weights_to_reset_to() -> None:
    result = runner.invoke(app, ["train", "online", "--reset-dense"])
    assert result.exit_code == 2
    assert "--reset-dense needs --dense" in result.output


def test_online_trainer_names_an_unreachable_parameter_service(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"redis://{_dead_url()}/0"
    _env(monkeypatch, RECSYS_PS_SHARDS=json.dumps([dead]), RECSYS_PS_TIMEOUT_S="1")
    result = runner.invoke(app, ["train", "online"])
    assert result.exit_code == 1
    assert "the parameter service" in result.output and "is unusable" in result.output


@pytest.mark.integration
def test_online_trainer_names_unreachable_kafka(monkeypatch: pytest.MonkeyPatch, redis_server) -> None:
    dead = _dead_url()
    _env(
        monkeypatch,
        RECSYS_KAFKA_BOOTSTRAP=dead,
        RECSYS_PS_SHARDS=json.dumps([redis_server.url]),
        RECSYS_PS_NAMESPACE="onlinecli",
    )
    result = runner.invoke(app, ["train", "online"])
    assert result.exit_code == 1
    assert f"Kafka at {dead} is unreachable" in result.output
