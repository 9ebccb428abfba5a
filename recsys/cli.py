"""`recsys`: the one command-line entry point of every room.

Heavy libraries (torch, feast, faust) are imported inside commands, never at start-up,
so `recsys --help` stays fast.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from core.cli_support import console, fail, load_settings
from core.settings import Settings
from paramserver import cli as ps_cli
from recsys import airflow_cli, demo
from serving import cli as serve_cli
from streaming import cli as stream_cli
from training import cli as train_cli
from training.lifecycle import cli as model_cli

out = Console()

app = typer.Typer(
    name="recsys",
    help="A deep-learning recommender loop: Kafka -> Faust -> Feast -> TorchRec/parameter service -> FastAPI.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
services_app = typer.Typer(help="Start, stop and inspect the local Kafka and Redis.", no_args_is_help=True)
events_app = typer.Typer(help="Inspect the event topics.", no_args_is_help=True)
app.add_typer(services_app, name="services")
app.add_typer(events_app, name="events")


# --------------------------------------------------------------------------- services


@services_app.command("up")
def services_up(
    kafka: Annotated[bool, typer.Option(help="start Kafka")] = True,
    redis: Annotated[bool, typer.Option(help="start Redis")] = True,
    prometheus: Annotated[
        bool,
        typer.Option(help="start Prometheus, the loop exporter and the loop dashboard"),
    ] = True,
) -> None:
    """Start Kafka (KRaft), Redis and Prometheus on 127.0.0.1; harmless when they already run."""
    from core.kafka import ensure_topics
    from local_services import kafka as local_kafka
    from local_services import prometheus as local_prometheus
    from local_services import services

    s = load_settings()
    try:
        if kafka:
            console.print(
                f"kafka {s.local.kafka_version}: fetching jars if needed and starting "
                f"on 127.0.0.1:{s.local.kafka_port} ..."
            )
            local_kafka.start_configured_kafka(s)
            created = asyncio.run(ensure_topics(s.kafka, s.kafka.all_topics()))
            if created:
                console.print(f"created topics: {', '.join(created)}")
        if redis:
            services.start_redis(s.local.run_dir, s.local.redis_port, timeout=s.local.service_start_timeout_s)
        dashboard = local_prometheus.up(s) if prometheus else None
    except services.ServiceError as exc:
        fail(str(exc))
    _print_status(s)
    if dashboard is not None:
        out.print(f"loop dashboard: {dashboard}")


@services_app.command("down")
def services_down() -> None:
    """Stop every service this project started under the run directory."""
    from local_services import services

    s = load_settings()
    for entry in services.status(s.local.run_dir):
        stopped = services.stop(s.local.run_dir, entry.name)
        console.print(f"{entry.name}: {'stopped' if stopped else 'was not running'}")


@services_app.command("status")
def services_status() -> None:
    """Show the services started from this run directory and whether they run."""
    _print_status(load_settings())


def _print_status(s: Settings) -> None:
    from local_services import services

    table = Table("service", "address", "pid", "state", "log")
    entries = services.status(s.local.run_dir)
    for entry in entries:
        table.add_row(
            entry.name,
            entry.address,
            str(entry.pid),
            "[green]running[/green]" if entry.running else "[red]stopped[/red]",
            str(entry.log_file),
        )
    if not entries:
        table.add_row("-", "-", "-", "nothing started", str(s.local.run_dir))
    out.print(table)


# --------------------------------------------------------------------------- topics and events


@app.command("topics")
def topics() -> None:
    """Create the project's topics (events, samples, dead letters, late clicks) if missing."""
    from core.kafka import KafkaUnavailable, ensure_topics

    s = load_settings()
    try:
        created = asyncio.run(ensure_topics(s.kafka, s.kafka.all_topics()))
    except KafkaUnavailable as exc:
        fail(str(exc))
    out.print(f"created: {', '.join(created) or 'none (all exist)'}")


@events_app.command("summary")
def events_summary(
    topic: Annotated[str | None, typer.Option(help="topic to read (default: the events topic)")] = None,
    kind: Annotated[
        str | None,
        typer.Option(
            help="how to read it: events, deadletter, samples, late or auto (default: recognised from the "
            "settings' topic names; on other topics auto: each record by its headers and fields)"
        ),
    ] = None,
) -> None:
    """Read a topic from the beginning to its current end and count its records; a bad record is a count too.

    Events count by event type and reject reason, dead letters and late clicks by their reason
    header, samples by label; a topic of another name record by record, by what each one is.
    """
    from core.kafka import KafkaUnavailable
    from recsys.topic_summary import TopicKind, TopicMissing, kind_of, summarize

    s = load_settings()
    name = topic or s.kafka.topic_events
    if kind is not None and kind not in TopicKind.__members__:
        fail(f"unknown --kind {kind!r}; expected one of {', '.join(TopicKind.__members__)}", 2)
    topic_kind = TopicKind(kind) if kind is not None else (kind_of(name, s) or TopicKind.auto)
    try:
        counts = asyncio.run(summarize(s, name, topic_kind))
    except (KafkaUnavailable, TopicMissing) as exc:
        fail(str(exc))
    table = Table("kind", "records", title=f"{name} ({topic_kind.value}): {sum(counts.values())} records")
    for label, count in sorted(counts.items()):
        table.add_row(label, str(count))
    out.print(table)


