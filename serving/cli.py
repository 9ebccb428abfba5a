"""`recsys serve`: the recommendation API under uvicorn (``serving.server``), on 127.0.0.1 by default."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(invoke_without_command=True)


@app.callback()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (default: RECSYS_SERVING_HOST)")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="port (default: RECSYS_SERVING_PORT)")] = None,
    workers: Annotated[int | None, typer.Option(min=1, max=64, help="worker processes")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "warning",
) -> None:
    """Serve the recommendation API (POST /v1/recommend, /v1/score; /healthz, /readyz, /metrics, /docs)."""
    import logging

    from core.cli_support import load_settings
    from serving.server import run

    settings = load_settings()
    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        typer.echo(f"unknown log level {log_level!r}", err=True)
        raise typer.Exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = host or settings.serving.host
    port = port or settings.serving.port
    workers = workers or settings.serving.workers
    typer.echo(f"serving on http://{host}:{port} (docs: /docs)", err=True)
    run(settings.serving, host=host, port=port, workers=workers, log_level=log_level)
