"""Settings: one model per room composed into one, the same environment variables as ever, no silent typos."""

from __future__ import annotations

import warnings

import pytest
from pydantic import ValidationError

from core.settings import (
    SECTIONS,
    Settings,
    UnknownSettingWarning,
    describe_error,
    environment_names,
    load,
    unknown_variables,
)

# the variables of the one flat settings class the sections replaced: operators' deployments set these
VARIABLES_BEFORE_THE_SPLIT = {
    "RECSYS_KAFKA_BOOTSTRAP",
    "RECSYS_TOPIC_EVENTS",
    "RECSYS_TOPIC_SAMPLES",
    "RECSYS_TOPIC_DEADLETTER",
    "RECSYS_TOPIC_LATE",
    "RECSYS_TOPIC_PARTITIONS",
    "RECSYS_REDIS_URL",
    "RECSYS_PS_SHARDS",
    "RECSYS_PS_REPLICAS",
    "RECSYS_PS_NAMESPACE",
    "RECSYS_PS_ROWS_PER_BUCKET",
    "RECSYS_PS_TIMEOUT_S",
    "RECSYS_PS_LOCK_TTL_S",
    "RECSYS_PS_LOCK_WAIT_S",
    "RECSYS_PS_LOG_RETENTION_S",
    "RECSYS_PS_FAILOVER_TIMEOUT_S",
    "RECSYS_PS_FAILOVER_PROBE_S",
    "RECSYS_PS_REPLICATOR_POLL_S",
    "RECSYS_MLFLOW_TRACKING_URI",
    "RECSYS_FEAST_REPO_PATH",
    "RECSYS_RUN_DIR",
    "RECSYS_CACHE_DIR",
    "RECSYS_KAFKA_VERSION",
    "RECSYS_KAFKA_PORT",
    "RECSYS_KAFKA_CONTROLLER_PORT",
    "RECSYS_REDIS_PORT",
    "RECSYS_SERVICE_START_TIMEOUT_S",
    "RECSYS_MAX_EVENT_BYTES",
    "RECSYS_MAX_FUTURE_SKEW_S",
    "RECSYS_MAX_EVENT_AGE_S",
    "RECSYS_TRAIN_RANKS",
    "RECSYS_TRAIN_BACKEND",
    "RECSYS_TRAIN_BATCH_SIZE",
    "RECSYS_TRAIN_EPOCHS",
    "RECSYS_TRAIN_EMBEDDING_DIM",
    "RECSYS_TRAIN_DENSE_ARCH",
    "RECSYS_TRAIN_OVER_ARCH",
    "RECSYS_TRAIN_EMBEDDING_LR",
    "RECSYS_TRAIN_DENSE_LR",
    "RECSYS_TRAIN_EVAL_FRACTION",
    "RECSYS_TRAIN_INIT_STD",
    "RECSYS_TRAIN_SEED",
    "RECSYS_TRAIN_EXPERIMENT",
    "RECSYS_TRAIN_MODEL_NAME",
    "RECSYS_TRAIN_CRASH_AFTER_STEPS",
    "RECSYS_SERVING_HOST",
    "RECSYS_SERVING_PORT",
    "RECSYS_SERVING_WORKERS",
    "RECSYS_SERVING_ADMIN_TOKEN",
    "RECSYS_SERVING_MODEL_NAME",
    "RECSYS_SERVING_MODEL_ALIAS",
    "RECSYS_SERVING_RELOAD_POLL_S",
    "RECSYS_SERVING_ALLOW_FALLBACK_SCORER",
    "RECSYS_SERVING_MAX_K",
    "RECSYS_SERVING_MAX_CANDIDATES",
    "RECSYS_SERVING_MAX_PAIRS",
    "RECSYS_SERVING_MAX_BODY_BYTES",
    "RECSYS_SERVING_PARAM_CACHE_ROWS",
    "RECSYS_SERVING_PARAM_VERSION_POLL_S",
    "RECSYS_SERVING_ITEM_FEATURE_TTL_S",
    "RECSYS_SERVING_IMPRESSION_BUFFER",
    "RECSYS_SERVING_RETRIEVAL_CANDIDATES",
    "RECSYS_SERVING_RETRIEVAL_HALF_LIFE_S",
    "RECSYS_SERVING_RETRIEVAL_LOOKBACK",
    "RECSYS_AIRFLOW_PORT",
    "RECSYS_AIRFLOW_DB_URL",
    "RECSYS_AIRFLOW_EXECUTOR",
    "RECSYS_AIRFLOW_PARALLELISM",
    "RECSYS_AIRFLOW_START_TIMEOUT_S",
    "RECSYS_AIRFLOW_TRAINING_SCHEDULE",
    "RECSYS_AIRFLOW_FEATURES_SCHEDULE",
    "RECSYS_GATE_TOLERANCE",
    "RECSYS_GATE_MIN_NEW_SAMPLES",
    "RECSYS_PUBLISH_TIMEOUT_S",
    "RECSYS_SERVING_RELOAD_URLS",
    "RECSYS_STREAM_APP_ID",
    "RECSYS_STREAM_DATA_DIR",
    "RECSYS_STREAM_ATTRIBUTION_WINDOW_S",
    "RECSYS_STREAM_DEDUP_WINDOW_S",
    "RECSYS_STREAM_RESOLVED_RETENTION_S",
    "RECSYS_STREAM_IDLE_ADVANCE_S",
    "RECSYS_STREAM_BATCH_SIZE",
    "RECSYS_STREAM_MAX_IN_FLIGHT_BATCHES",
    "RECSYS_STREAM_FETCH_MAX_WAIT_MS",
    "RECSYS_STREAM_COMMIT_INTERVAL_S",
    "RECSYS_STREAM_SESSION_TIMEOUT_S",
    "RECSYS_STREAM_METRICS_PORT",
    "RECSYS_STREAM_LOG_LEVEL",
    "RECSYS_FEAST_DATA_DIR",
    "RECSYS_FEAST_ONLINE_STORE",
    "RECSYS_FEAST_REDIS_URL",
}


