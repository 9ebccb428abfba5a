"""uvicorn as `recsys serve` runs it: the serving settings' keep-alive and a deadline for a request's headers.

uvicorn bounds how long an *idle* keep-alive connection stays open, but not how long a client may
take to send a request: every byte it receives restarts nothing and cancels the keep-alive timer, so
a client sending a header byte every few seconds (slow loris) holds its connection for ever, and a
few hundred of them exhaust the server. ``HeaderDeadlineProtocol`` adds that deadline to uvicorn's
httptools protocol (the one uvicorn[standard] picks by default): from a connection's start, and from
the first byte of each further request on it, the line and headers must be in within
``header_timeout_s``, else the client gets 408 and the connection is closed. The body's deadline is
the app's (``serving.middleware.BodyLimit``), since the app reads the body.

This subclasses uvicorn internals (``HttpToolsProtocol``'s parser callbacks): uvicorn is pinned in
pyproject, and tests/serving/test_slow_clients.py breaks when a new version changes them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from core.settings import ServingSettings

_TIMEOUT_BODY = b'{"detail":"request headers not received in time"}'
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY
)


class ServingConfig(uvicorn.Config):
    """A uvicorn ``Config`` that carries the header deadline to ``HeaderDeadlineProtocol`` (and to worker processes,
    which get the config pickled)."""

    def __init__(self, app: Any, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, http=HeaderDeadlineProtocol, **kwargs)
        self.header_timeout_s = header_timeout_s


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request line and headers are late (408)."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not isinstance(config, ServingConfig):
            raise TypeError("HeaderDeadlineProtocol needs a ServingConfig (it carries header_timeout_s)")
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout_s = config.header_timeout_s
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a request is a slow client too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_deadline is None:  # the next request of a keep-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        # a pipelined request may still be answering the previous one: then only close, never mix two answers
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def server_config(app: Any, serving: ServingSettings, **uvicorn_options: Any) -> ServingConfig:
    """The uvicorn config of ``app`` with the slow-client limits of ``serving`` (header, body, keep-alive)."""
    return ServingConfig(
        app,
        header_timeout_s=serving.header_timeout_s,
        timeout_keep_alive=serving.keep_alive_s,
        **uvicorn_options,
    )


def run(serving: ServingSettings, host: str, port: int, workers: int, log_level: str) -> None:
    """Serve ``serving.asgi:app`` (each worker process builds it from RECSYS_* itself) until interrupted."""
    from uvicorn.supervisors import Multiprocess

    config = server_config(
        "serving.asgi:app",
        serving,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    # what uvicorn.run does, with our config: one process serves itself, more share one bound socket
    if config.workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    server.run()
    if not server.started:
        raise SystemExit(3)  # uvicorn's STARTUP_FAILURE, as uvicorn.run exits
