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
from recsys.demo.config import FEATURES_DAG, DemoConfig, Report, console, demo_overrides, step
from recsys.demo.online import online_stage, quality_stage
from recsys.demo.probes import measure_freshness
from recsys.demo.report import write_report
from recsys.demo.stages import (
    Background,
    Startup,
    champion,
    query_serving,
    run_dag,
    run_training_dag,
    start_services,
    stop_everything,
    wait_served,
)

if TYPE_CHECKING:
    from traffic.simulator import World


@dataclass
class _Handoff:
    """What one stage hands the later ones; each field is set by the stage named beside it."""

    startup: Startup | None = None  # services
    world: World | None = None  # profiles
    client: Any = None  # champion: the MLflow client
    version: str = ""  # champion: its registered version


def run_demo(config: DemoConfig) -> tuple[Report, Path]:
    """The whole loop; returns the report and the path of report.md."""
    from recsys.demo import loop

    run_dir = Path(os.environ.get("RECSYS_RUN_DIR", str(PROJECT_ROOT / ".run"))).resolve()
    os.environ.update(demo_overrides(os.environ, run_dir, config.mlflow_port if config.mlflow_server else None))
    s = Settings()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = config.report_dir or PROJECT_ROOT / "reports" / f"demo-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    truth_path = out_dir / "truth.jsonl"
    truth_path.write_bytes(b"")
    # the training DAG's jobs log the oracle AUC of their windows (the Airflow it starts inherits this)
    os.environ.setdefault("RECSYS_TRAIN_TRUTH_FILE", str(truth_path))
    report = Report(
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
    )
    report.closed_loop["truth_file"] = str(truth_path)
    got = _Handoff()

    def services() -> None:
        got.startup = start_services(s, config, report)

    def profiles() -> None:
        assert got.startup is not None  # the services stage ran
        got.world = loop.make_world(config)
        loop.publish_profiles(s, config, got.world, report)
        got.startup.serving.result(config.stage_timeout_s)

    def phase(name: str, duration_s: float) -> Callable[[], None]:
        def run() -> None:
            assert got.world is not None  # the profiles stage ran
            loop.closed_loop_phase(s, config, got.world, name, duration_s, report, truth_path)

        return run

    def training(index: int) -> Callable[[], None]:
        def run() -> None:
            assert got.startup is not None  # the services stage ran
            traffic: list[Background] = []

            def trained(task_id: str) -> None:
                # users keep arriving while the model is evaluated, gated and promoted, as they would:
                # served by the champion of the moment, then by the new one (the switch shows in the
                # series); their samples are the next round's window. Not before the train task has
                # read its window: the newest samples of a window cut while traffic flows are mostly
                # clicks (an impression's negative sample waits for its attribution window), and an
                # evaluation set of only clicks is not evaluable
                if task_id == "train":
                    traffic.append(
                        Background(f"closed loop during round {index}", phase(f"during round {index}", config.phase_s))
                    )

            since_ms = int(time.time() * 1000)
            dag = run_training_dag(s, config, got.startup, on_success=trained)
            entry = loop.describe_round(s, index, dag, since_ms)
            report.rounds.append(entry)
            if entry["outcome"] == "promoted":
                wait_served(
                    f"http://127.0.0.1:{s.serving.port}",
                    f"{s.serving.model_name}/{entry['model_version']}",
                    config.stage_timeout_s,
                )
            for background in traffic:
                background.result(config.phase_s + config.stage_timeout_s)

        return run

    def features_dag() -> None:
        # the features DAG (materialize, compact the offline store) runs through Airflow like the training DAG
        assert got.startup is not None  # the services stage ran
        report.counts["features_dag_run"] = run_dag(s, config, got.startup, FEATURES_DAG, {})

    def champion_stage() -> None:
        got.client, got.version = champion(s, report)

    def measured() -> None:
        truth = loop.read_truth(truth_path)
        loop.check_labels(s, truth, report)
        loop.add_round_oracles(s, report, truth)
        loop.judge_targets(s, report)

    def serving(settled: bool = False) -> None:
        assert got.world is not None  # the profiles stage ran
        query_serving(s, config, got.world, got.version, report, settled)

    stages: list[tuple[str, Callable[[], None]]] = [
        ("services", services),
        ("profiles", profiles),
        ("phase_cold_start", phase("cold start", config.cold_s)),
    ]
    stages += [(f"training_round_{index}", training(index)) for index in range(1, config.rounds + 1)]
    stages += [("features_dag", features_dag)]
    stages += [
        ("phase_final", phase("final", config.final_s)),
        ("champion", champion_stage),
        ("labels_and_targets", measured),
        ("serving", serving),
        ("freshness", lambda: measure_freshness(s, config, got.client, got.version, report)),
        ("serving_settled", lambda: serving(settled=True)),
    ]
    if config.online_s > 0:
        stages += [("online", lambda: online_stage(s, config, got.world, got.version, report, truth_path, out_dir))]
    if config.quality_hours > 0:
        stages += [("online_vs_batch", lambda: quality_stage(s, config, report, out_dir))]
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
_D = DemoConfig()  # the options' defaults: one place


