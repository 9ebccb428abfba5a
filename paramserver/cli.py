"""`recsys ps ...` (filled in by issue #4: the parameter service)."""

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("status")
def status() -> None:
    """Show shards and replicas (not built yet: issue #4)."""
    typer.echo("the parameter service is not built yet (issue #4)", err=True)
    raise typer.Exit(2)
