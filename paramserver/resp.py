"""RESP over a plain socket: the hot-path client of the Redis backend (pull and apply).

redis-py builds a Python object per command and per reply; a pull of thousands of rows spends
more time there than Redis spends answering. This client sends pipelined commands laid out by
numpy (``hash_commands``) and slices found rows straight from the receive buffer
(``RespConnection.call_rows``); anything unusual is parsed by hiredis. It knows RESP, sockets
and hash commands, nothing of versions: the store protocol lives in ``redis_store``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import hiredis
import numpy as np

from core.redact import redact_url
from paramserver.rows import ParamServerError, ShardUnavailable


def parse_url(url: str) -> tuple[str, int, int, str | None]:
    """``redis://[[user]:password@]host[:port][/db]`` as (host, port, db, password); ``url_user`` has the user."""
    parsed = urlparse(url)
    if parsed.scheme != "redis" or not parsed.hostname:
        raise ParamServerError(f"expected a redis://host:port[/db] URL, got {redact_url(url)!r}")
    db = int(parsed.path.lstrip("/") or 0) if parsed.path.lstrip("/").isdigit() or not parsed.path.lstrip("/") else -1
    if db < 0:
        raise ParamServerError(f"bad database number in {redact_url(url)!r}")
    return parsed.hostname, parsed.port or 6379, db, unquote(parsed.password) if parsed.password else None


def url_user(url: str) -> str | None:
    """The ACL user of a ``redis://user:password@host`` URL (None: the default user, as redis-py reads it)."""
    username = urlparse(url).username
    return unquote(username) if username else None


def auth_command(url: str) -> bytes | None:
    """``AUTH [user] password`` for the URL's credentials (None when it has none)."""
    _, _, _, password = parse_url(url)
    if password is None:
        return None
    user = url_user(url)
    return pack(b"AUTH", user.encode(), password.encode()) if user else pack(b"AUTH", password.encode())


def pack(*args: bytes) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def hash_commands(
    verb: bytes, prefix: bytes, buckets: np.ndarray, ids: np.ndarray, data: np.ndarray | None = None
) -> bytes:
    """``HGET key field`` (or ``HSET key field row``) for every row, built in one vectorized pass.

    Keys are ``prefix`` + the bucket as 4 big-endian bytes and fields the id as 8 little-endian
    bytes: every command has the same length, so numpy lays them out at once (formatting
    thousands of commands in Python costs more than Redis takes to run them). A binary 8-byte
    field takes the same listpack space as Redis' integer encoding.
    """
    nargs = 3 if data is None else 4
    head = b"*%d\r\n$4\r\n%b\r\n$%d\r\n%b" % (nargs, verb, len(prefix) + 4, prefix)
    mid = b"\r\n$8\r\n"
    fields: list[tuple[str, str] | tuple[str, str, tuple[int]]] = [
        ("head", f"S{len(head)}"),
        ("bucket", ">u4"),
        ("mid", f"S{len(mid)}"),
        ("id", "<i8"),
    ]
    if data is None:
        fields.append(("end", "S2"))
    else:
        row_head = b"\r\n$%d\r\n" % data.shape[1]
        fields += [("rowhead", f"S{len(row_head)}"), ("row", "u1", (data.shape[1],)), ("end", "S2")]
    cmds = np.empty(len(ids), dtype=np.dtype(fields))
    cmds["head"], cmds["bucket"], cmds["mid"], cmds["id"], cmds["end"] = head, buckets, mid, ids, b"\r\n"
    if data is not None:
        cmds["rowhead"], cmds["row"] = row_head, data
    return cmds.tobytes()


def check_replies(replies: Sequence[Any], url: str) -> None:
    """Raise the first error reply (hiredis returns them as values, nested in arrays too)."""
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise ParamServerError(f"shard {url}: {reply}")
        if isinstance(reply, list):
            check_replies(reply, url)


