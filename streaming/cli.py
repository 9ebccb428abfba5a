"""`recsys stream ...` (filled in by issue #3: the Faust worker)."""

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("worker")
def worker() -> None:
    """Run the Faust stream worker (not built yet: issue #3)."""
    typer.echo("the stream worker is not built yet (issue #3)", err=True)
    raise typer.Exit(2)