# --------------------------------------------------------------------------- traffic


@app.command()
def simulate(
    ctx: typer.Context,
    users: Annotated[int, typer.Option(min=1, help="simulated users")] = 1000,
    items: Annotated[int, typer.Option(min=1, help="simulated items")] = 500,
    requests: Annotated[int, typer.Option(min=1, help="recommendation requests (each shows a slate)")] = 2000,
    slate_size: Annotated[int, typer.Option(min=1, help="impressions per request")] = 10,
    seed: Annotated[int, typer.Option(help="world and traffic seed; same seed + start => same bytes")] = 0,
    start_time: Annotated[
        float | None, typer.Option(help="event time of the first event (epoch s; default now)")
    ] = None,
    requests_per_second: Annotated[float, typer.Option(min=0.001, help="event-time density of requests")] = 200.0,
    rate: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="open loop: publish at most this many records/s (0, the default: as fast as possible); "
            "closed loop: requests/s [default: RECSYS_SIM_RATE]",
        ),
    ] = None,
    bad_fraction: Annotated[float, typer.Option(min=0, max=0.99, help="share of injected malformed records")] = 0.0,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="write JSONL for `recsys replay` instead of Kafka")
    ] = None,
    truth_file: Annotated[
        Path | None, typer.Option("--truth", help="also write per-impression ground truth JSONL")
    ] = None,
    topic: Annotated[str | None, typer.Option(help="topic to publish to (default: the events topic)")] = None,
    closed_loop: Annotated[
        bool, typer.Option("--closed-loop", help="the users call serving and click on what it shows (below)")
    ] = False,
    serving: Annotated[
        str | None, typer.Option(help="closed loop: serving's base URL [default: RECSYS_SIM_SERVING_URL]")
    ] = None,
    duration: Annotated[str | None, typer.Option(help="closed loop: how long, e.g. 30s, 5m, 1h [default: 1m]")] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(min=1, max=1024, help="closed loop: requests in flight [default: RECSYS_SIM_CONCURRENCY]"),
    ] = None,
    candidates_share: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=1,
            help="closed loop: share of requests sending candidates [default: RECSYS_SIM_CANDIDATES_SHARE]",
        ),
    ] = None,
    candidates: Annotated[
        int | None,
        typer.Option(min=1, help="closed loop: candidates per such request [default: RECSYS_SIM_CANDIDATES]"),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1, max=65535, help="closed loop: serve Prometheus metrics here [default: RECSYS_SIM_METRICS_PORT]"
        ),
    ] = None,
    summary_file: Annotated[
        Path | None, typer.Option("--summary", help="closed loop: write the summary (JSON) here")
    ] = None,
    series_file: Annotated[
        Path | None, typer.Option("--series", help="closed loop: write the per-bucket, per-version series (JSONL)")
    ] = None,
    bucket_s: Annotated[
        float | None,
        typer.Option("--bucket", min=0.001, help="closed loop: series bucket in s [default: RECSYS_SIM_BUCKET_S]"),
    ] = None,
) -> None:
    """Simulate users, items, impressions and clicks; publish them to Kafka or write JSONL.

    With --closed-loop the simulated users ask serving (POST /v1/recommend) and click on what it
    shows; serving logs the impressions, the simulator publishes profiles and clicks and measures
    the served lists against a random and the oracle policy.
    """
    import orjson

    # typer vendors click, so its ParameterSource is compared by name
    given = {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"}
    wrong = given & (_OPEN_LOOP_ONLY if closed_loop else _CLOSED_LOOP_ONLY)
    if wrong:
        options = ", ".join(sorted("--" + _OPTION_NAMES.get(name, name).replace("_", "-") for name in wrong))
        mode = "--closed-loop" if closed_loop else "the open loop (no --closed-loop)"
        fail(f"{options}: not an option of {mode}", 2)
    if closed_loop:
        _simulate_closed_loop(
            users=users,
            items=items,
            slate_size=slate_size,
            seed=seed,
            topic=topic,
            truth_file=truth_file,
            serving=serving,
            duration=duration,
            rate=rate,
            concurrency=concurrency,
            candidates_share=candidates_share,
            candidates=candidates,
            metrics_port=metrics_port,
            summary_file=summary_file,
            series_file=series_file,
            bucket_s=bucket_s,
        )
        return

    from core.kafka import KafkaUnavailable, publish
    from traffic.recording import write_jsonl
    from traffic.simulator import SimConfig, Simulation

    s = load_settings()
    try:
        config = SimConfig(
            users=users,
            items=items,
            requests=requests,
            slate_size=slate_size,
            seed=seed,
            start_time=start_time,
            requests_per_second=requests_per_second,
            bad_fraction=bad_fraction,
        )
    except ValueError as exc:
        fail(str(exc), 2)
    sim = Simulation(config)
    estimated = users + items + requests * slate_size
    started = time.perf_counter()
    if out_file is not None:
        written = write_jsonl(sim.records(), out_file)
        console.print(f"wrote {written} records to {out_file}")
    else:
        try:
            result = asyncio.run(
                publish(
                    sim.records(),
                    s.kafka,
                    topic or s.kafka.topic_events,
                    rate=rate or 0.0,
                    total=estimated,
                    show_progress=sys.stderr.isatty(),
                )
            )
        except KafkaUnavailable as exc:
            fail(str(exc))
        console.print(f"published {result.records} records in {result.seconds:.2f}s ({result.rate:,.0f} rec/s)")
    if truth_file is not None:
        with open(truth_file, "wb") as handle:
            for truth in sim.truth:
                handle.write(orjson.dumps(truth.__dict__) + b"\n")
    out.print_json(
        data={
            "records": sim.stats.total,
            "events": sim.stats.events,
            "bad": sim.stats.bad,
            "impressions": len(sim.truth),
            "ctr": round(sim.click_through_rate(), 4),
            "oracle_auc": round(sim.oracle_auc(), 4),
            "seconds": round(time.perf_counter() - started, 2),
        }
    )


# options of one mode only: given with the other mode they are an error, not silently ignored
_OPEN_LOOP_ONLY = {"requests", "start_time", "requests_per_second", "bad_fraction", "out_file"}
_CLOSED_LOOP_ONLY = {
    "serving",
    "duration",
    "concurrency",
    "candidates_share",
    "candidates",
    "metrics_port",
    "summary_file",
    "series_file",
    "bucket_s",
}
_OPTION_NAMES = {"out_file": "out", "summary_file": "summary", "series_file": "series", "bucket_s": "bucket"}


def _simulate_closed_loop(
    *,
    users: int,
    items: int,
    slate_size: int,
    seed: int,
    topic: str | None,
    truth_file: Path | None,
    serving: str | None,
    duration: str | None,
    rate: float | None,
    concurrency: int | None,
    candidates_share: float | None,
    candidates: int | None,
    metrics_port: int | None,
    summary_file: Path | None,
    series_file: Path | None,
    bucket_s: float | None,
) -> None:
    """`recsys simulate --closed-loop`: run the users against serving, show progress, print the summary."""
    import httpx

    from core.kafka import KafkaUnavailable
    from traffic.closed_loop import ClosedLoop, ClosedLoopConfig, kafka_sink, parse_duration
    from traffic.simulator import SimConfig, World

    try:
        duration_s = parse_duration(duration or "1m")
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--duration") from None
    s = load_settings()
    url = serving or s.sim_serving_url
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise typer.BadParameter(f"{url!r} is no URL ({exc})", param_hint="--serving") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise typer.BadParameter(f"{url!r}: expected http(s)://host[:port]", param_hint="--serving")
    if rate == 0:
        raise typer.BadParameter("requests/s must be positive in closed-loop mode", param_hint="--rate")
    try:
        world = World(SimConfig(users=users, items=items, slate_size=slate_size, seed=seed))
        config = ClosedLoopConfig.from_settings(
            s.sim,
            url,
            duration_s,
            rate=rate,
            concurrency=concurrency,
            candidates_share=candidates_share,
            candidates=candidates,
            bucket_s=bucket_s,
        )
    except ValueError as exc:
        fail(str(exc), 2)
    loop = ClosedLoop(world, config, kafka_sink(s.kafka, topic or s.kafka.topic_events))
    metrics_port = metrics_port if metrics_port is not None else (s.sim.metrics_port or None)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        try:
            start_http_server(metrics_port, addr="127.0.0.1", registry=loop.metrics.registry)
        except OSError as exc:
            fail(f"cannot serve metrics on 127.0.0.1:{metrics_port}: {exc}")
        console.print(f"metrics on http://127.0.0.1:{metrics_port}/metrics")
    console.print(
        f"closed loop against {url} for {duration_s:g}s: {config.rate:g} requests/s, {config.concurrency} in flight, "
        f"{config.candidates_share:.0%} with {config.candidates} candidates, k={slate_size}"
    )
    try:
        _run_with_progress(loop)
    except KafkaUnavailable as exc:
        fail(str(exc))
    if truth_file is not None:
        loop.write_truth(truth_file)
    if summary_file is not None:
        loop.write_summary(summary_file)
    if series_file is not None:
        loop.write_series(series_file)
    _print_closed_loop_summary(loop)


def _closed_loop_status(loop) -> str:
    outcomes = loop.metrics.outcomes
    errors = {kind: n for kind, n in sorted(outcomes.items()) if kind not in ("served", "empty")}
    total = loop.metrics.total.as_dict()

    def ctr(name: str) -> str:
        return "-" if total[name] is None else f"{total[name]:.3f}"

    return (
        f"requests {sum(outcomes.values())} (served {outcomes.get('served', 0)}, empty {outcomes.get('empty', 0)}, "
        f"errors {', '.join(f'{k} {n}' for k, n in errors.items()) or 'none'}) | clicks {loop.clicks} "
        f"({loop.clicks_pending} pending) | CTR served {ctr('served_ctr')} random {ctr('random_ctr')} "
        f"oracle {ctr('oracle_ctr')}"
    )


def _run_with_progress(loop) -> None:
    """Run the loop; a live status line on a terminal, else a plain line every 10 s (logs of the demo)."""
    if console.is_terminal:
        from rich.live import Live

        with Live(console=console, refresh_per_second=4, transient=False) as live:
            asyncio.run(loop.run(lambda lp: live.update(_closed_loop_status(lp)), progress_every_s=0.25))
        return
    last = [time.monotonic()]

    def every_10s(lp) -> None:
        if time.monotonic() - last[0] >= 10:
            last[0] = time.monotonic()
            console.print(_closed_loop_status(lp), soft_wrap=True)

    asyncio.run(loop.run(every_10s))


def _print_closed_loop_summary(loop) -> None:
    summary = loop.summary()
    table = Table(
        "model version",
        "requests",
        "impressions",
        "clicks",
        "CTR (realised)",
        "served (expected)",
        "random",
        "oracle",
        title=f"closed loop: {summary['requests_sent']} requests in {summary['elapsed_s']:.1f}s",
    )

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    rows = list(summary["by_model_version"].items()) + [("all", summary["total"])]
    for version, agg in rows:
        table.add_row(
            version,
            str(agg["requests"]),
            str(agg["impressions"]),
            str(agg["clicks"]),
            fmt(agg["realised_ctr"]),
            fmt(agg["served_ctr"]),
            fmt(agg["random_ctr"]),
            fmt(agg["oracle_ctr"]),
        )
    out.print(table)
    outcomes = Table("outcome", "requests", title="requests by outcome")
    for kind, count in summary["outcomes"].items():
        outcomes.add_row(kind, str(count))
    out.print(outcomes)
    auc = summary["oracle_auc"]
    out.print(
        f"profiles sent {summary['profiles_sent']}, clicks sent {summary['clicks_sent']}, "
        f"unknown items served {summary['unknown_items']}, oracle AUC on served impressions "
        f"{'-' if auc is None else f'{auc:.4f}'}"
    )


@app.command()
def replay(
    file: Annotated[
        Path | None,
        typer.Argument(
            exists=True,
            dir_okay=False,
            readable=True,
            help="JSONL: a recording of `simulate --out`, or plain event lines (or use --dataset)",
        ),
    ] = None,
    rate: Annotated[
        float, typer.Option(min=0, help="publish at most this many records/s (0: as fast as possible)")
    ] = 0.0,
    rebase_time: Annotated[
        bool, typer.Option("--rebase/--no-rebase", help="shift event times so the last event happens now")
    ] = True,
    topic: Annotated[str | None, typer.Option(help="topic to publish to (default: the events topic)")] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="replay public data instead of a file: movielens-100k or "
            "movielens-1m (fetched once into the cache dir)"
        ),
    ] = None,
    speedup: Annotated[
        float, typer.Option(min=1e-6, help="--dataset: rating time passes this many times faster")
    ] = 1e5,
    pace: Annotated[
        bool,
        typer.Option(
            "--pace/--no-pace",
            help="--dataset: send each event at its (compressed) "
            "time; --no-pace sends at once with times rebased to end now",
        ),
    ] = True,
    limit: Annotated[int | None, typer.Option(min=1, help="--dataset: only the first N ratings by time")] = None,
) -> None:
    """Publish a JSONL file (a recording, or plain event lines), or a MovieLens set (--dataset), to Kafka.

    Event times are moved so the last event happens now (the gaps kept), so no event lies beyond
    the worker's future-skew limit; events the move leaves older than the event age limit are
    counted and reported. Malformed lines of the file are reported and skipped.
    """
    from array import array

    from core.kafka import KafkaUnavailable, publish
    from traffic.recording import read_any, shift_times

    s = load_settings()
    if dataset is not None or file is None:
        from traffic.movielens import replay_command

        if file is not None or dataset is None or rate > 0 or not rebase_time:
            fail("give either FILE or --dataset; with --dataset, pace with --speedup (not --rate/--no-rebase)", 2)
        raise typer.Exit(
            replay_command(
                dataset,
                s.kafka.bootstrap,
                topic or s.kafka.topic_events,
                s.local.cache_dir,
                s.events.max_event_age_s,
                speedup,
                pace,
                limit,
            )
        )
    # a first pass for the times: the shift depends on the last event, and the report on all of them
    times = array("d", (record.timestamp for record in read_any(file, [])))
    now = time.time()
    shift = now - max(times) if rebase_time and times else 0.0
    stale = sum(1 for t in times if t + shift < now - s.events.max_event_age_s)
    future = sum(1 for t in times if t + shift > now + s.events.max_future_skew_s)
    if stale:
        console.print(
            f"[yellow]warning:[/yellow] {stale} of {len(times)} events are older than the event age limit "
            f"({s.events.max_event_age_s:g}s, RECSYS_MAX_EVENT_AGE_S) "
            + ("after moving the last event to now: the recording spans " if rebase_time else "(--no-rebase): ")
            + (f"{max(times) - min(times):,.0f}s. " if rebase_time else "")
            + "The stream worker will reject them as stale_timestamp.",
            soft_wrap=True,
        )
    if future:
        console.print(
            f"[yellow]warning:[/yellow] {future} of {len(times)} events lie more than "
            f"{s.events.max_future_skew_s:g}s in the future (--no-rebase): the stream worker will reject them "
            "as future_timestamp.",
            soft_wrap=True,
        )
    errors: list[str] = []
    records = shift_times(read_any(file, errors), shift)
    try:
        result = asyncio.run(
            publish(records, s.kafka, topic or s.kafka.topic_events, rate=rate, show_progress=sys.stderr.isatty())
        )
    except KafkaUnavailable as exc:
        fail(str(exc))
    for error in errors[:20]:
        console.print(f"[yellow]skipped[/yellow] {error}")
    if len(errors) > 20:
        console.print(f"[yellow]... and {len(errors) - 20} more malformed lines[/yellow]")
    console.print(
        f"published {result.records} records in {result.seconds:.2f}s ({result.rate:,.0f} rec/s); "
        f"{len(errors)} malformed lines skipped"
    )
    if errors:
        raise typer.Exit(3)


