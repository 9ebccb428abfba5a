"""What the Python side of every browser test shares: the check that Debian chromium and playwright-core
are installed, running one of the scripts here (each ends with one JSON line), where screenshots go, and
the judgement of the loop dashboard's panels (the dashboard test and the demo's e2e test both make it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.settings import PROJECT_ROOT

BROWSER_DIR = PROJECT_ROOT / "tests" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
# the README shows these pictures: the tests rewrite them on every run, so they show what the code does
DOCS = PROJECT_ROOT / "docs"

DASHBOARD_PANELS = frozenset(
    {
        "Events/s",
        "Consumer lag",
        "Open impressions",
        "Samples/s",
        "Parameter version per copy",
        "Served model version",
        "Served CTR vs oracle",
        "Freshness chain",
        "Serving latency",
    }
)
# a panel whose newest point is older than this is not live (the scrape interval is seconds)
LIVE_WITHIN_S = 120.0


def require_browser() -> None:
    """Fail (never skip) with what to run when the browser or its driver is not installed."""
    assert CHROMIUM.exists(), "Debian chromium is missing: run scripts/bootstrap.sh (apt-get install -y chromium)"
    assert (BROWSER_DIR / "node_modules" / "playwright-core").exists(), (
        "playwright-core is missing: run scripts/bootstrap.sh (npm ci in tests/browser)"
    )


@dataclass(frozen=True)
class BrowserRun:
    """One script's run: its exit status, the JSON result it printed last, its stderr (the page's story)."""

    returncode: int
    result: dict[str, Any]
    stderr: str

    def as_dict(self) -> dict[str, Any]:
        return {"returncode": self.returncode, "result": self.result, "stderr_tail": self.stderr[-4000:]}


def run_script(script: str, env: dict[str, str], timeout: float) -> BrowserRun:
    """Run ``tests/browser/<script>`` under node with ``env``; a script that printed no result line (a crash,
    a timeout) gives a result with an ``error`` saying so, so that callers judge one shape."""
    node = shutil.which("node") or "node"
    try:
        done = subprocess.run([node, script], cwd=BROWSER_DIR, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return BrowserRun(124, {"error": f"{script} still running after {timeout:.0f}s"}, stderr)
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {"error": f"{script} printed no result"}
    except json.JSONDecodeError:
        result = {"error": f"{script} ended with a line that is not JSON: {lines[-1][:200]!r}"}
    return BrowserRun(done.returncode, result, done.stderr)


def dashboard_problems(run: BrowserRun | dict[str, Any], consumer_group: str, now: float | None = None) -> list[str]:
    """What is wrong with a loop dashboard seen by ``loop_dashboard.mjs`` (``run`` or its saved ``as_dict()``);
    empty when every panel is there, has plotted points, no error, a recent newest point, and the legends
    name the loop's parts: the oracle and served policies, the training copy and a replica, the stream
    worker's consumer group ``consumer_group``, p99. Nothing may have been fetched off the machine."""
    saved = run.as_dict() if isinstance(run, BrowserRun) else run
    result = saved["result"]
    if saved["returncode"] != 0 or "error" in result:
        return [f"the browser script failed: {result.get('error')} (exit {saved['returncode']})"]
    problems = [f"request left 127.0.0.1: {url}" for url in result["requests_off_machine"]]
    panels = {p["title"]: p for p in result["panels"]}
    if set(panels) != DASHBOARD_PANELS:
        problems.append(f"panels {sorted(panels)}, expected {sorted(DASHBOARD_PANELS)}")
    now = time.time() if now is None else now
    for title, panel in panels.items():
        if panel["error"]:
            problems.append(f"{title}: error {panel['error']!r}")
        if not (panel["points"] > 0 and panel["series"] > 0):
            problems.append(f"{title}: no data ({panel['series']} series, {panel['points']} points)")
        elif now - panel["newest"] >= LIVE_WITHIN_S:
            problems.append(f"{title}: newest point {now - panel['newest']:.0f}s old")
    wanted = {
        "Served CTR vs oracle": ("expected, oracle", "expected, served"),
        "Parameter version per copy": ("training", "replica-0"),
        "Consumer lag": (consumer_group,),  # the worker's group, by Kafka's own figures
        "Serving latency": ("p99",),
    }
    for title, names in wanted.items():
        legend = panels.get(title, {}).get("legend", "")
        problems += [f"{title}: legend {legend!r} lacks {name!r}" for name in names if name not in legend]
    return problems


def targets_up(prometheus_port: int) -> dict[str, str]:
    """``{job: "1" | "0"}`` as Prometheus itself holds it: tells a page bug from a target it cannot scrape
    when a panel is empty."""
    import httpx

    up = httpx.get(f"http://127.0.0.1:{prometheus_port}/api/v1/query", params={"query": "up"}, timeout=10).json()
    return {r["metric"]["job"]: r["value"][1] for r in up["data"]["result"]}
