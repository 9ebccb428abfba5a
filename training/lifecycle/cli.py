"""`recsys model ...`: the served state (champion dense part + its parameter rows) and rolling it back."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from core.cli_support import fail, load_settings
from training.lifecycle import LifecycleError

app = typer.Typer(no_args_is_help=True)
out = Console()


@app.command("show")
def show(as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False) -> None:
    """The champion, the parameter version holding its rows, what a rollback returns to, and the staged rows."""
    from training.lifecycle import served

    s = load_settings()
    try:
        info = served.describe(s)
    except LifecycleError as exc:
        fail(str(exc))
    if as_json:
        out.print_json(json.dumps(info))
        return
    if info["champion"] is None:
        out.print(f"{info['model']}: no champion yet; staged: {info['stages'] or 'nothing'}")
        return
    out.print(
        f"{info['model']}: champion v{info['champion']} with rows at parameter version {info['ps_version']}; "
        f"a rollback returns to {('v' + info['previous']) if info['previous'] else 'nothing (first champion)'}"
    )
    out.print(f"staging areas: {', '.join(info['stages']) or 'none'}")


@app.command("rollback")
def rollback() -> None:
    """Make the previous champion the champion again: its dense part and its rows, exactly as they were served."""
    from training.lifecycle import served

    s = load_settings()
    try:
        done = served.rollback(s)
    except LifecycleError as exc:
        fail(str(exc))
    out.print(
        f"rolled back v{done['rolled_back']} -> champion v{done['champion']} (rows at parameter version "
        f"{done['ps_version']}); serving loads it at its next poll, or `POST /admin/reload` now"
    )
