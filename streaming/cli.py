"""`recsys stream ...`: the Faust stream worker and the feature store around it.

Faust and Feast are imported inside the commands: `recsys --help` stays fast.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
from typing import TYPE_CHECKING, Annotated

import typer

from core.cli_support import load_settings

if TYPE_CHECKING:
    from core.settings import Settings
    from feature_repo.store import Entity

app = typer.Typer(no_args_is_help=True)
_log = logging.getLogger("streaming.cli")  # the worker's own lines before Faust starts: JSON like the rest


@app.command("worker")
def worker(
    loglevel: Annotated[
        str,
        typer.Option(help="log level of the libraries (Faust, aiokafka, Feast); RECSYS_STREAM_LOG_LEVEL: the worker's"),
    ] = "warning",
    create_topics: Annotated[
        bool,
        typer.Option("--create-topics/--no-create-topics", help="create the topics (RECSYS_TOPIC_PARTITIONS) first"),
    ] = True,
) -> None:
    """Run one Faust stream worker (workers with one RECSYS_STREAM_APP_ID form one consumer group; see README)."""
    from core.kafka import KafkaUnavailable, ensure_topics
    from core.logs import configure_json_logging

    s = load_settings()
    if loglevel not in {"debug", "info", "warning", "error", "critical"}:
        typer.echo(f"unknown log level {loglevel!r}", err=True)
        raise typer.Exit(2)
    # one format for every line of the log, the libraries' included (Faust's own set-up is turned off below);
    # aiokafka logs at debug per record sent: with it open to debug that cost ~15% of the CPU
    configure_json_logging(
        loglevel,
        repeat_window_s=s.stream.log_repeat_s,
        levels={
            "streaming": s.stream.log_level,
            "aiokafka": max(logging.WARNING, logging.getLevelName(loglevel.upper())),
        },
    )
    if s.stream.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(s.stream.metrics_port, addr="127.0.0.1")
    from faust.worker import Worker

    from streaming.factory import create_app

    faust_app, stream_worker = create_app(s)

    if create_topics:
        topics = {
            name: s.kafka.topic_partitions
            for name in (s.kafka.topic_events, s.kafka.topic_samples, s.kafka.topic_deadletter, s.kafka.topic_late)
        }
        try:  # (the tables' changelog topics are the app's own: StreamApp creates them when it starts)
            asyncio.run(ensure_topics(s.kafka, topics))
        except KafkaUnavailable as exc:
            _log.error("%s", exc)
            raise typer.Exit(1) from None
    try:
        if s.stream.feature_store_open == "before_start":
            stream_worker.features.open_now()
        else:  # opened in a thread once the worker runs (streaming.factory); only a cheap reachability check here
            stream_worker.features.check_reachable()
    except Exception as exc:  # noqa: BLE001 - Redis down, a broken registry: say so before joining the group
        _log.error(
            "cannot open the feature store (%s online store, %s): %s: %s",
            s.feast.online_store,
            s.feast.data_dir,
            type(exc).__name__,
            exc,
        )
        raise typer.Exit(1) from None
    # Faust, Feast and torch leave millions of long-lived objects; the cyclic GC traversed them
    # again and again while the tables grew (~30% of the worker's CPU). Freeze what exists now and
    # collect the young generation less often: table entries are plain dicts and lists, no cycles.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)

    # Faust's worker owns the event loop and signal handling from here on; it keeps the logging set up
    # above (mode's own would put a coloured handler on the root logger) and draws no terminal spinner
    # (it wrote cursor escape codes into the log file)
    faust_worker = Worker(faust_app, loglevel=loglevel, quiet=True, redirect_stdouts=False, override_logging=False)
    faust_worker.spinner = None
    faust_worker.execute_from_commandline()


@app.command("feast-apply")
def feast_apply() -> None:
    """Register the Feast definitions (entities, push sources, feature views) in the configured store."""
    from feature_repo import store as fs

    s = load_settings()
    os.environ.setdefault("RECSYS_FEAST_DATA_DIR", str(s.feast.data_dir))
    fs.open_store(s.feast.data_dir, s.feast.online_store, s.feast_redis_url, apply=True)
    typer.echo(
        f"applied feature views user_features, item_features to {s.feast.data_dir} "
        f"(online store: {s.feast.online_store})"
    )


@app.command("features")
def features(
    users: Annotated[list[str] | None, typer.Option("--user", help="user id (repeatable)")] = None,
    items: Annotated[list[str] | None, typer.Option("--item", help="item id (repeatable)")] = None,
) -> None:
    """Print the encoded features the online store holds for some users and items."""
    from feature_repo import store as fs

    if not users and not items:
        typer.echo("give at least one --user or --item", err=True)
        raise typer.Exit(2)
    s = load_settings()
    store = fs.open_store(s.feast.data_dir, s.feast.online_store, s.feast_redis_url, apply=False)
    out = {}
    wanted: tuple[tuple[Entity, list[str]], ...] = (("user", users or []), ("item", items or []))
    for entity, ids in wanted:
        for entity_id, encoded in fs.read_online(store, entity, ids).items():
            out[f"{entity}:{entity_id}"] = (
                None if encoded is None else {"sparse": encoded.sparse, "dense": encoded.dense}
            )
    typer.echo(json.dumps(out, indent=2))


@app.command("status")
def status(
    wait: Annotated[bool, typer.Option("--wait", help="block until the stream has drained (lag 0 everywhere)")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(min=0.001, help="--wait: give up after this many seconds, exit 1 (default: settings)"),
    ] = None,
) -> None:
    """Per partition of the events topic: the worker group's committed offset, end offset and lag; drained or not.

    Read from Kafka (the group's commits, the topic's ends, the ``joins`` changelog), not from the
    worker's metrics port. Drained means the group committed up to the end of every partition; the
    open impressions are those still waiting for a click in the worker's ``joins`` table, the pending
    clicks those held there for their impression.
    """
    import time

    from rich.console import Console
    from rich.table import Table

    from core.cli_support import fail
    from core.consumer_lag import PartitionLag, group_lag
    from core.kafka import KafkaUnavailable

    s = load_settings()
    limit = timeout if timeout is not None else s.stream.status_wait_timeout_s
    deadline = time.monotonic() + limit

    def read() -> list[PartitionLag]:
        try:
            return asyncio.run(group_lag(s.kafka, s.stream.app_id, s.kafka.topic_events))
        except KafkaUnavailable as exc:
            fail(str(exc))

    lags = read()
    if not lags:
        fail(f"topic {s.kafka.topic_events} has no partitions (does it exist? `recsys topics` creates it)")
    while wait and any(p.lag for p in lags) and time.monotonic() < deadline:
        time.sleep(min(s.stream.status_poll_s, max(0.0, deadline - time.monotonic())))
        lags = read()
    drained = not any(p.lag for p in lags)
    table = Table("partition", "committed", "end", "lag", title=f"{s.kafka.topic_events}, group {s.stream.app_id}")
    for p in lags:
        table.add_row(str(p.partition), "-" if p.committed is None else str(p.committed), str(p.end), str(p.lag))
    out = Console()
    out.print(table)
    try:
        opened = asyncio.run(_open_impressions(s))
    except KafkaUnavailable as exc:
        fail(str(exc))
    out.print(f"lag: {sum(p.lag for p in lags)} records; drained: {'yes' if drained else 'no'}")
    if opened is None:
        out.print("open impressions: unknown (no joins changelog yet)")
        out.print("pending clicks: unknown (no joins changelog yet)")
    else:
        out.print(f"open impressions: {opened[0]}")
        out.print(
            f"pending clicks: {opened[1]} (clicks held for their impression, up to "
            f"RECSYS_STREAM_EARLY_CLICK_WAIT_S={s.stream.early_click_wait_s:g} s of event time)",
            soft_wrap=True,
        )
    if wait and not drained:
        fail(f"the stream did not drain within {limit:g}s (lag {sum(p.lag for p in lags)})")


async def _open_impressions(s: Settings) -> tuple[int, int] | None:
    """Impressions waiting for a click and clicks held for their impression, from the ``joins`` changelog.

    The latest value per key counts: ``OPEN`` entries are open impressions, ``HELD`` ones early
    clicks. None when the changelog topic does not exist (no worker ever ran with this app id).
    """
    import orjson

    from core.kafka import end_offsets, read_topic
    from streaming.joiner import HELD, OPEN
    from streaming.tables import changelog_topic

    topic = changelog_topic(s.stream.app_id, "joins")
    if not await end_offsets(s.kafka, topic):
        return None
    latest: dict[bytes, object] = {}
    async for record in read_topic(s.kafka, topic):
        if record.key is None:
            continue
        try:
            value = orjson.loads(record.value) if record.value else None
        except orjson.JSONDecodeError:
            value = None
        latest[record.key] = value.get("st") if isinstance(value, dict) else None
    states = list(latest.values())
    return states.count(OPEN), states.count(HELD)