# --------------------------------------------------------------------------- the rooms' own commands

app.add_typer(stream_cli.app, name="stream", help="The Faust stream worker: validation, features, samples.")
app.add_typer(ps_cli.app, name="ps", help="The parameter service: shards, replicas, status.")
app.add_typer(train_cli.app, name="train", help="Train the model against the parameter service.")
app.add_typer(model_cli.app, name="model", help="The served state (champion + its rows): show, rollback.")
app.add_typer(serve_cli.app, name="serve", help="The recommendation API.")
app.add_typer(demo.app, name="demo", help="The whole loop on local services, measured: report under reports/.")
app.add_typer(airflow_cli.app, name="airflow", help="Local Airflow (api-server, scheduler, dag-processor, triggerer).")


@ps_cli.app.command("up")
def ps_up() -> None:
    """Start the shards and replicas of the settings on 127.0.0.1, and a replicator per replica."""
    from local_services import paramserver as local_ps
    from local_services import services

    s = load_settings()
    try:
        for note in local_ps.up(s):
            console.print(note)
    except (services.ServiceError, ValueError) as exc:
        fail(str(exc))
    ps_cli.print_status(s)


@ps_cli.app.command("down")
def ps_down() -> None:
    """Stop the shards, replicas and replicators that `recsys ps up` started."""
    from local_services import paramserver as local_ps

    stopped = local_ps.down(load_settings())
    for name, was_running in stopped:
        console.print(f"{name}: {'stopped' if was_running else 'was not running'}")
    if not stopped:
        console.print("nothing was started by `recsys ps up`")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
