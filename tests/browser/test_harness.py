"""The dashboard judgement the browser tests share, on hand-made results (no browser needed)."""

from __future__ import annotations

import json
import os

from tests.browser.harness import DASHBOARD_PANELS, BrowserRun, dashboard_problems, run_script

NOW = 1_800_000_000.0
LEGENDS = {
    "Served CTR vs oracle": "expected, oracle: 0.5\nexpected, served: 0.3",
    "Parameter version per copy": "training: 2\nreplica-0: 2",
    "Consumer lag": "worker-group: 3",
    "Serving latency": "p50: 4\np99: 9",
}


def _seen(**changes: dict) -> BrowserRun:
    panels = [
        {"title": t, "series": 1, "points": 5, "newest": NOW - 5, "error": "", "legend": LEGENDS.get(t, "x: 1")}
        for t in sorted(DASHBOARD_PANELS)
    ]
    for panel in panels:
        panel.update(changes.get(panel["title"], {}))
    return BrowserRun(0, {"panels": panels, "requests_off_machine": []}, "")


def test_a_live_dashboard_has_no_problems() -> None:
    assert dashboard_problems(_seen(), "worker-group", now=NOW) == []
    assert dashboard_problems(_seen().as_dict(), "worker-group", now=NOW) == []  # as saved to a file


def test_empty_stale_erroneous_or_mislabelled_panels_are_named() -> None:
    seen = _seen(
        **{
            "Events/s": {"points": 0, "series": 0},
            "Open impressions": {"newest": NOW - 600},
            "Samples/s": {"error": "bad query"},
            "Consumer lag": {"legend": "someone-else: 3"},
        }
    )
    problems = dashboard_problems(seen, "worker-group", now=NOW)
    assert len(problems) == 4, problems
    for title in ("Events/s", "Open impressions", "Samples/s", "Consumer lag"):
        assert any(p.startswith(title) for p in problems), (title, problems)


def test_a_failed_script_or_an_off_machine_request_is_a_problem() -> None:
    assert dashboard_problems(BrowserRun(1, {"error": "boom"}, ""), "g", now=NOW)[0].startswith("the browser script")
    seen = _seen()
    seen.result["requests_off_machine"].append("https://cdn.example/x.js")
    assert dashboard_problems(seen, "worker-group", now=NOW) == ["request left 127.0.0.1: https://cdn.example/x.js"]
    seen.result["panels"].pop()
    assert any(p.startswith("panels ") for p in dashboard_problems(seen, "worker-group", now=NOW))


def test_a_script_without_a_result_line_gives_an_error_result() -> None:
    # chromium.mjs only exports helpers: it ends without a JSON line, as a crashed script would
    done = run_script("chromium.mjs", {**os.environ}, timeout=60)
    assert done.returncode == 0 and "error" in done.result, done
    assert json.dumps(done.as_dict())
