"""The compose deployment's figures: image build, image sizes, time to healthy, datacenter failover.

    uv run python -m bench deploy            # runs the deploy smoke test, then prints its report
    uv run python -m bench deploy --report   # prints the last report (reports/deploy-smoke.json) only

The smoke test is the measurement: it builds the images (`scripts/build-images.sh`: everything on a
fresh machine, podman's layer cache otherwise), brings a stack of its own up on free ports
(`scripts/deploy.sh up`), drives the loop through it, stops replica-a's container under a client's
traffic and starts it again, and writes what it measured to reports/deploy-smoke.json. One command
reproduces every figure of the README's Deployment section.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from core.settings import PROJECT_ROOT

REPORT = PROJECT_ROOT / "reports" / "deploy-smoke.json"
# deploy_smoke_wip.py until it passes end to end (README "Deployment"): then test_deploy_smoke.py, in the suite
TEST = PROJECT_ROOT / "tests" / "docker" / "deploy_smoke_wip.py"


def summary(figures: dict[str, Any]) -> str:
    """The report as the README's table rows would state it."""
    build = (
        f"{figures['build_s']} s (images present: layer cache)"
        if figures.get("images_present_before")
        else f"{figures['build_s']} s (tools, base image and every image built)"
    )
    sizes = ", ".join(f"{name.split('/')[-1]} {mb} MB" for name, mb in figures["image_sizes_mb"].items())
    outage = figures["traffic_during_outage"]
    total = figures["traffic_total"]
    lines = [
        f"measured at           {figures['measured_at']} (load average at up {figures['load_at_up']}, "
        f"at the end {figures['load_at_end']})",
        f"build                 {build}",
        f"image sizes           {sizes}",
        f"time to healthy       {figures['up_to_healthy_s']} s from `deploy.sh up` ({'; '.join(figures['stages'])})",
        f"samples / training    {figures['samples']} samples; DAG run {figures['training_run_s']} s; "
        f"champion {figures['champion']}",
        f"failover              serving-a on replica-b {figures['failover_s']} s after replica-a stopped; "
        f"during the outage {outage['requests']} requests, {outage['retried']} retried, "
        f"{outage['failed_beyond_budget']} failed beyond the retry budget, slowest {outage['slowest_request_s']} s",
        f"return                serving-a back on replica-a (refilled) {figures['return_s']} s after its start",
        f"all traffic           {total['requests']} requests, {total['retried']} retried, "
        f"{total['failed_beyond_budget']} failed, {total['degraded_answers']} degraded, "
        f"slowest {total['slowest_request_s']} s",
        f"the loop              {figures['loop_s']} s from traffic in to serving-a back",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="print the last report, run nothing")
    args = parser.parse_args(argv)
    if not args.report:
        done = subprocess.run([sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", str(TEST)])
        if done.returncode != 0:
            print(f"the smoke test failed (exit {done.returncode}): no new figures", file=sys.stderr)
            return done.returncode
    if not REPORT.exists():
        print(f"no report at {REPORT}: run without --report first", file=sys.stderr)
        return 1
    try:
        figures = json.loads(REPORT.read_text())
        print(summary(figures))
    except (json.JSONDecodeError, KeyError) as exc:
        print(f"{REPORT} is not a report of this version ({type(exc).__name__}: {exc}): run again", file=sys.stderr)
        return 1
    return 0
