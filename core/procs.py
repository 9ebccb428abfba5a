"""Small process and port helpers every room may use (no service knowledge here)."""

from __future__ import annotations

import socket
from pathlib import Path

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), None when no such live process: with the PID it names one
    process, not a later one that got the same PID."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[19])
