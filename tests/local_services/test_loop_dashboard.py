"""The loop dashboard in a real browser, on live traffic.

Real Kafka and Redis (session fixtures), a `recsys stream worker` subprocess with its metrics port,
a real serving app (fallback scorer, rows from a Redis replica), the closed-loop simulator's users
calling it, the loop exporter and Debian's Prometheus scraping all of them. Headless Debian chromium
(playwright-core) opens the dashboard and waits until every panel has plotted data; the screenshots
(the dashboard, and Feast's own UI on the worker's registry) are written to docs/ for the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from core.procs import free_port
from core.settings import PROJECT_ROOT, Settings
from local_services import prometheus as local_prometheus
from local_services import services
from paramserver import open_reader
from serving.app import create_app
from serving.components import Components
from serving.features import StaticFeatures
from serving.model import EmbeddingDotScorer, ModelHandle
from serving.params import RowFetcher
from tests.browser.harness import DOCS, dashboard_problems, require_browser, run_script, targets_up
from tests.serving.test_serving_integration import DIM, TABLES, _replicate, _seed_training_copy, _settings, serve
from tests.streaming.test_streaming_kafka import make_setup  # noqa: F401  (fixture)
from traffic.closed_loop import ClosedLoop, ClosedLoopConfig, kafka_sink
from traffic.simulator import SimConfig, World

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SCRAPE_S = 2.0


class Traffic(threading.Thread):
    """The closed loop in a thread of its own, stopped (cancelled) when the test is done with it."""

    def __init__(self, loop: ClosedLoop) -> None:
        super().__init__(daemon=True)
        self.loop = loop
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        async def main() -> None:
            self.aio = asyncio.get_running_loop()
            self.task = asyncio.ensure_future(self.loop.run())
            self.ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 (reported by stop())
            self.error = exc

    def stop(self) -> None:
        self.ready.wait(30)
        if self.is_alive():
            self.aio.call_soon_threadsafe(self.task.cancel)
        self.join(60)
        assert self.error is None, self.error


def start_feast_ui(run_dir: Path, feast_dir: Path, port: int) -> str:
    """`feast ui` on the worker's registry (the command the demo prints), as a managed service of ``run_dir``."""
    feast = str(Path(sys.executable).parent / "feast")
    cmd = [feast, "-c", str(PROJECT_ROOT / "feature_repo"), "ui", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "RECSYS_FEAST_DATA_DIR": str(feast_dir)}
    services.start_command(
        run_dir, "feast-ui", cmd, port=port, ready=lambda: services.http_ok(url), timeout=180, env=env
    )
    return url


def _wait_http(url: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not services.http_ok(url, timeout=2.0):
        assert time.monotonic() < deadline, f"{what} did not answer at {url} within {timeout:.0f}s"
        time.sleep(1.0)


def test_the_dashboard_plots_every_panel_from_live_traffic(make_setup, redis_factory, test_settings, tmp_path):  # noqa: F811
    require_browser()
    world = World(SimConfig(users=40, items=80, slate_size=5, seed=7, click_delay_mean_s=0.5, click_delay_max_s=2.0))
    train, replica = redis_factory("dash-train"), redis_factory("dash-replica")
    _seed_training_copy(train.url, world.user_ids, world.item_ids, TABLES)
    _replicate(train.url, [replica.url])

    setup = make_setup()
    stream_port, sim_port, exporter_port, prom_port = (free_port() for _ in range(4))
    setup.env["RECSYS_STREAM_METRICS_PORT"] = str(stream_port)
    worker = setup.start_worker()
    settings = _settings(test_settings).override(
        kafka={
            "topic_events": setup.events,
            "topic_samples": setup.samples,
            "topic_deadletter": setup.deadletter,
            "topic_late": setup.late,
        }
    )
    comps = Components(
        model=ModelHandle(None, lambda: EmbeddingDotScorer({"user_id": DIM, "item_id": DIM})),
        rows=RowFetcher(open_reader(Settings().ps, [replica.url]), 1000, 0.5),
        features=StaticFeatures(),
        follow_stream=True,
    )
    run_dir = tmp_path / "run"
    exporter_env = {
        **setup.env,
        "RECSYS_PS_SHARDS": json.dumps([train.url]),
        "RECSYS_PS_REPLICAS": json.dumps([replica.url]),
    }
    traffic: Traffic | None = None
    try:
        with serve(create_app(settings, comps)) as base:
            serving_port = int(base.rsplit(":", 1)[1])
            local_prometheus.start_loop_exporter(run_dir, exporter_port, exporter_env)
            targets = [
                local_prometheus.ScrapeTarget("serving", f"127.0.0.1:{serving_port}"),
                local_prometheus.ScrapeTarget("stream-worker", f"127.0.0.1:{stream_port}"),
                local_prometheus.ScrapeTarget("simulator", f"127.0.0.1:{sim_port}"),
                local_prometheus.ScrapeTarget("loop-exporter", f"127.0.0.1:{exporter_port}"),
            ]
            local_prometheus.start_prometheus(run_dir, prom_port, targets, interval_s=SCRAPE_S, retention="1h")
            # the worker serves its metrics once Faust has started (Feast applied): users come after that,
            # as they would to a running system
            _wait_http(f"http://127.0.0.1:{stream_port}/metrics", 240, "the stream worker's metrics")

            config = ClosedLoopConfig.from_settings(
                settings.sim, base, 600.0, rate=25.0, concurrency=4, candidates_share=0.5, candidates=30
            )
            loop = ClosedLoop(world, config, kafka_sink(settings.kafka.bootstrap, settings.kafka.topic_events))
            local_prometheus.serve_current(sim_port).use(loop.metrics.registry)
            traffic = Traffic(loop)
            traffic.start()
            # a new parameter version while users are served: the version panel steps, the replica follows
            time.sleep(10)
            _seed_training_copy(train.url, world.user_ids, world.item_ids, TABLES)
            time.sleep(2 * SCRAPE_S)
            _replicate(train.url, [replica.url])

            DOCS.mkdir(exist_ok=True)
            env = {
                **os.environ,
                "DASHBOARD_URL": local_prometheus.dashboard_url(prom_port),
                "SCREENSHOT": str(DOCS / "loop-dashboard.png"),
                "TIMEOUT_S": "240",
            }
            feast_url = start_feast_ui(run_dir, setup.feast_dir, free_port())
            env |= {
                "EXTRA_URL": f"{feast_url}p/recsys/feature-view",
                "EXTRA_SCREENSHOT": str(DOCS / "feast-ui.png"),
                "EXTRA_TEXT": "user_features",
            }
            seen = run_script("loop_dashboard.mjs", env, timeout=420)
            print(seen.stderr[-4000:])
            print("targets up:", targets_up(prom_port))
    finally:
        if traffic is not None:
            traffic.stop()
        for name in ("feast-ui", "prometheus", "loop-exporter"):
            services.stop(run_dir, name)
        worker.stop()

    problems = dashboard_problems(seen, consumer_group=setup.env["RECSYS_STREAM_APP_ID"])
    assert not problems, (problems, seen.result)
    assert (DOCS / "loop-dashboard.png").stat().st_size > 10_000
    assert (DOCS / "feast-ui.png").stat().st_size > 10_000
