"""Load shedding and request deadlines of the ranking endpoints.

``LoadShed`` is a pure-ASGI middleware: a request to a ranking path (/v1/recommend,
/v1/score) takes a slot of a bounded gate before its body is even read; with
``max_in_flight`` slots taken it is answered 503 with ``Retry-After`` at once, so an
overloaded replica fails fast instead of queueing until every client times out. Health,
readiness, metrics and ping never take a slot: an orchestrator must still see the replica.

``run_with_deadline`` runs the blocking ranking in the thread pool and stops waiting for
it when the request's deadline (``request_deadline_s`` from the moment the middleware
admitted it) passes; the endpoint then answers 504. A thread cannot be killed, so the
abandoned work keeps its slot until it really ends: hung dependencies therefore fill the
gate and later requests are shed at once, rather than piling up threads without bound.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.metrics import Metrics

T = TypeVar("T")

SHED_PATHS = {"/v1/recommend": "recommend", "/v1/score": "score"}


class DeadlineExpired(Exception):
    """The ranking did not finish before the request's deadline (the endpoint answers 504)."""


class Gate:
    """A counter of ranking requests in flight, bounded by ``limit`` (thread-safe: slots end in worker threads)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()

    def enter(self) -> Slot | None:
        """A slot, or None when ``limit`` are taken."""
        with self._lock:
            if self.in_flight >= self.limit:
                return None
            self.in_flight += 1
        return Slot(self)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


class Slot:
    """One admitted request; freed when every holder (the request, and the thread doing its work) let go."""

    def __init__(self, gate: Gate) -> None:
        self.started = time.monotonic()
        self._gate = gate
        self._holders = 1
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            done = self._holders == 0
        if done:
            self._gate._leave()


class LoadShed:
    """Bound the ranking requests in flight; beyond ``gate.limit`` answer 503 + Retry-After before any parsing."""

    def __init__(self, app: ASGIApp, gate: Gate, metrics: Metrics, retry_after_s: int) -> None:
        self.app, self.gate, self.metrics = app, gate, metrics
        metrics.in_flight.set_function(lambda: gate.in_flight)  # read at scrape time, abandoned work included
        self.retry_after = str(retry_after_s).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = SHED_PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        slot = self.gate.enter()
        if slot is None:
            self.metrics.shed.labels(endpoint).inc()
            return await _overloaded(send, self.retry_after)
        scope.setdefault("state", {})["slot"] = slot  # read by run_with_deadline through request.state
        try:
            await self.app(scope, receive, send)
        finally:
            slot.release()


async def run_with_deadline(
    slot: Slot | None,
    deadline_s: float,
    fn: Callable[..., T],
    *args: object,
    limiter: anyio.CapacityLimiter | None = None,
) -> T:
    """``fn(*args)`` in the thread pool, waited for until ``deadline_s`` after the slot's admission.

    ``limiter`` bounds the threads ranking at once (None: anyio's default pool of 40).
    Raises ``DeadlineExpired`` when the time is up; the thread is abandoned (it cannot be
    stopped) and keeps the slot until it returns. Without a slot (an app built without the
    middleware) the deadline counts from now.
    """
    started = slot.started if slot is not None else time.monotonic()
    remaining = started + deadline_s - time.monotonic()
    if remaining <= 0:
        raise DeadlineExpired(f"no time left of the {deadline_s:g}s deadline")
    if slot is not None:
        slot.hold()

    def work() -> T:
        try:
            return fn(*args)
        finally:
            if slot is not None:
                slot.release()

    with anyio.move_on_after(remaining):
        # waiting for a thread of ``limiter`` counts against the deadline too
        return await anyio.to_thread.run_sync(work, abandon_on_cancel=True, limiter=limiter)
    raise DeadlineExpired(f"the ranking did not finish within the {deadline_s:g}s deadline")


async def _overloaded(send: Send, retry_after: bytes) -> None:
    body = b'{"detail":"overloaded: too many requests in flight, retry later"}'
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", retry_after),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
