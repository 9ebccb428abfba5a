"""Evaluation sets that give no AUC worth comparing: one class, or too few clicks.

The trainer's metrics stay finite and say why (``eval_positives`` / ``eval_negatives`` and the
``eval_status`` / ``eval_reason`` tags), the evaluate step returns a JSON-safe "not evaluable",
the gate refuses with that reason, and the refused run's window is carried into the next job's
window (real MLflow, SQLite backend; the trainer end to end is in
``test_evaluability_integration.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from core.settings import Settings
from training.lifecycle import evaluation, gate
from training.quality import NOT_EVALUABLE, eval_metrics, oracle_metrics
from training.tracking import (
    TAG_COMMITTED,
    TAG_EVAL_REASON,
    TAG_EVAL_STATUS,
    TAG_OFFSETS,
    TAG_TOPIC,
    TAG_WINDOW,
    WINDOW_CARRIED,
    Tracking,
)


def _all_finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())


def test_single_class_evaluation_set_is_not_evaluable_and_finite() -> None:
    predictions = np.linspace(0.1, 0.9, 300)
    metrics, reason = eval_metrics(predictions, np.zeros(300), 20, 20)
    assert reason is not None and "0 clicks and 300 non-clicks" in reason
    assert "eval_auc" not in metrics and "eval_calibration" not in metrics  # both would be NaN
    assert (metrics["eval_positives"], metrics["eval_negatives"]) == (0, 300)
    assert _all_finite(metrics)
    json.dumps(metrics, allow_nan=False)

    metrics, reason = eval_metrics(predictions, np.ones(300), 20, 20)
    assert reason is not None and "300 clicks and 0 non-clicks" in reason and "eval_auc" not in metrics
    assert _all_finite(metrics)


def test_too_few_clicks_is_not_evaluable_below_the_minimum_only() -> None:
    labels = np.zeros(200)
    labels[::40] = 1  # 5 clicks
    predictions = np.linspace(0.1, 0.9, 200)
    metrics, reason = eval_metrics(predictions, labels, 20, 20)
    assert reason is not None and "5 clicks" in reason and "at least 20" in reason
    assert "eval_auc" not in metrics and metrics["eval_calibration"] > 0
    metrics, reason = eval_metrics(predictions, labels, 5, 20)
    assert reason is None and 0 <= metrics["eval_auc"] <= 1


def test_empty_evaluation_set_and_single_class_oracle() -> None:
    metrics, reason = eval_metrics(np.zeros(0), np.zeros(0), 20, 20)
    assert reason == "empty evaluation set" and metrics == {"eval_positives": 0.0, "eval_negatives": 0.0}
    found = oracle_metrics({"a": 0.2, "b": 0.4}, ["a", "b"], np.zeros(2))
    assert found == {"eval_oracle_coverage": 1.0}


def _run(metrics: dict[str, float], tags: dict[str, str] | None = None) -> Any:
    return SimpleNamespace(data=SimpleNamespace(metrics=metrics, tags=tags or {}))


def test_not_evaluable_reads_the_tag_a_nan_auc_and_the_counts() -> None:
    tagged = _run({"eval_positives": 0.0}, {TAG_EVAL_STATUS: NOT_EVALUABLE, TAG_EVAL_REASON: "0 clicks"})
    assert gate.not_evaluable(tagged) == "0 clicks"
    # a run of an older trainer: NaN logged as its AUC
    assert "nan" in str(gate.not_evaluable(_run({gate.CHALLENGER_METRIC: float("nan")})))
    counted = _run({gate.CHALLENGER_METRIC: 0.7, "eval_positives": 12.0, "eval_negatives": 400.0})
    assert gate.not_evaluable(counted, 1, 1) is None
    assert "12 clicks" in str(gate.not_evaluable(counted, 20, 20))  # the minimums in force now apply
    assert gate.not_evaluable(_run({gate.CHALLENGER_METRIC: 0.7})) is None


# --------------------------------------------------------------------------- against a real MLflow


def _committed_run(
    tracking: Tracking, topic: str, end: dict[int, int], metrics: dict[str, float], tags: dict[str, str]
) -> str:
    """A run as the trainer leaves it: committed offsets, metrics, eval tags."""
    run_id = tracking.start_run(topic, {"eval_fraction": 0.1})
    tracking.log_metrics(run_id, metrics)
    tracking.set_tags(run_id, tags)
    tracking.commit_offsets(run_id, end, 1)
    tracking.finish(run_id)
    return run_id


@pytest.mark.integration
def test_not_evaluable_challenger_is_refused_with_its_reason_and_its_window_carried(tmp_path: Path) -> None:
    uri, topic, name = f"sqlite:///{tmp_path / 'mlflow.db'}", "samples.eval", "eval-model"
    s = Settings().override(mlflow={"tracking_uri": uri}, train={"model_name": name, "experiment": "eval-test"})
    tracking = Tracking(uri, s.train.experiment)
    client = tracking.client
    champion_run = _committed_run(
        tracking, topic, {0: 100}, {"eval_auc": 0.7, "eval_positives": 40.0, "eval_negatives": 260.0}, {}
    )
    client.create_registered_model(name)
    champion = client.create_model_version(name, source="file:///nowhere", run_id=champion_run).version
    client.set_registered_model_alias(name, gate.CHAMPION, champion)

    reason = "evaluation set has 0 clicks and 30 non-clicks"
    run_id = _committed_run(
        tracking,
        topic,
        {0: 400},
        {"eval_positives": 0.0, "eval_negatives": 30.0, "eval_log_loss": 0.2},
        {TAG_EVAL_STATUS: NOT_EVALUABLE, TAG_EVAL_REASON: reason},
    )
    version = str(client.create_model_version(name, source="file:///nowhere", run_id=run_id).version)

    found = evaluation.evaluate(s, version)  # nothing to score: no Kafka, no parameter service needed
    assert found["evaluable"] is False and found["reason"] == reason and found["challenger_auc"] is None
    json.dumps(found, allow_nan=False)  # what Airflow stores as the task's return value

    decision = gate.gate_challenger(s, version, tolerance=0.01)
    assert not decision.promote and not decision.evaluable and reason in decision.reason
    json.dumps(decision.as_dict(), allow_nan=False)
    assert client.get_model_version(name, version).tags[gate.TAG_GATE] == NOT_EVALUABLE
    run = client.get_run(run_id)
    assert run.data.tags[TAG_WINDOW] == WINDOW_CARRIED and reason in run.data.tags[gate.TAG_GATE_REASON]
    assert gate.champion_version(client, name) == str(champion)

    # new samples start after the refused run; the next job's window starts before it
    assert tracking.last_offsets(topic) == ({0: 400}, run_id)
    assert tracking.window_start(topic, max_carried=3) == ({0: 100}, champion_run)
    assert tracking.window_start(topic, max_carried=0) == ({0: 400}, run_id)
    # a retry of the gate changes nothing
    assert gate.gate_challenger(s, version, tolerance=0.01) == decision


@pytest.mark.integration
def test_window_start_carries_at_most_max_carried_runs_in_a_row(tmp_path: Path) -> None:
    tracking = Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", "carry-test")
    topic = "samples.carry"
    assert tracking.window_start(topic, 2) == ({}, None)
    carried = {TAG_WINDOW: WINDOW_CARRIED}
    first = _committed_run(tracking, topic, {0: 10, 1: 5}, {}, carried)
    assert tracking.window_start(topic, 2) == ({}, None)  # refused from the topic's first job on: from the start
    second = _committed_run(tracking, topic, {0: 20, 1: 9}, {}, carried)
    assert tracking.window_start(topic, 2) == ({}, None)
    third = _committed_run(tracking, topic, {0: 30, 1: 12}, {}, carried)
    # three carried in a row, two allowed: the window is consumed, the next job starts after the newest
    assert tracking.window_start(topic, 2) == ({0: 30, 1: 12}, third)
    assert tracking.window_start(topic, 3) == ({}, None)
    runs = tracking.client.search_runs([tracking.experiment_id], f"tags.{TAG_TOPIC} = '{topic}'")
    assert {r.info.run_id for r in runs} == {first, second, third}
    assert all(r.data.tags[TAG_COMMITTED] == "true" and TAG_OFFSETS in r.data.tags for r in runs)
