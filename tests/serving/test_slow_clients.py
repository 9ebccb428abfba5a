"""Slow clients against the real server (uvicorn as `recsys serve` configures it, on loopback).

A slow-loris client drips its headers or its body a byte at a time, for far longer than the
server's timeouts; the server must cut it off (408, connection closed) near the timeout, and answer
normal requests all the while. These tests break when a new uvicorn changes the protocol internals
that ``serving.server.HeaderDeadlineProtocol`` relies on.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.serving.test_api import _app
from tests.serving.test_serving_integration import serve

pytestmark = pytest.mark.integration

TIMEOUT_S = 1.0  # header, body and keep-alive timeout of the server under test
DRIP_S = 30.0  # how long a slow client would go on: far beyond every timeout
MARGIN_S = 10.0  # a loaded 2-core machine may be late to close; still far less than the drip
RECOMMEND = b'{"user_id": "u1", "k": 1, "candidate_item_ids": ["a", "b"]}'


@pytest.fixture(scope="module")
def base():
    app = _app(header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S, keep_alive_s=TIMEOUT_S)
    with serve(app) as url:
        yield url


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=DRIP_S)
    sock.settimeout(0.2)
    return sock


def _drip(sock: socket.socket, data: bytes, base: str) -> tuple[bytes, float]:
    """Send ``data`` a byte every 0.2 s until it is sent, the server closes or DRIP_S pass; meanwhile a normal
    client is served. Returns what the server sent back and how long after the first byte the connection ended."""
    started = time.monotonic()
    received = b""
    with httpx.Client(base_url=base, timeout=10) as normal:
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # closed by the server
                break
            chunk = _read(sock)
            received += chunk or b""
            if chunk is None or time.monotonic() - started > DRIP_S:
                break
            # the server keeps serving others while this client dawdles
            assert normal.get("/healthz").status_code == 200
        received += _read_to_end(sock)
    return received, time.monotonic() - started


def _read(sock: socket.socket) -> bytes | None:
    """What the server sent in the next 0.2 s; None once it closed the connection."""
    try:
        chunk = sock.recv(65536)
    except TimeoutError:
        return b""
    except ConnectionResetError:
        return None
    return chunk or None


def _read_to_end(sock: socket.socket) -> bytes:
    out = b""
    deadline = time.monotonic() + MARGIN_S
    while time.monotonic() < deadline:
        chunk = _read(sock)
        if chunk is None:
            return out
        out += chunk
    raise AssertionError(f"the server did not close the slow connection (got {out!r})")


def test_headers_sent_too_slowly_are_cut_off_with_408(base):
    sock = _connect(base)
    headers = b"POST /v1/recommend HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" + b"x-pad: " + b"a" * 200
    received, took = _drip(sock, headers, base)
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert b"request headers not received in time" in received
    assert took < TIMEOUT_S + MARGIN_S


def test_a_connection_that_sends_nothing_is_closed(base):
    sock = _connect(base)
    started = time.monotonic()
    received = _read_to_end(sock)
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert time.monotonic() - started < TIMEOUT_S + MARGIN_S


def test_a_body_sent_too_slowly_is_cut_off_with_408(base):
    sock = _connect(base)
    head = (
        b"POST /v1/recommend HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(RECOMMEND)).encode() + b"\r\n\r\n"
    )
    sock.sendall(head)
    received, took = _drip(sock, RECOMMEND, base)
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert b'{"detail":"request body not received within 1s"}' in received
    assert took < TIMEOUT_S + MARGIN_S


def test_a_keep_alive_connection_serves_requests_and_times_out_the_next_slow_one(base):
    sock = _connect(base)
    request = (
        b"POST /v1/recommend HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(RECOMMEND)).encode() + b"\r\n\r\n" + RECOMMEND
    )
    for _ in range(3):  # sent at once: normal requests on one connection, each answered
        sock.sendall(request)
        answer = b""
        while b'"policy"' not in answer:
            chunk = _read(sock)
            assert chunk is not None, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer
    # the next request on the same connection drips: its own header deadline applies
    received, _ = _drip(sock, b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 200, base)
    assert received.startswith(b"HTTP/1.1 408 "), received


def test_an_idle_keep_alive_connection_is_closed(base):
    sock = _connect(base)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    received = _read_to_end(sock)  # the answer, then the close after keep_alive_s of silence
    assert received.startswith(b"HTTP/1.1 200 ") and received.count(b"HTTP/1.1") == 1, received
