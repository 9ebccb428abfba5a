"""What every room's CLI shares: the error console, loading the settings, and failing with a message."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

from recsys.settings import Settings, get_settings

console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (2: bad usage or configuration)."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(code)


def load_settings() -> Settings:
    """The settings object, or exit 2 naming the bad RECSYS_* variable (pydantic's message)."""
    try:
        return get_settings()
    except Exception as exc:  # pydantic ValidationError
        fail(f"invalid configuration: {exc}", 2)
