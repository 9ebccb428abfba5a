"""A local Prometheus scraping every component's ``/metrics``, the loop exporter beside it, and the loop dashboard.

Debian's ``prometheus`` (2.42) runs on 127.0.0.1 with its data under ``run_dir/prometheus``. The
scrape configuration is generated from the settings: serving's ``/metrics`` always, the stream
worker, the online trainer and the closed-loop simulator when their metrics port is set, and the
loop exporter (``local_services.loop_exporter``: consumer lag and the parameter version of every
copy, which no component can report about itself).

The dashboard is a Prometheus console template (``local_services/dashboard/loop.html``), served by
Prometheus itself at ``/consoles/loop.html``: no extra server, and its plots are drawn by the page's
own script from Prometheus's query API, so it works with no network beyond this machine (no CDN).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from core.procs import LOCALHOST
from core.settings import Settings
from local_services import services

DASHBOARD_ASSETS = Path(__file__).parent / "dashboard"
DASHBOARD_PAGE = "loop.html"
# placeholders of the dashboard template, filled in when it is installed for one Prometheus
_SCRAPE_PLACEHOLDER = "@SCRAPE_INTERVAL_S@"
_PROMETHEUS = "prometheus"
_EXPORTER = "loop-exporter"


@dataclass(frozen=True)
class ScrapeTarget:
    """One component Prometheus scrapes: its job name and ``host:port`` (path ``/metrics``)."""

    job: str
    address: str


def targets_from_settings(s: Settings) -> list[ScrapeTarget]:
    """Every component of the settings that serves ``/metrics`` (a metrics port of 0 is off: not scraped)."""
    targets = [
        ScrapeTarget("serving", f"{LOCALHOST}:{s.serving.port}"),
        ScrapeTarget("loop-exporter", f"{LOCALHOST}:{s.local.loop_exporter_port}"),
    ]
    for job, port in (
        ("stream-worker", s.stream.metrics_port),
        ("online-trainer", s.online.metrics_port),
        ("simulator", s.sim.metrics_port),
    ):
        if port:
            targets.append(ScrapeTarget(job, f"{LOCALHOST}:{port}"))
    return targets


def scrape_config(targets: list[ScrapeTarget], interval_s: float) -> dict:
    """The ``prometheus.yml`` document (JSON is YAML) scraping ``targets`` and Prometheus itself."""
    interval = f"{interval_s:g}s"
    jobs: dict[str, list[str]] = {}
    for target in targets:
        jobs.setdefault(target.job, []).append(target.address)
    return {
        # a scrape must end before the next one starts
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": addresses}]}
            for job, addresses in sorted(jobs.items())
        ],
    }


@dataclass(frozen=True)
class Layout:
    home: Path

    @property
    def config_file(self) -> Path:
        return self.home / "prometheus.yml"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def consoles(self) -> Path:
        return self.home / "consoles"


def layout(run_dir: Path) -> Layout:
    return Layout(run_dir / "prometheus")


def dashboard_url(port: int) -> str:
    return f"http://{LOCALHOST}:{port}/consoles/{DASHBOARD_PAGE}"


def install_dashboard(consoles: Path, interval_s: float) -> Path:
    """The dashboard template copied where Prometheus serves consoles from, with the scrape interval filled in."""
    consoles.mkdir(parents=True, exist_ok=True)
    page = (DASHBOARD_ASSETS / DASHBOARD_PAGE).read_text()
    target = consoles / DASHBOARD_PAGE
    target.write_text(page.replace(_SCRAPE_PLACEHOLDER, f"{interval_s:g}"))
    return target


def ensure_prometheus_installed() -> str:
    """Path of Debian's prometheus binary; ServiceError saying how to install it otherwise."""
    found = shutil.which("prometheus")
    if not found:
        raise services.ServiceError(
            "prometheus is not installed: run scripts/bootstrap.sh (apt-get install -y prometheus)"
        )
    return found


