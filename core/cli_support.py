"""What every room's CLI shares: the error console, loading the settings, and failing with a message."""

from __future__ import annotations

import warnings
from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

from core.settings import Settings, UnknownSettingWarning, describe_error, get_settings

console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (2: bad usage or configuration)."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(code)


def load_settings() -> Settings:
    """The settings object, or exit 2 naming the bad RECSYS_* variable; unknown RECSYS_* variables are warned of."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnknownSettingWarning)
            settings = get_settings()
    except ValidationError as exc:
        fail(f"invalid configuration: {describe_error(exc)}", 2)
    for warning in caught:
        console.print(f"[yellow]warning:[/yellow] {warning.message}", soft_wrap=True)
    return settings
