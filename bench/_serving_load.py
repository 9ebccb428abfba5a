"""The serving benchmark's load generator (a process of its own) and its py-spy profile of the server."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------- load generator (own process)


async def _request(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], payload: bytes) -> int:
    reader, writer = conn
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def _load(port: int, payloads: list[bytes], rate: float | None, seconds: float, connections: int) -> dict:
    conns: asyncio.Queue = asyncio.Queue()
    for _ in range(connections):
        conns.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    latencies: list[float] = []  # of answered (200) requests only: a fast 503 must not improve the quantiles
    errors = shed = expired = 0
    loop = asyncio.get_running_loop()

    async def one(payload: bytes, scheduled: float) -> None:
        nonlocal errors, shed, expired
        conn = await conns.get()
        try:
            status = await _request(conn, payload)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            conn = await asyncio.open_connection("127.0.0.1", port)
        else:
            if status == 200:
                latencies.append(loop.time() - scheduled)
            elif status == 503:  # load shedding: the server said "retry later", by design
                shed += 1
            elif status == 504:  # the request's deadline passed
                expired += 1
            else:
                errors += 1
        conns.put_nowait(conn)

    start = loop.time()
    tasks = []
    if rate:  # open loop: fixed schedule
        n = int(rate * seconds)
        for i in range(n):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(payloads[i % len(payloads)], due)))
        await asyncio.gather(*tasks)
    else:  # closed loop: keep ``connections`` requests in flight
        count = 0

        async def worker() -> None:
            nonlocal count
            while loop.time() - start < seconds:
                count += 1
                await one(payloads[count % len(payloads)], loop.time())

        await asyncio.gather(*[worker() for _ in range(connections)])
    elapsed = loop.time() - start
    while not conns.empty():
        conns.get_nowait()[1].close()
    lat = np.array(latencies) * 1000.0
    return {
        "requests": len(latencies),
        "errors": errors,
        "shed_503": shed,
        "deadline_504": expired,
        "seconds": elapsed,
        "throughput": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
    }


def _load_process(
    port: int, payloads: list[bytes], rate: float | None, seconds: float, connections: int, out: multiprocessing.Queue
) -> None:
    out.put(asyncio.run(_load(port, payloads, rate, seconds, connections)))


def run_load(port: int, payloads: list[bytes], rate: float | None, seconds: float, connections: int = 32) -> dict:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_load_process, args=(port, payloads, rate, seconds, connections, out))
    proc.start()
    result = out.get(timeout=seconds + 120)
    proc.join(timeout=30)
    return result


def post(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


# --------------------------------------------------------------------------- profile of the server (py-spy)


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """py-spy sampling the server (its worker processes too) for ``seconds``, collapsed stacks into ``out``.

    ``--nonblocking``: the server is not paused to sample, so the profile does not slow what it measures;
    ``--gil``: only samples of the thread holding the interpreter lock (on 2 cores, the work that counts).
    """
    here = Path(sys.executable).parent / "py-spy"
    command = str(here) if here.exists() else "py-spy"
    return subprocess.Popen(
        [command, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--gil", "--rate", "200"]
        + ["--duration", str(max(1, int(seconds))), "--format", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process ``pid`` and all its descendants (worker processes), from /proc."""
    parent: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the process ended meanwhile
        parent[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, pp in parent.items() if pp == current and p not in tree]
        tree.update(children)
        frontier += children
    return sum(times.get(p, 0.0) for p in tree)


def _frame(text: str) -> str:
    """``name (path/to/file.py:123)`` -> ``name (file.py)``: one entry per function, not per line."""
    name, _, where = text.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else name


# the files of the serving path: their functions' inclusive shares say which stage the samples went to
_OURS = {"ranker.py", "features.py", "params.py", "loader.py", "retrieval.py", "impressions.py", "recommend.py"}
_OURS |= {"metrics.py", "shedding.py", "middleware.py", "exploration.py", "contract.py", "pooling.py"}


def profile_top(collapsed: Path, n: int = 12) -> dict[str, list[tuple[str, float]]]:
    """The top ``n`` functions by self share (the leaf of a sample) and, of the serving path's own
    functions, by inclusive share; shares of all samples taken."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    total = max(total, 1)
    ours = [f for f in inclusive if f.rpartition("(")[2].rstrip(")") in _OURS]
    return {
        "self": [(f, own[f] / total) for f in sorted(own, key=own.__getitem__, reverse=True)[:n]],
        "inclusive": [(f, inclusive[f] / total) for f in sorted(ours, key=inclusive.__getitem__, reverse=True)[:n]],
    }
