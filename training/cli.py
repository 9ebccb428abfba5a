"""`recsys train` (filled in by issue #5: the trainer)."""

import typer

app = typer.Typer(invoke_without_command=True)


@app.callback()
def train() -> None:
    """Train on a window of samples (not built yet: issue #5)."""
    typer.echo("the trainer is not built yet (issue #5)", err=True)
    raise typer.Exit(2)
