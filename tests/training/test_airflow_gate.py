"""The promotion gate of the model lifecycle: pure rule, and against a real MLflow (SQLite backend)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.lifecycle import LifecycleError, gate


def test_decide_rule() -> None:
    assert gate.decide(0.70, None, 0.01)[0] is True
    assert gate.decide(0.70, 0.70, 0.0)[0] is True
    assert gate.decide(0.695, 0.70, 0.01)[0] is True  # worse, but within tolerance
    assert gate.decide(0.68, 0.70, 0.01)[0] is False  # worse by more than tolerance
    assert gate.decide(0.75, 0.70, 0.0)[0] is True


@pytest.mark.parametrize("bad", [float("nan"), -0.1, 1.5])
def test_decide_rejects_bad_auc(bad: float) -> None:
    assert issubclass(gate.GateError, LifecycleError)  # one error type for every lifecycle step
    with pytest.raises(gate.GateError, match="AUC"):
        gate.decide(bad, 0.7, 0.01)
    with pytest.raises(gate.GateError, match="AUC"):
        gate.decide(0.7, bad, 0.01)


@pytest.mark.parametrize("bad", [float("nan"), -0.01, float("inf")])
def test_decide_rejects_bad_tolerance(bad: float) -> None:
    with pytest.raises(gate.GateError, match="tolerance"):
        gate.decide(0.7, 0.7, bad)


def _version(client, name: str, auc: float) -> str:  # noqa: ANN001
    run = client.create_run(client.get_experiment_by_name("gate-test").experiment_id)
    client.log_metric(run.info.run_id, gate.CHALLENGER_METRIC, auc)
    client.set_terminated(run.info.run_id)
    return str(
        client.create_model_version(name, source=f"{run.info.artifact_uri}/dense", run_id=run.info.run_id).version
    )


@pytest.mark.integration
def test_gate_refuses_worse_challenger_and_promotes_better(tmp_path: Path) -> None:
    client = gate.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("gate-test", artifact_location=(tmp_path / "art").as_uri())
    name = "gate-model"
    client.create_registered_model(name)

    first = _version(client, name, 0.70)
    decision = gate.evaluate_gate(client, name, first, tolerance=0.01)
    assert decision.promote and decision.champion_version is None
    assert gate.promote(client, name, decision)
    assert gate.champion_version(client, name) == first

    # a challenger whose champion score is missing cannot be judged
    worse = _version(client, name, 0.60)
    with pytest.raises(gate.GateError, match="no AUC on the evaluation set"):
        gate.evaluate_gate(client, name, worse, tolerance=0.01)

    # forced worse challenger: the champion scores 0.70 on the challenger's evaluation set
    gate.record_champion_score(client, name, worse, first, 0.70)
    decision = gate.evaluate_gate(client, name, worse, tolerance=0.01)
    assert not decision.promote and "worse" in decision.reason
    assert gate.promote(client, name, decision) is False
    assert gate.champion_version(client, name) == first
    assert client.get_model_version(name, worse).tags[gate.TAG_GATE] == "refused"

    better = _version(client, name, 0.74)
    gate.record_champion_score(client, name, better, first, 0.71)
    decision = gate.evaluate_gate(client, name, better, tolerance=0.01)
    assert decision.promote and decision.champion_auc == pytest.approx(0.71)
    assert gate.promote(client, name, decision)
    assert gate.champion_version(client, name) == better
    assert client.get_model_version(name, first).tags["role"] == "retired"
    # the model page says since when a version is champion and what retired the one before
    assert f"replacing v{first}" in client.get_model_version(name, better).description
    assert f"v{better} is the champion" in client.get_model_version(name, first).description
    # a retry of the promotion is harmless
    assert gate.promote(client, name, gate.evaluate_gate(client, name, better, tolerance=0.01))
    assert gate.champion_version(client, name) == better

    # scored beside the champion with the same rows, the challenger's own number is that one
    close = _version(client, name, 0.90)
    gate.record_champion_score(client, name, close, better, 0.74, challenger_auc=0.70)
    decision = gate.evaluate_gate(client, name, close, tolerance=0.01)
    assert not decision.promote and decision.challenger_auc == pytest.approx(0.70)

    # a score of an older champion does not count once the champion moved
    stale = _version(client, name, 0.80)
    gate.record_champion_score(client, name, stale, first, 0.70)
    with pytest.raises(gate.GateError):
        gate.evaluate_gate(client, name, stale, tolerance=0.01)
