"""The whole closed loop, scaled down: `recsys demo` on its own Kafka, Redis (training copy + two
inference replicas), Airflow, stream worker and serving, all on free ports in a temporary run
directory. Simulated users click on what serving shows, from cold start (the fallback scorer)
through two training rounds (DAG runs through the running Airflow's REST API) to a final phase
served by the final champion. The services outlive the demo (``--keep``) just long enough for the
test to read the samples topic itself and check its labels against the demo's truth file.

MLflow: a SQLite tracking URI without `mlflow server` (`--no-mlflow-server`): on the shared
2-core machine the server takes ~90 s to start; the demo itself (`make demo`) runs the server.

While the demo runs, once the last round's traffic flows (a champion promoted and served by then),
headless chromium opens the loop dashboard the demo started (its result is kept in the report
folder, its screenshot in docs/): the live view is checked on the real loop, not only on the
dashboard test's small one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from core.procs import free_port
from core.settings import PROJECT_ROOT
from feature_repo.contract import sample_id
from local_services import prometheus as local_prometheus
from recsys.demo import CHAINS, quantiles
from tests.browser.harness import DOCS, dashboard_problems, require_browser, run_script, targets_up

# a cold start, two DAG runs and a final phase: ~10 min on an idle 2-core machine, more under load
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2400)]

USERS, ITEMS, PROBES, QUERIES = 200, 150, 5, 40
RATE, COLD_S, PHASE_S, FINAL_S, ROUNDS = 20, 40, 30, 25, 2
QUALITY_HOURS, QUALITY_HOUR_SAMPLES = 2, 3000
# the demo's announcement of the last round's traffic: from then on every panel has something to plot
# (events, joins, a promoted champion serving, the replicas at its version)
DASHBOARD_CUE = f"closed loop 'during round {ROUNDS}'"
DASHBOARD_RESULT = "dashboard-during-demo.json"
DASHBOARD_SCREENSHOT = DOCS / "loop-dashboard-demo.png"
TARGETS_SCREENSHOT = DOCS / "prometheus-targets.png"
# every component the demo runs that Prometheus scrapes
DEMO_SCRAPE_JOBS = ("serving", "stream-worker", "simulator", "loop-exporter")


def test_quantiles_are_median_and_nearest_rank_p99() -> None:
    q = quantiles([float(v) for v in range(1, 101)])
    assert q["n"] == 100 and q["median_s"] == 50.5 and q["p99_s"] == 99.0 and q["max_s"] == 100.0
    assert quantiles([]) == {"n": 0, "median_s": None, "p99_s": None}


def test_demo_overrides_keep_what_the_caller_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recsys.demo import demo_overrides

    for key in [k for k in os.environ if k.startswith("RECSYS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("RECSYS_REDIS_PORT", "7000")
    mine = {"RECSYS_PS_SHARDS": '["redis://127.0.0.1:1234/0"]', "RECSYS_REDIS_PORT": "7000"}
    first = demo_overrides(mine, tmp_path, 5001)
    assert "RECSYS_PS_SHARDS" not in first and "RECSYS_REDIS_PORT" not in first
    assert json.loads(first["RECSYS_PS_REPLICAS"]) == ["redis://127.0.0.1:7002/0", "redis://127.0.0.1:7003/0"]
    assert first["RECSYS_MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5001"
    assert demo_overrides({}, tmp_path, None)["RECSYS_MLFLOW_TRACKING_URI"].startswith("sqlite:///")
    # the admin token is generated once per run directory, private, and reused by later runs
    token_file = tmp_path / "demo" / "serving_admin_token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert demo_overrides({}, tmp_path, 5001)["RECSYS_SERVING_ADMIN_TOKEN"] == first["RECSYS_SERVING_ADMIN_TOKEN"]
    assert len(first["RECSYS_SERVING_ADMIN_TOKEN"]) >= 16


def test_demo_rejects_bad_arguments() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "recsys.cli", "demo", "--users", "3"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
    )
    assert done.returncode == 2 and "--users" in done.stderr


def _read_samples_and_late_clicks(bootstrap: str) -> tuple[list, dict[str, str]]:
    """Every sample on the samples topic, and ``{sample id: reason}`` of the clicks routed to the late topic."""
    import asyncio

    from core.kafka import end_offsets, read_topic
    from feature_repo.contract import Sample
    from recsys.demo.loop import late_clicks

    async def read() -> list:
        ends = await end_offsets(bootstrap, "recsys.samples")
        start = dict.fromkeys(ends, 0)
        return [Sample.from_json(r.value) async for r in read_topic(bootstrap, "recsys.samples", start, ends)]

    return asyncio.run(read()), asyncio.run(late_clicks(bootstrap, "recsys.events.late"))


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stream_app_id(run_dir: Path) -> str:
    """The demo's stream worker group: one per run, so that its lag is this run's."""
    return f"demo-e2e-{run_dir.name}"


class DashboardDuringDemo:
    """Reads the demo's output line by line (all of it kept, for the assertions and failure messages);
    on the cue line, opens the loop dashboard in chromium in a thread of its own, while the demo goes on,
    and saves what the browser saw as JSON in the report folder."""

    def __init__(self, stream: IO[str], prometheus_port: int, report_dir: Path) -> None:
        self.stream, self.port, self.report_dir = stream, prometheus_port, report_dir
        self.lines: list[str] = []
        self.browser: threading.Thread | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.stream:
            self.lines.append(line)
            if self.browser is None and DASHBOARD_CUE in line:
                self.browser = threading.Thread(target=self._look, daemon=True)
                self.browser.start()

    def _look(self) -> None:
        # into the phase, so that the picture shows the loop running, not its first seconds
        time.sleep(PHASE_S / 2)
        env = {
            **os.environ,
            "DASHBOARD_URL": local_prometheus.dashboard_url(self.port),
            "SCREENSHOT": str(DASHBOARD_SCREENSHOT),
            "TIMEOUT_S": "240",
        }
        seen = run_script("loop_dashboard.mjs", env, timeout=360).as_dict()
        seen["looked_at"] = time.time()  # "live" is judged as of then, not when a test reads the file
        try:
            seen["targets_up"] = targets_up(self.port)
        except Exception as exc:  # noqa: BLE001 (a diagnosis only: the panels are judged either way)
            seen["targets_up"] = f"unreadable: {type(exc).__name__}: {exc}"
        # Prometheus's own page of what it scrapes, beside the dashboard built on it (Debian's package
        # serves only the classic UI)
        targets = [
            {
                "url": f"http://127.0.0.1:{self.port}/classic/targets",
                "texts": [f"{job} (1/1 up)" for job in DEMO_SCRAPE_JOBS],
                "screenshot": str(TARGETS_SCREENSHOT),
            }
        ]
        seen["targets_page"] = run_script(
            "pages.mjs", {**os.environ, "PAGES": json.dumps(targets), "TIMEOUT_S": "60"}, timeout=180
        ).as_dict()
        self.report_dir.mkdir(parents=True, exist_ok=True)
        (self.report_dir / DASHBOARD_RESULT).write_text(json.dumps(seen, indent=1))

    def join(self, timeout: float) -> str:
        """The whole output, once the demo closed it and the browser (if it started) is done."""
        self.reader.join(timeout)
        if self.browser is not None:
            self.browser.join(timeout)
        return "".join(self.lines)


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str, tuple[list, dict[str, str]]]:
    require_browser()
    run_dir = tmp_path_factory.mktemp("demo-run")
    report_dir = run_dir / "report"
    shard, replica_a, replica_b = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    kafka_port, prometheus_port = free_port(), free_port()
    DOCS.mkdir(exist_ok=True)
    for picture in (DASHBOARD_SCREENSHOT, TARGETS_SCREENSHOT):
        picture.unlink(missing_ok=True)  # the pictures must be this run's
    env.update(
        {
            # the cue line must reach the pipe when it is printed, not when the demo ends
            "PYTHONUNBUFFERED": "1",
            "RECSYS_RUN_DIR": str(run_dir),
            "RECSYS_CACHE_DIR": str(PROJECT_ROOT / ".cache"),
            "RECSYS_KAFKA_PORT": str(kafka_port),
            "RECSYS_KAFKA_CONTROLLER_PORT": str(free_port()),
            "RECSYS_REDIS_PORT": str(free_port()),
            "RECSYS_SERVING_PORT": str(free_port()),
            "RECSYS_AIRFLOW_PORT": str(free_port()),
            # the loop dashboard's Prometheus and every /metrics it scrapes
            "RECSYS_PROMETHEUS_PORT": str(prometheus_port),
            "RECSYS_LOOP_EXPORTER_PORT": str(free_port()),
            "RECSYS_STREAM_METRICS_PORT": str(free_port()),
            "RECSYS_SIM_METRICS_PORT": str(free_port()),
            # a loaded 2-core CI machine has seen Airflow's scheduler take over the default 180 s to heartbeat
            "RECSYS_AIRFLOW_START_TIMEOUT_S": "600",
            "RECSYS_PS_SHARDS": json.dumps([f"redis://127.0.0.1:{shard}/0"]),
            "RECSYS_PS_REPLICAS": json.dumps([f"redis://127.0.0.1:{replica_a}/0", f"redis://127.0.0.1:{replica_b}/0"]),
            "RECSYS_STREAM_APP_ID": _stream_app_id(run_dir),
        }
    )
    cmd = [
        sys.executable,
        "-m",
        "recsys.cli",
        "demo",
        "--users",
        str(USERS),
        "--items",
        str(ITEMS),
        "--rate",
        str(RATE),
        "--cold-s",
        str(COLD_S),
        "--phase-s",
        str(PHASE_S),
        "--final-s",
        str(FINAL_S),
        "--rounds",
        str(ROUNDS),
        "--epochs",
        "4",
        "--ranks",
        "1",
        "--probes",
        str(PROBES),
        "--query-users",
        str(QUERIES),
        "--quality-hours",
        str(QUALITY_HOURS),
        "--quality-hour-samples",
        str(QUALITY_HOUR_SAMPLES),
        "--no-mlflow-server",
        "--keep",
        "--stage-timeout-s",
        "600",
        "--report-dir",
        str(report_dir),
    ]
    samples: tuple[list, dict[str, str]] = ([], {})
    demo = subprocess.Popen(
        cmd, env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    try:
        assert demo.stdout is not None  # PIPE
        watcher = DashboardDuringDemo(demo.stdout, prometheus_port, report_dir)
        returncode = demo.wait(timeout=2400)
        # the services outlive the demo (--keep): a browser still looking finds the dashboard up
        output = watcher.join(timeout=420)
        if returncode == 0:
            samples = _read_samples_and_late_clicks(f"127.0.0.1:{kafka_port}")
    finally:  # whatever happened, nothing of this run may keep running
        if demo.poll() is None:
            demo.kill()
            demo.wait(timeout=60)
        for down in (["airflow", "down"], ["services", "down"]):
            subprocess.run(
                [sys.executable, "-m", "recsys.cli", *down], env=env, cwd=PROJECT_ROOT, capture_output=True, timeout=120
            )
    assert returncode == 0, output[-6000:]
    # every process of the run stopped, the stream worker included (Faust retitles it)
    leftovers = [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p).find(str(run_dir)) >= 0]
    assert not leftovers, [_cmdline(p) for p in leftovers]
    return json.loads((report_dir / "report.json").read_text()), report_dir, output, samples


def test_closed_loop_traffic_clicks_on_served_lists_from_cold_start(demo_report) -> None:
    report, _, _, _ = demo_report
    phases = report["phases"]
    names = ["cold start", *[f"during round {i}" for i in range(1, ROUNDS + 1)], "final"]
    assert [p["name"] for p in phases] == names
    for phase in phases:
        assert phase["outcomes"].get("served", 0) > 0 and phase["clicks"] > 0, phase
        # every impression serving logged was joined into a sample (at least once)
        assert phase["samples"] >= phase["impressions"] > 0, phase
    champion_prefix = f"{report['model']['name']}/"
    # nothing is promoted before the first round: the fallback scorer served the cold start
    assert not any(v.startswith(champion_prefix) for v in phases[0]["by_model_version"]), phases[0]
    # the first champion served the traffic during the next round (until a newer one was promoted)
    first = f"{champion_prefix}{report['rounds'][0]['model_version']}@"
    assert any(v.startswith(first) for v in phases[2]["by_model_version"]), phases[2]["by_model_version"]
    final = f"{champion_prefix}{report['model']['champion_version']}@"
    assert phases[-1]["by_model_version"] and all(v.startswith(final) for v in phases[-1]["by_model_version"])


def test_sample_labels_are_the_simulators_clicks(demo_report) -> None:
    report, _, _, (samples, late) = demo_report
    truth = {}
    for line in Path(report["closed_loop"]["truth_file"]).read_text().splitlines():
        t = json.loads(line)
        truth[sample_id(t["request_id"], t["item_id"])] = t["clicked"]
    assert len(truth) == sum(p["impressions"] for p in report["phases"])
    labels: dict[str, int] = {}
    for sample in samples:  # at-least-once: a sample may repeat, always with the same label
        assert labels.setdefault(sample.sample_id, sample.label) == sample.label, sample
    joined = [(sid, label, truth[sid]) for sid, label in labels.items() if sid in truth]
    # a click the stream got after its impression's window closed is routed to the late topic and the
    # sample stays negative (one label per sample id, forever): the only difference allowed
    wrong = [(sid, label, clicked) for sid, label, clicked in joined if label != int(clicked)]
    unexplained = [w for w in wrong if not (w[0] in late and w[2] and w[1] == 0)]
    print(
        f"{len(joined)} of {len(samples)} samples joined to {len(truth)} truth impressions; {len(wrong)} differ, "
        f"all late clicks: {not unexplained} ({len(late)} late clicks on the late topic)"
    )
    assert not unexplained, unexplained[:5]
    assert len(wrong) <= 0.01 * sum(truth.values())
    assert len(joined) == len(truth)  # no served impression lost
    assert sum(label for _, label, _ in joined) == sum(truth.values()) - len(wrong) > 0
    assert report["closed_loop"]["labels"]["label_mismatches"] == 0
    assert report["closed_loop"]["labels"]["label_differs_late_click"] == len(wrong)


def test_training_rounds_ran_without_a_failed_task(demo_report) -> None:
    report, _, _, _ = demo_report
    rounds = report["rounds"]
    assert len(rounds) == ROUNDS
    for r in rounds:
        assert r["dag"]["state"] == "success", r
        assert "failed" not in r["dag"]["tasks"].values() and "upstream_failed" not in r["dag"]["tasks"].values()
        assert r["outcome"] == "promoted" or r["outcome"].startswith("refused"), r
    assert rounds[0]["outcome"] == "promoted", rounds[0]
    for r in rounds:
        assert 0 < r["eval_truth_coverage"] <= 1 and 0.5 < r["oracle_auc_same_eval"] <= 1, r
        assert 0.5 < r["eval_auc"] <= 1, r


def test_features_dag_ran_through_airflow(demo_report) -> None:
    report, _, _, _ = demo_report
    run = report["counts"]["features_dag_run"]  # triggered through the REST API after the training rounds
    assert run["state"] == "success" and set(run["tasks"].values()) == {"success"}, run


def test_final_champion_beats_the_fallback_and_random_policy(demo_report) -> None:
    report, _, _, _ = demo_report
    targets = report["closed_loop"]["targets"]
    margin = targets["margin"]
    print(
        f"final champion served CTR {targets['served_ctr']['served']:.4f} (exploit "
        f"{targets['served_ctr']['served_exploit']:.4f}) vs random {targets['served_ctr']['random']:.4f} and oracle "
        f"{targets['served_ctr']['oracle']:.4f} on the same requests; margin over random "
        f"{margin['final_served_minus_random_same_requests']:+.4f}, over the fallback's served CTR "
        f"{margin['final_served_minus_fallback_served']:+.4f}; eval AUC {targets['auc']['eval_auc']:.4f} vs oracle "
        f"{targets['auc']['oracle_auc_same_eval']:.4f} on the same impressions"
    )
    assert margin["final_served_minus_random_same_requests"] > 0
    assert margin["final_served_minus_fallback_served"] > 0
    ctr = report["serving"]["expected_ctr_top10"]
    assert ctr["served"] > ctr["random"], report["serving"]


def test_every_freshness_figure_is_produced(demo_report) -> None:
    report, report_dir, output, _ = demo_report
    for chain in CHAINS:
        figure = report["freshness"][chain]
        assert figure["n"] == PROBES, (chain, figure)
        assert 0 < figure["median_s"] <= figure["p99_s"], (chain, figure)
    replicas = report["freshness"]["push_to_replica_applied"]["per_replica"]
    assert len(replicas) == 2 and all(q["n"] == PROBES for q in replicas.values())
    latency = report["serving"]["latency"]
    assert latency["n"] == QUERIES and 0 < latency["median_s"] <= latency["p99_s"]
    markdown = (report_dir / "report.md").read_text()
    for label in CHAINS.values():
        assert label in markdown
    for plot in ("closed_loop.png", "loss.png", "freshness.png"):
        assert (report_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    assert f"report: {report_dir / 'report.md'}" in output


def test_online_vs_hourly_batch_from_a_cold_start_is_in_the_report(demo_report) -> None:
    report, report_dir, output, _ = demo_report
    quality = report["online_quality"]
    assert [h["hour"] for h in quality["hours"]] == list(range(1, QUALITY_HOURS + 1))
    for hour in quality["hours"]:
        assert 0.5 < hour["online_oracle_auc"] <= 1 and 0 < hour["random_ctr"] < hour["oracle_ctr"], hour
        assert 0 < hour["online_ctr"] <= hour["oracle_ctr"] and 0 < hour["batch_ctr"] <= hour["oracle_ctr"], hour
    # the simulation ran on the demo's world: its options are the demo's
    assert f"--users {USERS} --items {ITEMS}" in quality["command"]
    assert quality["flushes"] > 0
    markdown = (report_dir / "report.md").read_text()
    assert "## Online vs hourly batch from a cold start" in markdown
    assert (report_dir / quality["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "final-hour gap to the oracle AUC: online" in output


def test_the_loop_dashboard_showed_the_live_loop_during_the_demo(demo_report) -> None:
    report, report_dir, output, _ = demo_report
    assert DASHBOARD_CUE in output, "the demo never announced its last round's traffic"
    path = report_dir / DASHBOARD_RESULT
    assert path.exists(), f"the browser never saved what it saw ({path})"
    seen = json.loads(path.read_text())
    print(f"targets up: {seen['targets_up']}; browser: {seen['stderr_tail'][-1500:]}")
    problems = dashboard_problems(seen, consumer_group=_stream_app_id(report_dir.parent), now=seen["looked_at"])
    assert not problems, problems
    panels = {p["title"]: p for p in seen["result"]["panels"]}
    # the demo's own loop: both inference replicas, and the model its rounds promoted being served
    assert "replica-1" in panels["Parameter version per copy"]["legend"], panels["Parameter version per copy"]
    assert f"{report['model']['name']}/" in panels["Served model version"]["legend"], panels["Served model version"]
    assert DASHBOARD_SCREENSHOT.stat().st_size > 10_000
    # Prometheus scraped every component of the demo, and its own targets page says so
    assert seen["targets_up"] == dict.fromkeys(DEMO_SCRAPE_JOBS, "1"), seen["targets_up"]
    targets_page = seen["targets_page"]
    assert targets_page["returncode"] == 0, targets_page
    assert TARGETS_SCREENSHOT.stat().st_size > 10_000
