"""Small asyncio helpers of the worker's send path."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


def done() -> asyncio.Future[Any]:
    """A future already completed: what is returned when there is nothing to wait for."""
    future = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


async def acked(handed: Awaitable[asyncio.Future[Any]]) -> None:
    """Wait until a send was handed over, then for its acknowledgement."""
    await (await handed)
