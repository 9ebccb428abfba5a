"""bench deploy --report: the smoke test's report printed as figures; a missing or foreign report is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import deploy

FIGURES = {
    "images_present_before": False,
    "build_s": 421.5,
    "image_sizes_mb": {"localhost/recsys:latest": 6500, "localhost/recsys-kafka:latest": 566},
    "up_to_healthy_s": 201.3,
    "stages": ["every service healthy 40 s after the wait began"],
    "load_at_up": ["0.5 0.6 0.7", "3.1 2.0 1.1"],
    "samples": 1210,
    "training_run_s": 95.0,
    "champion": "3",
    "failover_s": 0.41,
    "traffic_during_outage": {"requests": 60, "retried": 2, "failed_beyond_budget": 0, "slowest_request_s": 0.61},
    "return_s": 7.5,
    "traffic_total": {
        "requests": 200,
        "retried": 3,
        "failed_beyond_budget": 0,
        "slowest_request_s": 0.61,
        "degraded_answers": 0,
    },
    "loop_s": 180.2,
    "measured_at": "2026-12-02T15:00:00+00:00",
    "load_at_end": "2.0 2.1 1.5",
}


def test_report_prints_every_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "deploy-smoke.json"
    report.write_text(json.dumps(FIGURES))
    monkeypatch.setattr(deploy, "REPORT", report)
    assert deploy.main(["--report"]) == 0
    out = capsys.readouterr().out
    assert "421.5 s (tools, base image and every image built)" in out
    assert "recsys:latest 6500 MB, recsys-kafka:latest 566 MB" in out
    assert "201.3 s from `deploy.sh up`" in out
    assert "replica-b 0.41 s after replica-a stopped" in out
    assert "60 requests, 2 retried, 0 failed beyond the retry budget, slowest 0.61 s" in out
    assert "7.5 s after its start" in out


@pytest.mark.parametrize("content", [None, "not json", json.dumps({"build_s": 1})])
def test_a_missing_or_foreign_report_is_an_error_not_a_crash(
    content: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "deploy-smoke.json"
    if content is not None:
        report.write_text(content)
    monkeypatch.setattr(deploy, "REPORT", report)
    assert deploy.main(["--report"]) == 1
    assert "run" in capsys.readouterr().err
