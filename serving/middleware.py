"""The body middleware: a request body over the limit gets 413 before any parsing (chunked bodies too), and a
body that does not arrive in time gets 408 with the connection closed (a slow-loris body holds nothing long).

The headers' own deadline is the HTTP protocol's (``serving.server``): the app is called only once they are in.
"""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """Read the whole body first: 413 beyond ``limit`` bytes, 408 unless it is in within ``read_timeout_s``."""

    def __init__(self, app: ASGIApp, limit: int, read_timeout_s: float) -> None:
        self.app, self.limit, self.read_timeout_s = app, limit, read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _problem(send, 413, f"request body exceeds {self.limit} bytes")
        chunks: list[bytes] = []
        size = 0
        more = True
        with anyio.move_on_after(self.read_timeout_s) as reading:
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    return await _problem(send, 413, f"request body exceeds {self.limit} bytes")
                chunks.append(chunk)
                more = message.get("more_body", False)
        if reading.cancelled_caught:
            # closed: a client this slow must not keep the connection (nor send the rest of its body on it)
            return await _problem(send, 408, f"request body not received within {self.read_timeout_s:g}s", close=True)
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _problem(send: Send, status: int, detail: str, close: bool = False) -> None:
    """A ``serving.schemas.Problem`` answer, written before the app (and its exception handlers) saw the request."""
    body = f'{{"detail":"{detail}"}}'.encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
