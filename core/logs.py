"""Structured logs for long-running processes: one JSON object per line, repeats of one error rate-limited.

A log file is read by tools (``jq``, a log shipper) more than by eyes, so every line of it is one
JSON object, the libraries' lines included: the process installs one handler on the root logger and
no library may bring its own (Faust's worker otherwise adds a coloured handler and a terminal
spinner). Terminal escape codes are removed from messages, and a multi-line message stays one line.

A broker restart makes the Kafka client log the same error many times a second: ``RepeatFilter``
lets the first one through, drops its repeats for ``window_s`` and says how many it dropped on the
next one it lets through (``"repeated"``), so the file keeps the facts without the flood.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import IO

import orjson

# CSI sequences (colours, cursor moves, cursor show/hide) and the two-byte escapes; backspaces of spinners
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]|[\x08]")


def strip_escapes(text: str) -> str:
    """``text`` without terminal escape sequences (colours, cursor control) and backspaces."""
    return _ESCAPES.sub("", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, the record's ``fields`` (a dict), exc."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": strip_escapes(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        repeated = getattr(record, "repeated", None)
        if repeated:
            payload["repeated"] = repeated
        if record.exc_info:
            payload["exc"] = strip_escapes(self.formatException(record.exc_info))
        return orjson.dumps(payload, default=str).decode()


class RepeatFilter(logging.Filter):
    """Lets one record of each (logger, level, message template, call site) through per ``window_s``.

    Only records at ``min_level`` or above are limited: info lines that share a template ("took
    partition %d") are distinct facts, a repeated connection error is one. The record let through
    after a quiet spell carries ``repeated`` = how many were dropped since the last one let through;
    ``due`` hands out those counts as records of their own once a window passed without a next one.
    """

    def __init__(
        self,
        window_s: float,
        min_level: int = logging.WARNING,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        self.window_s = window_s
        self.min_level = min_level
        self.max_keys = max_keys
        self.clock = clock
        # key -> [time let through, dropped since, the last dropped record]
        self._seen: OrderedDict[tuple[str, int, str, str, int], list] = OrderedDict()
        self._dropping: set[tuple[str, int, str, str, int]] = set()  # keys with drops not yet counted in a line
        self._evicted: list[logging.LogRecord] = []  # counts of keys pushed out by the bound, not yet written
        self._lock = threading.Lock()  # Handler.handle filters outside the handler's lock; Faust has threads

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level or self.window_s == 0:
            return True
        key = (record.name, record.levelno, str(record.msg), record.pathname, record.lineno)
        with self._lock:
            now = self.clock()
            state = self._seen.get(key)
            if state is not None and now - state[0] < self.window_s:
                state[1] += 1
                state[2] = record
                self._dropping.add(key)
                return False
            if state is not None and state[1]:
                record.repeated = int(state[1])
            self._dropping.discard(key)
            self._seen[key] = [now, 0, None]
            self._seen.move_to_end(key)
            while len(self._seen) > self.max_keys:  # bounded: a message with ids in its template cannot grow it
                evicted_key, evicted = self._seen.popitem(last=False)
                self._dropping.discard(evicted_key)
                if evicted[1]:
                    self._evicted.append(self._summary(evicted))
            return True

    @staticmethod
    def _summary(state: list) -> logging.LogRecord:
        summary = logging.makeLogRecord(dict(state[2].__dict__))
        summary.repeated = int(state[1])
        summary.exc_info = summary.exc_text = None  # the traceback was logged with the first of them
        return summary

    def due(self, flush: bool = False) -> list[logging.LogRecord]:
        """Records saying how often a message was dropped, for messages whose window passed (all: ``flush``)."""
        with self._lock:
            out, self._evicted = self._evicted, []
            now = self.clock()
            for key in list(self._dropping):
                state = self._seen[key]
                if flush or now - state[0] >= self.window_s:
                    out.append(self._summary(state))
                    state[0], state[1], state[2] = now, 0, None
                    self._dropping.discard(key)
            return out


class JsonLinesHandler(logging.StreamHandler):
    """A stream handler writing ``JsonFormatter`` lines, repeats limited by a ``RepeatFilter``.

    The counts of dropped repeats are written before the next line once their window passed, and
    all of them when the handler closes (``logging.shutdown`` at exit): no repeat goes uncounted.
    """

    def __init__(self, stream: IO[str] | None = None, repeat_window_s: float = 10.0) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self.setFormatter(JsonFormatter())
        self.repeats = RepeatFilter(repeat_window_s)
        self.addFilter(self.repeats)

    def emit(self, record: logging.LogRecord) -> None:
        for summary in self.repeats.due():
            super().emit(summary)
        super().emit(record)

    def close(self) -> None:
        for summary in self.repeats.due(flush=True):
            super().emit(summary)
        super().close()


def configure_json_logging(
    level: str | int = "info",
    *,
    stream: IO[str] | None = None,
    repeat_window_s: float = 10.0,
    levels: dict[str, str | int] | None = None,
) -> JsonLinesHandler:
    """Make the root logger's only handler a JSON-lines one on ``stream`` (stderr), repeats rate-limited.

    ``level`` is the root level (every library); ``levels`` sets named loggers apart from it. Returns the
    handler, so a caller can check that nothing replaced it.
    """
    handler = JsonLinesHandler(stream, repeat_window_s)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name, named_level in (levels or {}).items():
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(named_level.upper() if isinstance(named_level, str) else named_level)
    logging.captureWarnings(True)  # library warnings become records of the same format, not bare stderr text
    return handler