@app.callback()
def demo(
    users: Annotated[int, typer.Option(min=10, help="simulated users")] = _D.users,
    items: Annotated[int, typer.Option(min=10, max=1000, help="simulated items (all are ranked per query)")] = _D.items,
    seed: Annotated[int, typer.Option(help="simulator seed")] = _D.seed,
    rate: Annotated[
        float, typer.Option(min=0.1, max=10_000, help="closed loop: recommendation requests per second")
    ] = _D.rate,
    concurrency: Annotated[
        int, typer.Option(min=1, max=1024, help="closed loop: requests in flight at most")
    ] = _D.concurrency,
    cold_s: Annotated[
        float, typer.Option(min=5, help="seconds of the first phase, served by the fallback scorer")
    ] = _D.cold_s,
    phase_s: Annotated[
        float, typer.Option(min=5, help="seconds of traffic during each training round, from the end of its train task")
    ] = _D.phase_s,
    final_s: Annotated[float, typer.Option(min=5, help="seconds of the last phase (the final champion)")] = _D.final_s,
    rounds: Annotated[int, typer.Option(min=1, max=20, help="training rounds (DAG runs)")] = _D.rounds,
    bucket_s: Annotated[float, typer.Option(min=1, help="width of the served-CTR time buckets")] = _D.bucket_s,
    epochs: Annotated[int, typer.Option(min=1, max=100, help="training epochs (DAG run parameter)")] = _D.epochs,
    ranks: Annotated[int, typer.Option(min=1, max=8, help="torchrun ranks (DAG run parameter)")] = _D.ranks,
    probes: Annotated[int, typer.Option(min=1, max=1000, help="freshness probes per chain")] = _D.probes,
    query_users: Annotated[int, typer.Option(min=1, help="users queried against serving")] = _D.query_users,
    online_s: Annotated[
        float, typer.Option(min=0, help="seconds of closed loop served by the online trainer (0: none; e.g. 90)")
    ] = _D.online_s,
    online_probes: Annotated[
        int, typer.Option(min=1, max=1000, help="click → served freshness probes of the online stage")
    ] = _D.online_probes,
    quality_hours: Annotated[
        int,
        typer.Option(min=0, max=100, help="simulated hours of online vs hourly batch from a cold start (0: skipped)"),
    ] = _D.quality_hours,
    quality_hour_samples: Annotated[
        int, typer.Option(min=1000, help="impressions per simulated hour of that comparison")
    ] = _D.quality_hour_samples,
    mlflow_server: Annotated[
        bool, typer.Option(help="run `mlflow server` (else a SQLite tracking URI)")
    ] = _D.mlflow_server,
    mlflow_port: Annotated[int, typer.Option(min=1, max=65535, help="port of the MLflow server")] = _D.mlflow_port,
    stop: Annotated[bool, typer.Option("--stop/--keep", help="stop every service at the end")] = _D.stop,
    stage_timeout_s: Annotated[float, typer.Option(min=10, help="longest wait of one stage")] = _D.stage_timeout_s,
    report_dir: Annotated[Path | None, typer.Option(help="where the report goes (default reports/demo-<time>)")] = None,
) -> None:
    """Run the whole loop on local services, measure it and write a Markdown + PNG report."""
    if users < 10 or items < 10:
        raise typer.BadParameter("users and items must be at least 10")
    config = DemoConfig(
        users=users,
        items=items,
        seed=seed,
        rate=rate,
        concurrency=concurrency,
        cold_s=cold_s,
        phase_s=phase_s,
        final_s=final_s,
        rounds=rounds,
        bucket_s=bucket_s,
        epochs=epochs,
        ranks=ranks,
        probes=probes,
        query_users=query_users,
        online_s=online_s,
        online_probes=online_probes,
        quality_hours=quality_hours,
        quality_hour_samples=quality_hour_samples,
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
