"""A window without clicks, end to end: `recsys train` on real Kafka, Redis and MLflow (SQLite).

The job trains, logs finite metrics and tags its run not evaluable; the evaluate step and the
gate refuse it with that reason (no exception, JSON-safe); without new samples nothing trains
again; the next job, once new samples arrive, trains on the refused window's samples too.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from core.kafka import end_offsets, ensure_topics
from core.settings import PROJECT_ROOT, Settings
from traffic.simulator import SimConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _train(env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "recsys.cli", "train", "--json"],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def _produce(kafka: str, topic: str, config: SimConfig, clicks: bool) -> int:
    from traffic.synthetic import produce_samples, simulate_samples

    samples = simulate_samples(config).samples
    if not clicks:  # served impressions nobody clicked
        samples = [sample.model_copy(update={"label": 0}) for sample in samples]
    produce_samples(kafka, topic, samples)
    return len(samples)


def test_window_without_clicks_is_refused_and_trained_on_by_the_next_job(
    kafka_bootstrap: str, redis_factory, tmp_path: Path
) -> None:
    import mlflow

    from training.lifecycle import evaluation, gate
    from training.lifecycle.job import count_new_samples
    from training.tracking import TAG_EVAL_REASON, TAG_EVAL_STATUS, TAG_WINDOW, WINDOW_CARRIED

    topic, namespace = f"samples.{uuid.uuid4().hex[:8]}", f"e{uuid.uuid4().hex[:6]}"
    redis_url, uri = redis_factory("evaluability").url, f"sqlite:///{tmp_path / 'mlflow.db'}"
    asyncio.run(ensure_topics(kafka_bootstrap, {topic: 2}))
    env = {
        **os.environ,
        "RECSYS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "RECSYS_PS_SHARDS": json.dumps([redis_url]),
        "RECSYS_PS_NAMESPACE": namespace,
        "RECSYS_TOPIC_SAMPLES": topic,
        "RECSYS_MLFLOW_TRACKING_URI": uri,
        "RECSYS_RUN_DIR": str(tmp_path / "run"),
        "RECSYS_TRAIN_RANKS": "1",
        "RECSYS_TRAIN_EPOCHS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    s = Settings().override(
        kafka={"bootstrap": kafka_bootstrap, "topic_samples": topic},
        ps={"shards": [redis_url], "namespace": namespace},
        mlflow={"tracking_uri": uri},
    )

    refused_samples = _produce(kafka_bootstrap, topic, SimConfig(users=40, items=30, requests=80, seed=21), False)
    first = _train(env)
    assert first["status"] == "trained"
    assert "eval_auc" not in first["metrics"] and first["metrics"]["eval_positives"] == 0
    client = gate.client_for(uri)
    tags = client.get_run(first["run_id"]).data.tags
    assert tags[TAG_EVAL_STATUS] == "not_evaluable" and "0 clicks" in tags[TAG_EVAL_REASON]

    found = evaluation.evaluate(s, first["model_version"])
    assert found["evaluable"] is False and "0 clicks" in found["reason"]
    json.dumps(found, allow_nan=False)
    decision = gate.gate_challenger(s, first["model_version"], s.gate.tolerance)
    assert not decision.promote and "not evaluable" in decision.reason
    json.dumps(decision.as_dict(), allow_nan=False)
    assert gate.champion_version(client, s.train.model_name) is None
    assert client.get_run(first["run_id"]).data.tags[TAG_WINDOW] == WINDOW_CARRIED

    # carried samples alone start no run: the same window would get the same verdict
    assert count_new_samples(s)["new"] == 0

    new_samples = _produce(kafka_bootstrap, topic, SimConfig(users=40, items=30, requests=120, seed=22), True)
    ends = asyncio.run(end_offsets(kafka_bootstrap, topic))
    assert count_new_samples(s)["new"] == new_samples
    second = _train(env)
    assert second["status"] == "trained"
    # the window starts where the refused job's did: its samples are trained on again
    assert all(offset == 0 for offset in second["offsets"]["start"].values())
    assert second["offsets"]["end"] == {str(p): o for p, o in ends.items()}
    path = mlflow.artifacts.download_artifacts(
        run_id=second["run_id"], artifact_path="manifest.json", tracking_uri=uri, dst_path=str(tmp_path / "m")
    )
    manifest = json.loads(Path(path).read_text())
    assert manifest["read"]["samples"] == refused_samples + new_samples
    assert manifest["hparams"]["previous_run"] is None  # no accepted job before it
