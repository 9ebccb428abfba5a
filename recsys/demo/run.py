"""`recsys demo`: the stages in order, the report written whatever happens, and the command itself."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from core.settings import PROJECT_ROOT, Settings
from recsys.demo.config import DemoConfig, Report, console, demo_overrides, step
from recsys.demo.probes import measure_freshness
from recsys.demo.report import write_report
from recsys.demo.stages import (
    Startup,
    champion,
    query_serving,
    run_training_dag,
    simulate_and_stream,
    start_services,
    stop_everything,
)

if TYPE_CHECKING:
    from traffic.simulator import Simulation


@dataclass
class _Handoff:
    """What one stage hands the later ones; each field is set by the stage named beside it."""

    startup: Startup | None = None  # services
    sim: Simulation | None = None  # simulate_and_stream
    client: Any = None  # champion: the MLflow client
    version: str = ""  # champion: its registered version


def run_demo(config: DemoConfig) -> tuple[Report, Path]:
    """The whole loop; returns the report and the path of report.md."""
    run_dir = Path(os.environ.get("RECSYS_RUN_DIR", str(PROJECT_ROOT / ".run"))).resolve()
    os.environ.update(demo_overrides(os.environ, run_dir, config.mlflow_port if config.mlflow_server else None))
    s = Settings()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = config.report_dir or PROJECT_ROOT / "reports" / f"demo-{stamp}"
    report = Report(
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
    )
    got = _Handoff()

    def services() -> None:
        got.startup = start_services(s, config, report)

    def simulate() -> None:
        got.sim = simulate_and_stream(s, config, report)

    def training() -> None:
        assert got.startup is not None  # the services stage ran
        run_training_dag(s, config, got.startup, report)

    def champion_stage() -> None:
        got.client, got.version = champion(s, report)

    def serving(settled: bool = False) -> None:
        assert got.sim is not None  # the simulate stage ran
        query_serving(s, config, got.sim, got.version, report, settled)

    stages: list[tuple[str, Callable[[], None]]] = [
        ("services", services),
        ("simulate_and_stream", simulate),
        ("training_dag", training),
        ("champion", champion_stage),
        ("serving", serving),
        ("freshness", lambda: measure_freshness(s, config, got.client, got.version, report)),
        ("serving_settled", lambda: serving(settled=True)),
    ]
    try:
        for name, stage in stages:
            started = time.monotonic()
            try:
                stage()
            finally:
                report.stage_seconds[name] = round(time.monotonic() - started, 1)
    finally:
        path = write_report(report, out_dir)
        if config.stop:
            step("stopping every service (--stop)")
            stop_everything(s)
    return report, path


app = typer.Typer(invoke_without_command=True)


@app.callback()
def demo(
    users: Annotated[int, typer.Option(min=10, help="simulated users")] = 500,
    items: Annotated[int, typer.Option(min=10, max=1000, help="simulated items (all are ranked per query)")] = 300,
    requests: Annotated[
        int, typer.Option(min=50, help="simulated recommendation requests (10 impressions each)")
    ] = 4000,
    seed: Annotated[int, typer.Option(help="simulator seed")] = 1,
    bad_fraction: Annotated[float, typer.Option(min=0.0, max=0.5, help="share of malformed records")] = 0.01,
    rate: Annotated[
        float, typer.Option(min=0.0, help="publish at most this many records/s (0: as fast as possible)")
    ] = 0.0,
    epochs: Annotated[int, typer.Option(min=1, max=100, help="training epochs (DAG run parameter)")] = 4,
    ranks: Annotated[int, typer.Option(min=1, max=8, help="torchrun ranks (DAG run parameter)")] = 1,
    probes: Annotated[int, typer.Option(min=1, max=1000, help="freshness probes per chain")] = 20,
    query_users: Annotated[int, typer.Option(min=1, help="users queried against serving")] = 100,
    mlflow_server: Annotated[bool, typer.Option(help="run `mlflow server` (else a SQLite tracking URI)")] = True,
    mlflow_port: Annotated[int, typer.Option(min=1, max=65535, help="port of the MLflow server")] = 5000,
    stop: Annotated[bool, typer.Option("--stop/--keep", help="stop every service at the end")] = False,
    stage_timeout_s: Annotated[float, typer.Option(min=10, help="longest wait of one stage")] = 600.0,
    report_dir: Annotated[Path | None, typer.Option(help="where the report goes (default reports/demo-<time>)")] = None,
) -> None:
    """Run the whole loop on local services, measure it and write a Markdown + PNG report."""
    if users < 10 or items < 10:
        raise typer.BadParameter("users and items must be at least 10")
    config = DemoConfig(
        users=users,
        items=items,
        requests=requests,
        seed=seed,
        bad_fraction=bad_fraction,
        rate=rate,
        epochs=epochs,
        ranks=ranks,
        probes=probes,
        query_users=query_users,
        mlflow_server=mlflow_server,
        mlflow_port=mlflow_port,
        stop=stop,
        stage_timeout_s=stage_timeout_s,
        report_dir=report_dir,
    )
    try:
        report, path = run_demo(config)
    except Exception as exc:  # noqa: BLE001 (DemoError, ServiceError, AirflowError, Kafka: a message, not a trace)
        console.print(f"[red]demo failed:[/red] {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    out = Console()
    out.print(f"\nreport: {path}")
    for name, url in report.urls.items():
        out.print(f"{name.replace('_', ' ')}: {url}")
    if stop:
        out.print("services stopped (--stop)")
    else:
        out.print(
            "services keep running: `uv run recsys services status`; stop them with `uv run recsys services down`"
        )
