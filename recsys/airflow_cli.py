"""`recsys airflow up|down|status`: the local Airflow that runs the project's DAGs (see local_services.airflow)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from core.cli_support import console, load_settings

app = typer.Typer(no_args_is_help=True)
out = Console()


@app.command("up")
def up() -> None:
    """Start api-server (UI), dag-processor, triggerer and scheduler on 127.0.0.1; harmless when running."""
    from local_services import airflow as airflow_local
    from local_services import services

    s = load_settings()
    console.print(f"starting Airflow (home {airflow_local.layout(s).home}); this takes 20-60 s ...")
    try:
        result = airflow_local.up(s)
    except (airflow_local.AirflowError, services.ServiceError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"started: {', '.join(result.started) or 'nothing (already running)'}")
    out.print(f"Airflow UI: {result.url}  user: {result.user}")
    if result.password_new:
        out.print(f"generated admin password (shown once): {result.password}")
    else:
        out.print(f"admin password: in {airflow_local.layout(s).passwords_file}")


@app.command("down")
def down() -> None:
    """Stop the Airflow services that `recsys airflow up` started."""
    from local_services import airflow as airflow_local

    for component, stopped in airflow_local.down(load_settings()):
        console.print(f"airflow {component}: {'stopped' if stopped else 'was not running'}")


@app.command("status")
def status() -> None:
    """Show the Airflow services, their PIDs and health as the api-server reports it."""
    from local_services import airflow as airflow_local

    s = load_settings()
    entries, report = airflow_local.status(s)
    table = Table("service", "pid", "process", "health", "log")
    keys = {"api-server": "metadatabase", **airflow_local.HEALTH_KEYS}
    for entry in entries:
        component = entry.name.removeprefix("airflow-")
        state = ((report or {}).get(keys.get(component, ""), {}) or {}).get("status", "-")
        table.add_row(
            component,
            str(entry.pid),
            "[green]running[/green]" if entry.running else "[red]stopped[/red]",
            state,
            str(entry.log_file),
        )
    if not entries:
        table.add_row("-", "-", "not started", "-", str(s.local.run_dir))
    out.print(table)
    if report is not None:
        out.print(f"UI: {airflow_local.base_url(s)}")
