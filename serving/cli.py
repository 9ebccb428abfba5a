"""`recsys serve` (filled in by issue #7: the recommendation API)."""

import typer

app = typer.Typer(invoke_without_command=True)


@app.callback()
def serve() -> None:
    """Serve the recommendation API (not built yet: issue #7)."""
    typer.echo("the serving API is not built yet (issue #7)", err=True)
    raise typer.Exit(2)