def test_every_environment_variable_of_the_flat_settings_is_still_read() -> None:
    assert VARIABLES_BEFORE_THE_SPLIT <= environment_names(), VARIABLES_BEFORE_THE_SPLIT - environment_names()


@pytest.mark.parametrize(
    ("variable", "value", "section", "field", "expected"),
    [
        ("RECSYS_KAFKA_BOOTSTRAP", "kafka.example:9092", "kafka", "bootstrap", "kafka.example:9092"),
        ("RECSYS_TOPIC_EVENTS", "my.events", "kafka", "topic_events", "my.events"),
        ("RECSYS_PS_SHARDS", '["redis://h:1/0", "redis://h:2/0"]', "ps", "shards", ["redis://h:1/0", "redis://h:2/0"]),
        ("RECSYS_MAX_EVENT_AGE_S", "60", "events", "max_event_age_s", 60.0),
        ("RECSYS_TRAIN_EPOCHS", "7", "train", "epochs", 7),
        ("RECSYS_SERVING_PORT", "8123", "serving", "port", 8123),
        ("RECSYS_PUBLISH_TIMEOUT_S", "12.5", "gate", "publish_timeout_s", 12.5),
        ("RECSYS_RUN_DIR", "/tmp/run-x", "local", "run_dir", __import__("pathlib").Path("/tmp/run-x")),
        ("RECSYS_STREAM_BATCH_SIZE", "99", "stream", "batch_size", 99),
    ],
)
def test_a_variable_sets_its_rooms_field(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, section: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(getattr(Settings(), section), field) == expected


def test_an_unknown_recsys_variable_is_reported_and_warned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_SERVNG_PORT", "8001")  # misspelt section
    monkeypatch.setenv("RECSYS_SERVING_PROT", "8002")  # misspelt field of a known section
    assert unknown_variables() == ["RECSYS_SERVING_PROT", "RECSYS_SERVNG_PORT"]
    with pytest.warns(UnknownSettingWarning, match="RECSYS_SERVNG_PORT"):
        settings = load()
    assert settings.serving.port == 8000


def test_known_variables_give_no_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("RECSYS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RECSYS_SERVING_PORT", "8001")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownSettingWarning)
        assert load().serving.port == 8001


def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_TRAIN_BACKEND", "mpi")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert describe_error(caught.value).startswith("RECSYS_TRAIN_BACKEND: ")
    assert "'mpi'" in describe_error(caught.value)


def test_override_validates_like_the_environment_and_leaves_the_original() -> None:
    base = Settings()
    changed = base.override(serving={"port": 8001}, ps={"shards": ["redis://h:1/0"]})
    assert (changed.serving.port, changed.ps.shards) == (8001, ["redis://h:1/0"])
    assert base.serving.port == 8000 and changed.kafka == base.kafka
    with pytest.raises(ValidationError):
        base.override(ps={"shards": []})  # the parameter service needs a shard
    with pytest.raises(ValidationError):
        base.override(serving={"prot": 1})  # a misspelt field is not silently dropped
    with pytest.raises(ValueError, match="no settings section"):
        base.override(servng={"port": 1})


def test_settings_are_frozen_and_every_section_is_composed() -> None:
    settings = Settings()
    assert set(Settings.model_fields) == set(SECTIONS)
    with pytest.raises(ValidationError):
        settings.serving = settings.serving  # type: ignore[misc]


def test_derived_defaults_follow_the_values_they_derive_from(tmp_path) -> None:
    settings = Settings().override(local={"run_dir": tmp_path, "redis_url": "redis://h:9/0"})
    assert settings.stream_data_dir == tmp_path / "stream"
    assert settings.feast_redis_url == "redis://h:9/0"
    explicit = settings.override(stream={"data_dir": tmp_path / "s"}, feast={"redis_url": "redis://f:1/0"})
    assert (explicit.stream_data_dir, explicit.feast_redis_url) == (tmp_path / "s", "redis://f:1/0")


def test_the_cli_warns_of_a_misspelt_variable_and_goes_on(tmp_path) -> None:
    import os
    import subprocess
    import sys

    from core.settings import PROJECT_ROOT

    env = {**os.environ, "RECSYS_RUN_DIR": str(tmp_path), "RECSYS_SERVING_PROT": "8001", "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "recsys.cli", "services", "status"],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "warning:" in done.stderr and "RECSYS_SERVING_PROT" in done.stderr
