"""What operators read: run links, metrics that could not be had, the window as a dataset, summary lines."""

from __future__ import annotations

import json
import math

import pytest

from training.lifecycle.evaluation import summary as evaluation_summary
from training.lifecycle.job import condensed_output
from training.outcome import JobOutcome, JobStatus
from training.record import missing_reasons
from training.tracking import finite_metrics, run_url, window_dataset, window_label


def test_run_url_opens_the_model_training_view() -> None:
    assert run_url(None, "3", "abc") is None
    assert run_url("http://127.0.0.1:5000/", "3", "abc") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    )


def test_finite_metrics_names_what_it_leaves_out() -> None:
    kept, missing = finite_metrics({"a": 0.5, "b": math.nan, "c": math.inf, "d": 3})
    assert kept == {"a": 0.5, "d": 3.0}
    assert set(missing) == {"b", "c"} and "nan" in missing["b"] and "inf" in missing["c"]
    kept, missing = finite_metrics({"e": "x"})  # type: ignore[dict-item]
    assert kept == {} and "not a number" in missing["e"]


def test_window_dataset_records_topic_partitions_and_offsets() -> None:
    start, end = {0: 10, 1: 5}, {0: 30, 1: 5, 2: 7}
    dataset = window_dataset("recsys.samples", "127.0.0.1:9092", start, end, {"samples": 27})
    source = json.loads(dataset.source)
    assert dataset.source_type == "kafka" and source["topic"] == "recsys.samples"
    assert source["partitions"] == {
        "0": {"start": 10, "end": 30},
        "1": {"start": 5, "end": 5},
        "2": {"start": 0, "end": 7},
    }
    assert json.loads(dataset.profile) == {"records": 27, "samples": 27}
    assert dataset.name == "recsys.samples@15-42" and window_label(start, end) == "15-42"
    # the digest is the window's: the same offsets give the same dataset, others another
    assert window_dataset("recsys.samples", "elsewhere:9092", start, end, {}).digest == dataset.digest
    assert window_dataset("recsys.samples", "127.0.0.1:9092", start, {0: 31}, {}).digest != dataset.digest


def _trained(**fields: object) -> JobOutcome:
    base: dict[str, object] = {
        "status": JobStatus.TRAINED,
        "run_id": "r1",
        "model_name": "m",
        "model_version": "4",
        "ps_stage": "job-r1",
        "rows_pushed": {"user_id": 1200, "item_id": 34},
        "epochs": 3,
        "metrics": {"train_samples": 1800.0, "eval_samples": 200.0, "train_loss_last": 0.41234, "eval_auc": 0.71},
        "run_url": "http://mlflow/#/experiments/1/runs/r1?workflowType=machine_learning",
    }
    return JobOutcome.model_validate({**base, **fields})


def test_summary_leads_with_what_was_trained_and_links_the_run() -> None:
    line = _trained(metrics={**_trained().metrics, "eval_oracle_auc": 0.78}).summary()  # type: ignore[dict-item]
    assert line.startswith("trained m v4 (alias challenger) on 1,800 samples (200 held out), 3 epochs, loss 0.4123")
    assert "eval AUC 0.7100 vs oracle 0.7800" in line and "1,234 rows staged as job-r1" in line
    assert line.endswith("MLflow run http://mlflow/#/experiments/1/runs/r1?workflowType=machine_learning")


def test_summary_says_why_an_auc_is_missing() -> None:
    metrics = {"train_samples": 50.0, "eval_samples": 5.0}
    missing = missing_reasons(metrics, "evaluation set has 1 clicks and 4 non-clicks", truth_given=False)
    line = _trained(metrics=metrics, missing_metrics=missing, run_url=None).summary()
    assert "no eval AUC (not evaluable: evaluation set has 1 clicks" in line
    assert "no oracle AUC (unknown: no truth file" in line and line.endswith("MLflow run r1")
    assert JobOutcome(status=JobStatus.NO_NEW_SAMPLES, message="nothing new").summary() == "no_new_samples: nothing new"


def test_missing_reasons() -> None:
    assert missing_reasons({"eval_auc": 0.7, "eval_oracle_auc": 0.8}, None, truth_given=True) == {}
    assert "knows none" in missing_reasons({"eval_auc": 0.7}, None, truth_given=True)["eval_oracle_auc"]
    one_class = missing_reasons({"eval_auc": 0.7, "eval_oracle_coverage": 1.0}, None, truth_given=True)
    assert "one class" in one_class["eval_oracle_auc"]


def test_condensed_output_keeps_a_progress_bars_last_frame_and_drops_warnings() -> None:
    text = (
        "/x/lib.py:12: DeprecationWarning: old\n  warnings.warn('old')\n"
        "train 1 rank:  10%|#  | 1/10\rtrain 1 rank:  50%|##  | 5/10\n"
        "train 1 rank:  80%|### | 8/10\rtrain 1 rank: 100%|####| 10/10\n"
        "\n/y.py:3: FutureWarning: soon\n  call()\nskipped 2 invalid records\n"
    )
    assert condensed_output(text) == "train 1 rank: 100%|####| 10/10\nskipped 2 invalid records"
    many = "\n".join(f"line {i}" for i in range(100))
    out = condensed_output(many, max_lines=10)
    assert out.splitlines()[0] == "... (90 earlier lines)" and out.splitlines()[-1] == "line 99"


@pytest.mark.parametrize(
    ("found", "expected"),
    [
        ({"model_version": "2", "evaluable": False, "reason": "one class"}, "v2 not evaluable: one class"),
        ({"model_version": "1", "challenger_auc": 0.7, "champion_version": None}, "no other champion"),
        (
            {
                "model_version": "3",
                "challenger_auc": 0.7,
                "challenger_auc_rescored": 0.69,
                "champion_version": "2",
                "champion_auc": 0.72,
                "eval_samples": 120,
            },
            "challenger v3 AUC 0.6900 vs champion v2 AUC 0.7200 on 120 evaluation samples",
        ),
    ],
)
def test_evaluation_summary(found: dict[str, object], expected: str) -> None:
    assert expected in evaluation_summary(found)