class RespConnection:
    """One RESP connection for pipelined hot-path traffic; replies parsed by hiredis.

    ``timeout`` bounds a whole call (connect, send and every receive together), not each
    socket operation: a server that trickles its answer costs a caller at most the timeout,
    like one that does not answer at all.
    """

    def __init__(self, url: str, timeout: float) -> None:
        self.host, self.port, self.db, _ = parse_url(url)
        self._auth = auth_command(url)
        self.url = redact_url(url)  # what error messages name: never the password
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader = hiredis.Reader()
        self._deadline = 0.0
        self.lock = threading.Lock()

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None

    def _remaining(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer within {self.timeout}s")
        return left

    def _recv(self, size: int) -> bytes:
        assert self._sock is not None
        self._sock.settimeout(self._remaining())
        return self._sock.recv(size)

    def _recv_into(self, view: memoryview) -> int:
        assert self._sock is not None
        self._sock.settimeout(self._remaining())
        return self._sock.recv_into(view)

    def _connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self._remaining())
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._reader = sock, hiredis.Reader()
        setup = []
        if self._auth:
            setup.append(self._auth)
        if self.db:
            setup.append(pack(b"SELECT", str(self.db).encode()))
        if setup:
            for reply in self._exchange(b"".join(setup), len(setup)):
                if isinstance(reply, hiredis.ReplyError):
                    raise ShardUnavailable(f"shard {self.url}: {reply}")

    def _send(self, payload: bytes) -> socket.socket:
        """Send ``payload`` on the connection, opening it first if needed (the caller holds the lock).

        Starts the call's deadline: everything until its last reply must fit in ``timeout``.
        """
        self._deadline = time.monotonic() + self.timeout
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        self._sock.settimeout(self._remaining())
        self._sock.sendall(payload)
        return self._sock

    def _exchange(self, payload: bytes, count: int) -> list[Any]:
        assert self._sock is not None
        self._sock.settimeout(self._remaining())
        self._sock.sendall(payload)
        replies: list[Any] = []
        reader = self._reader
        while len(replies) < count:
            data = self._recv(1 << 20)
            if not data:
                raise ConnectionError("connection closed by the server")
            reader.feed(data)
            while True:
                reply = reader.gets()
                if reply is False:
                    break
                replies.append(reply)
        return replies

    def call_rows(self, payload: bytes, n: int, row_bytes: int) -> tuple[Any, np.ndarray, np.ndarray, Any]:
        """Run ``GET x; HGET ... (n times); GET x`` and return (first reply, rows, found mask, last reply).

        Fast path: when every HGET finds a row of ``row_bytes`` bytes the replies are fixed-size
        records, checked and sliced with numpy straight from the receive buffer (no Python
        object per row). Anything else (a missing row, an error reply) falls back to hiredis.
        """
        head = b"$%d\r\n" % row_bytes
        stride = len(head) + row_bytes + 2
        with self.lock:
            try:
                self._send(payload)
                buf = bytearray(n * stride + 512)
                view = memoryview(buf)
                filled = 0
                start = -1  # offset of the first HGET reply, once the first reply is parsed
                first: Any = None
                checked = 0
                while True:
                    if filled == len(buf):
                        break  # more data than rows of this size can be: not the fast path
                    got = self._recv_into(view[filled:])
                    if not got:
                        raise ConnectionError("connection closed by the server")
                    filled += got
                    if start < 0:
                        parsed = _parse_bulk(buf, 0, filled)
                        if parsed is None:
                            continue
                        if parsed is False:
                            break
                        first, start = parsed
                    complete = min(n, (filled - start) // stride)
                    if complete > checked:
                        block = np.frombuffer(buf, np.uint8, count=complete * stride, offset=start).reshape(
                            complete, stride
                        )
                        fresh = block[checked:]
                        ok = bool(
                            (fresh[:, : len(head)] == np.frombuffer(head, np.uint8)).all()
                            and (fresh[:, -2:] == np.frombuffer(b"\r\n", np.uint8)).all()
                        )
                        del block, fresh
                        if not ok:
                            break
                        checked = complete
                    if checked < n:  # the reply being received must begin like a row of this size
                        at = start + checked * stride
                        partial = bytes(view[at : min(filled, at + len(head))])
                        if not head.startswith(partial):
                            break
                        continue
                    if checked == n:
                        parsed = _parse_bulk(buf, start + n * stride, filled)
                        if parsed is None:
                            continue
                        if parsed is False or parsed[1] != filled:
                            break
                        rows = np.frombuffer(bytes(view[start : start + n * stride]), np.uint8).reshape(n, stride)
                        return first, rows[:, len(head) : len(head) + row_bytes], np.ones(n, dtype=bool), parsed[0]
                # slow path: let hiredis parse what came so far and the rest
                reader = self._reader
                reader.feed(bytes(view[:filled]))
                del view
                replies: list[Any] = []
                while True:
                    reply = reader.gets()
                    if reply is False:
                        if len(replies) >= n + 2:
                            break
                        data = self._recv(1 << 20)
                        if not data:
                            raise ConnectionError("connection closed by the server")
                        reader.feed(data)
                        continue
                    replies.append(reply)
                    if len(replies) == n + 2:
                        break
            except (OSError, ConnectionError, hiredis.ProtocolError) as exc:
                self.close()
                raise ShardUnavailable(f"shard {self.url} unavailable: {exc or type(exc).__name__}") from None
        check_replies(replies, self.url)
        found = np.array([r is not None for r in replies[1:-1]], dtype=bool)
        rows = np.zeros((n, row_bytes), np.uint8)
        if found.any():
            blob = b"".join(r for r in replies[1:-1] if r is not None)
            if len(blob) != int(found.sum()) * row_bytes:
                raise ParamServerError(f"shard {self.url}: stored rows are not {row_bytes} bytes long")
            rows[found] = np.frombuffer(blob, np.uint8).reshape(-1, row_bytes)
        return replies[0], rows, found, replies[-1]

    def call_lines(self, payload: bytes, lines: int) -> None:
        """Run commands whose replies are all one-line (status, integer, error) and expect ``lines`` of them.

        n pipelined HSETs answer with n short lines; counting CRLFs in C is far
        cheaper than building a Python object per reply. An error line fails the call and
        drops the connection, so a half-read reply stream cannot confuse the next call.
        """
        with self.lock:
            try:
                self._send(payload)
                buf = bytearray()
                seen = 0
                while seen < lines:
                    data = self._recv(1 << 20)
                    if not data:
                        raise ConnectionError("connection closed by the server")
                    scan_from = max(0, len(buf) - 1)
                    buf += data
                    seen += buf.count(b"\r\n", scan_from)
                    if buf[:1] == b"-" or b"\r\n-" in buf[max(0, scan_from - 1) :]:
                        at = 0 if buf[:1] == b"-" else buf.find(b"\r\n-", max(0, scan_from - 1)) + 2
                        message = bytes(buf[at + 1 : buf.find(b"\r\n", at)]).decode(errors="replace")
                        self.close()
                        raise ParamServerError(f"shard {self.url}: {message}")
                if seen != lines or not buf.endswith(b"\r\n"):
                    self.close()
                    raise ParamServerError(f"shard {self.url}: unexpected reply ({seen} lines, expected {lines})")
            except (OSError, ConnectionError, hiredis.ProtocolError) as exc:
                self.close()
                raise ShardUnavailable(f"shard {self.url} unavailable: {exc or type(exc).__name__}") from None

    def call(self, payload: bytes, count: int) -> list[Any]:
        """Send pipelined commands, return their ``count`` replies (errors as hiredis.ReplyError values)."""
        with self.lock:
            try:
                self._deadline = time.monotonic() + self.timeout
                if self._sock is None:
                    self._connect()
                return self._exchange(payload, count)
            except (OSError, ConnectionError, hiredis.ProtocolError) as exc:
                self.close()
                raise ShardUnavailable(f"shard {self.url} unavailable: {exc or type(exc).__name__}") from None


class RespPool:
    """Connections to one server for concurrent callers: a call never waits behind another call.

    Each call borrows an idle connection or opens a new one, and gives it back when it is done
    (up to ``max_idle`` kept open). With one locked connection per server, callers queued behind
    each other: against a frozen server every one of them paid the timeout in turn, so the
    tenth request waited ten timeouts. Here each pays at most its own. A connection that failed
    is closed, and so are the idle ones beside it (they most likely face the same dead server).
    """

    def __init__(self, url: str, timeout: float, max_idle: int) -> None:
        parse_url(url)
        self.url, self.timeout, self.max_idle = url, timeout, max_idle
        self._idle: list[RespConnection] = []
        self._lock = threading.Lock()
        self.opened = 0  # connections opened so far (how many callers were concurrent at most, roughly)

    @contextlib.contextmanager
    def _borrow(self) -> Iterator[RespConnection]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
            if conn is None:
                self.opened += 1
        if conn is None:
            conn = RespConnection(self.url, self.timeout)
        try:
            yield conn
        except ShardUnavailable:
            conn.close()
            self.close()
            raise
        except BaseException:
            conn.close()  # a reply stream cut short must not confuse the next caller
            raise
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def call_rows(self, payload: bytes, n: int, row_bytes: int) -> tuple[Any, np.ndarray, np.ndarray, Any]:
        """``RespConnection.call_rows`` on a connection of its own."""
        with self._borrow() as conn:
            return conn.call_rows(payload, n, row_bytes)

    def call_lines(self, payload: bytes, lines: int) -> None:
        """``RespConnection.call_lines`` on a connection of its own."""
        with self._borrow() as conn:
            conn.call_lines(payload, lines)

    def call(self, payload: bytes, count: int) -> list[Any]:
        """``RespConnection.call`` on a connection of its own."""
        with self._borrow() as conn:
            return conn.call(payload, count)

    def close(self) -> None:
        """Close the idle connections (borrowed ones close when given back over the bound, or fail)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _parse_bulk(buf: bytearray, pos: int, end: int) -> tuple[bytes | None, int] | Literal[False] | None:
    """One RESP bulk string at ``pos``: (value, next position), None when incomplete, False when not a bulk."""
    if end - pos < 1:
        return None
    if buf[pos] != 0x24:  # "$"
        return False
    line_end = buf.find(b"\r\n", pos, end)
    if line_end < 0:
        return None
    length = int(buf[pos + 1 : line_end])
    if length < 0:
        return None, line_end + 2
    stop = line_end + 2 + length
    if stop + 2 > end:
        return None
    return bytes(buf[line_end + 2 : stop]), stop + 2
