"""The demo's closed-loop report without services: targets judged from the phases and rounds, the
Markdown tables and the plot, the truth file read back by sample id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.settings import Settings
from feature_repo.contract import sample_id
from recsys.demo import Report, write_report
from recsys.demo.loop import judge_targets, read_truth


def _aggregate(requests: int, served: float, random: float, oracle: float) -> dict:
    impressions = requests * 10
    return {
        "requests": requests,
        "impressions": impressions,
        "clicks": int(served * impressions),
        "expected_served": served * impressions,
        "expected_random": random * impressions,
        "expected_oracle": oracle * impressions,
        "slots": impressions,
        "realised_ctr": served,
        "served_ctr": served,
        "random_ctr": random,
        "oracle_ctr": oracle,
    }


def _phase(name: str, version: str, exploit: dict, explore: dict, total: dict) -> dict:
    return {
        "name": name,
        "duration_s": 60.0,
        "requests": total["requests"],
        "outcomes": {"served": total["requests"]},
        "impressions": total["impressions"],
        "clicks": total["clicks"],
        "samples": total["impressions"],
        "total": total,
        "by_model_version": {version: total},
        "by_policy": {"exploit": exploit, "explore": explore},
        "by_model_version_and_policy": {version: {"exploit": exploit, "explore": explore}},
        "oracle_auc": 0.86,
    }


def _report() -> Report:
    report = Report(started="2026-12-01T00:00:00+00:00", config={})
    fallback = _aggregate(100, 0.16, 0.12, 0.58)
    report.phases = [
        _phase("cold start", "fallback@ps0", fallback, fallback, fallback),
        _phase(
            "final",
            "recsys-dlrm/2@ps9",
            _aggregate(90, 0.50, 0.12, 0.57),
            _aggregate(10, 0.12, 0.12, 0.57),
            _aggregate(100, 0.462, 0.12, 0.57),
        ),
    ]
    dag = {"run_id": "manual__1", "state": "success", "seconds": 150.0, "tasks": {"train": "success"}}
    report.rounds = [
        {"round": 1, "dag": dag, "model_version": "1", "outcome": "promoted", "eval_auc": 0.74},
        {"round": 2, "dag": dag, "model_version": "2", "outcome": "promoted", "eval_auc": 0.85},
    ]
    report.rounds[0]["oracle_auc_same_eval"] = 0.86
    report.rounds[1]["oracle_auc_same_eval"] = 0.86
    report.model = {"name": "recsys-dlrm", "champion_version": 2}  # as the SQLite registry gives it: an int
    report.closed_loop["series"] = [
        {"phase": "cold start", "bucket": 0, "start": 100.0, "end": 110.0, "model_version": "fallback@ps0", **fallback},
        {
            "phase": "final",
            "bucket": 0,
            "start": 400.0,
            "end": 410.0,
            "model_version": "recsys-dlrm/2@ps9",
            **_aggregate(100, 0.462, 0.12, 0.57),
        },
    ]
    return report


def test_targets_are_judged_on_the_final_champion_and_the_final_phase() -> None:
    report = _report()
    judge_targets(Settings(), report)
    targets = report.closed_loop["targets"]
    # the final champion is v2: its round's AUC against the oracle AUC of the same impressions
    assert targets["auc"]["champion_version"] == "2"
    assert targets["auc"]["gap"] == pytest.approx(0.01) and targets["auc"]["met"]
    ctr = targets["served_ctr"]
    assert ctr["ratio"] == pytest.approx(0.462 / 0.57) and not ctr["met"]  # 0.81x < 0.85x
    assert ctr["ratio_exploit"] == pytest.approx(0.50 / 0.57)  # exploit lists alone would pass
    assert targets["margin"]["final_served_minus_random_same_requests"] == pytest.approx(0.462 - 0.12)
    assert targets["margin"]["final_served_minus_fallback_served"] == pytest.approx(0.462 - 0.16)
    assert report.closed_loop["explore_share"] == Settings().serving.explore_share


def test_report_has_the_phase_round_target_and_bucket_tables_and_the_plot(tmp_path: Path) -> None:
    report = _report()
    judge_targets(Settings(), report)
    markdown = write_report(report, tmp_path).read_text()
    assert "| final | 60 | 100 | 1000 | 462 | v2 | 0.4620 | 0.5000 | 0.1200 | 0.1200 | 0.5700 | 0.8105 |" in markdown
    assert "| cold start | 60 | 100 | 1000 | 160 | fallback |" in markdown
    assert "| 2 | `manual__1` | success | 150.0 | v2 | promoted |" in markdown
    assert "0.8500 vs 0.8600 (gap 0.0100) | yes |" in markdown
    assert "= 0.8105×; exploit lists alone 0.5000 vs 0.5700 = 0.8772× | **no** |" in markdown
    assert "| final | 300 | v2 | 1000 | 462 |" in markdown  # the bucket table, t since the first bucket
    assert (tmp_path / "closed_loop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text())["closed_loop"]["targets"]["auc"]["met"] is True


def test_a_partial_report_is_still_written(tmp_path: Path) -> None:
    """The report is written whatever stage failed: no phases, no rounds, no targets yet."""
    markdown = write_report(Report(started="now", config={}), tmp_path).read_text()
    assert "## Closed loop" in markdown and "### Targets" not in markdown


def test_truth_is_read_back_by_the_sample_id_the_stream_gives(tmp_path: Path) -> None:
    path = tmp_path / "truth.jsonl"
    lines = [
        {"request_id": "r1", "user_id": "u1", "item_id": "i1", "position": 0, "probability": 0.25, "clicked": True},
        {"request_id": "r1", "user_id": "u1", "item_id": "i2", "position": 1, "probability": 0.1, "clicked": False},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    truth = read_truth(path)
    assert truth[sample_id("r1", "i1")].clicked and truth[sample_id("r1", "i1")].probability == 0.25
    assert not truth[sample_id("r1", "i2")].clicked and len(truth) == 2


def test_online_stage_is_reported_with_its_states_merged_per_bucket(tmp_path: Path) -> None:
    report = _report()
    judge_targets(Settings(), report)
    a, b = _aggregate(30, 0.50, 0.12, 0.57), _aggregate(10, 0.30, 0.12, 0.57)
    online = _phase("online", "online/v40@ps41", a, a, _aggregate(40, 0.45, 0.12, 0.57))
    online["by_model_version"] = {"online/v40@ps41": a, "online/v40@ps42": b}
    report.phases.append(online)
    for version, agg in (("online/v40@ps41", a), ("online/v40@ps42", b)):
        line = {"phase": "online", "bucket": 0, "start": 500.0, "end": 510.0, "model_version": version, **agg}
        report.closed_loop["series"].append(line)
    quantile = {"n": 2, "median_s": 1.5, "p99_s": 2.5, "max_s": 2.5}
    stages = ("click_to_sample", "sample_to_flushed", "flushed_to_replicas", "flushed_to_served")
    report.freshness["click_to_served_online"] = {
        **quantile,
        "probes": 2,
        "stages": dict.fromkeys(stages, quantile),
        "how": "probe",
    }
    report.online = {
        "champion_version": "2",
        "seconds": 40.0,
        "flushes": 3,
        "decisions": {"publish": 3},
        "samples": 900,
        "served_version_at_end": "online/v40@ps42",
        "log": "trainer.log",
        "auc": [[1000.0, 0.70, 300], [1002.0, 0.75, 300], [1004.0, 0.80, 300]],
    }
    report.online_quality = {
        "final_gap_online": 0.03,
        "final_gap_batch": 0.05,
        "first_within_target_samples": None,
        "target_gap": 0.02,
        "flushes": 120,
        "refused_flushes": 1,
        "hours": [
            {
                "hour": 1,
                "samples_seen": 3000,
                "online_auc": 0.7,
                "batch_auc": 0.5,
                "online_oracle_auc": 0.86,
                "online_ctr": 0.2,
                "batch_ctr": 0.14,
                "random_ctr": 0.13,
                "oracle_ctr": 0.39,
            }
        ],
        "plot": "online_quality/online_quality.png",  # not drawn here: the report leaves a missing plot out
        "command": "python -m bench online_quality --hours 1",
    }
    markdown = write_report(report, tmp_path).read_text()
    assert "| 1 | 3000 | 0.7000 | 0.5000 | 0.8600 | 0.2000 | 0.1400 | 0.1300 | 0.3900 |" in markdown
    assert "the online gap (per window) was never within it; 120 flushes, 1 refused by the guard" in markdown
    assert "online_quality.png" not in markdown
    # two online states in one time bucket are one row, weighted by impressions: (0.5*300 + 0.3*100) / 400
    assert "| online | 400 | online | 400 | 180 | 0.4500 | 0.4500 | 0.1200 | 0.5700 |" in markdown
    assert "| online | 60 | 40 | 400 |" in markdown and "| online |" in markdown.split("### Training rounds")[0]
    assert "## Online training" in markdown and "first 0.700, median 0.750, last 0.800" in markdown
    assert "online phase 0.4500 vs 'final' (the batch champion) 0.4620" in markdown
    assert "| click → trained, on every replica and served (online trainer) | 2 | 1500 ms | 2500 ms |" in markdown
    for name in ("online.png", "freshness.png", "closed_loop.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