def _reload(port: int) -> None:
    """Ask a running Prometheus to read its (rewritten) configuration again (``--web.enable-lifecycle``)."""
    request = urllib.request.Request(f"http://{LOCALHOST}:{port}/-/reload", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5.0):  # noqa: S310 (a local URL)
            pass
    except OSError as exc:
        raise services.ServiceError(f"prometheus on port {port} did not reload its configuration: {exc}") from exc


def start_prometheus(
    run_dir: Path,
    port: int,
    targets: list[ScrapeTarget],
    *,
    interval_s: float,
    retention: str,
    timeout: float = 60.0,
    name: str = _PROMETHEUS,
) -> dict:
    """Prometheus on 127.0.0.1:``port`` scraping ``targets``, with the dashboard installed (idempotent: a
    running one gets the new configuration and dashboard and reloads)."""
    binary = ensure_prometheus_installed()
    paths = layout(run_dir)
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    paths.config_file.write_text(json.dumps(scrape_config(targets, interval_s), indent=2))
    install_dashboard(paths.consoles, interval_s)
    running = services.recorded_alive(run_dir, name)
    if running is not None:
        _reload(running["port"])
        return running
    cmd = [
        binary,
        f"--config.file={paths.config_file}",
        f"--storage.tsdb.path={paths.data_dir}",
        f"--storage.tsdb.retention.time={retention}",
        f"--web.listen-address={LOCALHOST}:{port}",
        f"--web.console.templates={paths.consoles}",
        f"--web.console.libraries={paths.consoles}",
        "--web.enable-lifecycle",
    ]
    return services.start_command(
        run_dir,
        name,
        cmd,
        port=port,
        marker=f"--web.listen-address={LOCALHOST}:{port}",
        ready=lambda: services.http_ok(f"http://{LOCALHOST}:{port}/-/ready"),
        timeout=timeout,
    )


def start_loop_exporter(run_dir: Path, port: int, env: dict[str, str] | None = None, name: str = _EXPORTER) -> dict:
    """The loop exporter on 127.0.0.1:``port`` (it reads every other setting from ``env``, RECSYS_*)."""
    cmd = [sys.executable, "-m", "local_services.loop_exporter"]
    environment = {**(os.environ if env is None else env), "RECSYS_LOOP_EXPORTER_PORT": str(port)}
    return services.start_command(
        run_dir,
        name,
        cmd,
        port=port,
        marker="local_services.loop_exporter",
        ready=lambda: services.http_ok(f"http://{LOCALHOST}:{port}/metrics", timeout=10.0),
        timeout=60.0,
        env=environment,
    )


def up(s: Settings) -> str:
    """The loop exporter and Prometheus of the settings (idempotent); returns the dashboard's URL.

    The exporter is started again every time: it holds no state, and the one running may have been
    started with other settings (`recsys services up` before the demo set its parameter service)."""
    services.stop(s.local.run_dir, _EXPORTER)
    start_loop_exporter(s.local.run_dir, s.local.loop_exporter_port)
    start_prometheus(
        s.local.run_dir,
        s.local.prometheus_port,
        targets_from_settings(s),
        interval_s=s.local.prometheus_scrape_interval_s,
        retention=s.local.prometheus_retention,
        timeout=s.local.service_start_timeout_s,
    )
    return dashboard_url(s.local.prometheus_port)


class CurrentRegistry(Collector):
    """Serves whichever registry is current: a process that makes a new set of metrics per run (the demo's
    closed-loop phases) keeps one ``/metrics`` address. Counters restart with each registry; Prometheus's
    ``rate`` reads such a restart as a reset, not as a drop."""

    def __init__(self) -> None:
        self._registry: CollectorRegistry | None = None

    def use(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        if self._registry is not None:
            yield from self._registry.collect()


def serve_current(port: int) -> CurrentRegistry:
    """An HTTP ``/metrics`` on 127.0.0.1:``port`` (a daemon thread) of the registry given to ``use``."""
    current = CurrentRegistry()
    registry = CollectorRegistry()
    registry.register(current)
    start_http_server(port, addr=LOCALHOST, registry=registry)
    return current
