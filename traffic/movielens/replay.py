"""Replaying a MovieLens set to Kafka: when its event times start, publishing them, and `recsys replay --dataset`.

Unpaced, the records go out as fast as the producer takes them with their times rebased so
the replay ends now (the worker's timestamp window then accepts them while order and
relative gaps are kept); paced, every record is sent at its (compressed) event time.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from core.kafka import KafkaUnavailable, publish
from traffic.movielens.dataset import DatasetError, MovieLens
from traffic.movielens.download import dataset_source
from traffic.movielens.events import count_events, events, replay_span
from traffic.movielens.parse import load


@dataclass(frozen=True)
class ReplayResult:
    run: str
    records: int
    seconds: float
    first_event_time: float
    last_event_time: float

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")


def plan_start(
    data: MovieLens,
    speedup: float,
    pace: bool,
    max_event_age_s: float,
    click_delay_s: float = 1.0,
    now: float | None = None,
) -> float:
    """Event time of the first record.

    Paced, the replay starts now and every record is sent at its event time. Unpaced, the
    records go out as fast as the producer takes them and their times are rebased to end
    now; the whole span must then fit the worker's age limit, else the speed-up is too low.
    """
    current = time.time() if now is None else now
    span = replay_span(data, speedup, click_delay_s)
    if pace:
        return current + 1.0  # a small lead: the first sends happen within the future-skew limit anyway
    if span >= 0.9 * max_event_age_s:
        needed = float(data.timestamp[-1] - data.timestamp[0]) / (0.9 * max_event_age_s - click_delay_s)
        raise DatasetError(
            f"at speed-up {speedup:g} the replay spans {span / 86400:.1f} days of event time, but "
            f"events older than {max_event_age_s / 86400:.1f} days are rejected; use --speedup "
            f"{needed:.0f} or more, or --pace"
        )
    return current - span


def new_run_tag() -> str:
    """A replay's tag: UTC start time to the millisecond (readable, and distinct for replays in a row)."""
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}"


async def replay(
    data: MovieLens,
    bootstrap: str,
    topic: str,
    speedup: float,
    pace: bool,
    max_event_age_s: float,
    click_delay_s: float = 1.0,
    show_progress: bool = True,
    run: str | None = None,
) -> ReplayResult:
    """Publish the data's events to ``topic`` at ``speedup`` (see ``events`` and ``plan_start``).

    ``run`` tags the ids of this replay (default: a new tag from the clock).
    """
    run = new_run_tag() if run is None else run
    start = plan_start(data, speedup, pace, max_event_age_s, click_delay_s)
    began = time.perf_counter()
    result = await publish(
        events(data, speedup, start, click_delay_s, run=run),
        bootstrap,
        topic,
        total=count_events(data),
        show_progress=show_progress,
        paced=pace,
        label="replaying to",
    )
    return ReplayResult(
        run, result.records, time.perf_counter() - began, start, start + replay_span(data, speedup, click_delay_s)
    )


def replay_command(
    dataset: str,
    bootstrap: str,
    topic: str,
    cache_dir: Path,
    max_event_age_s: float,
    speedup: float,
    pace: bool,
    limit: int | None,
    click_delay_s: float = 1.0,
) -> int:
    """`recsys replay --dataset NAME`: fetch, convert and publish; returns the process exit code."""
    console = Console(stderr=True)
    try:
        dataset_source(dataset)
        if speedup <= 0:
            raise DatasetError(f"--speedup must be positive, got {speedup:g}")
        if click_delay_s < 0:
            raise DatasetError(f"--click-delay must not be negative, got {click_delay_s:g}")
        console.print(f"{dataset}: fetching (cached under {Path(cache_dir) / 'datasets'}) and reading ...")
        data = load(dataset, cache_dir, limit)
        span = replay_span(data, speedup, click_delay_s)
        console.print(
            f"{dataset}: {len(data):,} ratings, {len(data.users):,} users, {len(data.items):,} items "
            f"-> {count_events(data):,} events over {span:,.0f}s of event time"
            + (f" (paced: the replay takes about {span:,.0f}s)" if pace else " (rebased to end now)")
        )
        for line in data.skipped[:10]:
            console.print(f"[yellow]skipped[/yellow] {line}")
        result = asyncio.run(
            replay(
                data, bootstrap, topic, speedup, pace, max_event_age_s, click_delay_s, show_progress=sys.stderr.isatty()
            )
        )
    except DatasetError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except KafkaUnavailable as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    console.print(
        f"published {result.records:,} events of {dataset} (run {result.run}) to {topic} in {result.seconds:.1f}s "
        f"({result.rate:,.0f} rec/s); event times {result.first_event_time:.0f}..{result.last_event_time:.0f}"
    )
    return 0
