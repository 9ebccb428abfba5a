"""`recsys ps ...`: the parameter service's status, the replicator, snapshots.

Shards and replicas are the Redis URLs of the settings (RECSYS_PS_SHARDS, RECSYS_PS_REPLICAS,
nearest replica first). Starting local servers for them (`recsys ps up` / `down`) is the local
services' job (local_services/paramserver.py); the shell mounts those commands beside these.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from core.cli_support import console, fail, load_settings
from core.redact import redact_url, redact_urls
from core.settings import Settings

app = typer.Typer(no_args_is_help=True)
out = Console()


@app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")] = False,
) -> None:
    """Shards (applied version, memory, keys), the committed version, and each replica's version and lag."""
    print_status(load_settings(), as_json)


def collect_status(s: Settings) -> dict:
    """The training copy's status and every replica's version, versions behind and lag."""
    from paramserver.redis_store import RedisStore
    from paramserver.replication import replica_status
    from paramserver.rows import ParamServerError

    source = None
    try:
        source = RedisStore.from_settings(s.ps, [], timeout=1.0, configure_servers=False)
        info = source.status()
    except ParamServerError as exc:
        info = {"shards": [{"url": u, "up": False, "error": str(exc)} for u in s.ps.shards]}
    try:
        info["replicas"] = [
            replica_status(source, spec.split(","), timeout=1.0, namespace=s.ps.namespace) for spec in s.ps.replicas
        ]
    finally:
        if source is not None:
            source.close()
    return info


def print_status(s: Settings, as_json: bool = False) -> None:
    info = collect_status(s)
    if as_json:
        out.print_json(data=info)
        return
    table = Table(
        "shard",
        "state",
        "applied",
        "memory",
        "keys",
        title=f"training copy: version {info.get('version', '?')}, tables {info.get('tables', [])}, "
        f"{info.get('log_versions', 0)} versions in the delta log, staging areas {info.get('stages', [])}",
    )
    for entry in info["shards"]:
        table.add_row(
            entry["url"],
            "[green]up[/green]" if entry["up"] else f"[red]down[/red] {entry.get('error', '')}",
            str(entry.get("applied", "-")),
            f"{entry.get('used_memory', 0) / 2**20:.1f} MiB",
            str(entry.get("keys", "-")),
        )
    out.print(table)
    if info["replicas"]:
        rt = Table("replica (nearest first)", "state", "version", "behind", "lag s", "last apply delay s")
        for entry in info["replicas"]:
            state = "[green]up[/green]" if entry["up"] else f"[red]down[/red] {entry.get('error', '')}"
            rt.add_row(
                entry["replica"],
                state,
                *(str(entry.get(k, "-")) for k in ("version", "behind", "lag_s", "apply_delay_s")),
            )
        out.print(rt)


@app.command("replicate")
def replicate(
    replica: Annotated[
        str | None, typer.Option(help="replica Redis URL (comma-separated URLs for a sharded replica)")
    ] = None,
    replica_index: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="the replica at this position of RECSYS_PS_REPLICAS instead of --replica "
            "(keeps its password off the command line, where `ps` shows it)",
        ),
    ] = None,
    snapshot_dir: Annotated[Path | None, typer.Option(help="bootstrap a new replica from this snapshot")] = None,
    once: Annotated[bool, typer.Option(help="catch up once and exit")] = False,
) -> None:
    """Follow the training copy's delta log into one replica (run by `recsys ps up`)."""
    from paramserver.redis_store import RedisStore
    from paramserver.replication import Replicator
    from paramserver.rows import ParamServerError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    s = load_settings()
    if (replica is None) == (replica_index is None):
        fail("give one of --replica URL or --replica-index N", 2)
    if replica is None:
        assert replica_index is not None
        if replica_index >= len(s.ps.replicas):
            fail(f"--replica-index {replica_index}: RECSYS_PS_REPLICAS has {len(s.ps.replicas)} replicas", 2)
        replica = s.ps.replicas[replica_index]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.is_set():
        try:
            source = RedisStore.from_settings(s.ps, [])
            target = RedisStore.from_settings(s.ps, list(source.tables.values()), shards=replica.split(","))
            break
        except ParamServerError as exc:
            console.print(f"replicator waiting for servers: {exc}")
            stop.wait(1.0)
    else:
        return
    replicator = Replicator(source, target, poll_s=s.ps.replicator_poll_s, snapshot_dir=snapshot_dir)
    if once:
        while replicator.step(wait_s=0) is not None:
            pass
        out.print(f"replica at version {target.version()} (source {source.version()})")
        return
    console.print(f"replicating {redact_urls(s.ps.shards)} -> {redact_url(replica)}")
    replicator.run(stop)


@app.command("snapshot")
def snapshot(path: Annotated[Path, typer.Argument(help="snapshot folder (incremental when it holds one)")]) -> None:
    """Checkpoint the training copy into a folder: full the first time, then only changed rows."""
    from paramserver.redis_store import RedisStore
    from paramserver.rows import ParamServerError

    s = load_settings()
    try:
        with RedisStore.from_settings(s.ps, []) as store:
            started = time.perf_counter()
            info = store.snapshot(path)
    except (ParamServerError, OSError) as exc:
        fail(str(exc))
    out.print(
        f"{info.kind} snapshot at version {info.version} into {info.path}: {info.rows} rows "
        f"in {time.perf_counter() - started:.2f}s"
    )


@app.command("restore")
def restore(path: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="snapshot folder")]) -> None:
    """Replace the training copy's rows with a snapshot (do it while no trainer runs)."""
    import json

    from paramserver.redis_store import RedisStore
    from paramserver.rows import ParamServerError, TableConfig

    s = load_settings()
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        tables = [TableConfig(**cfg) for cfg in manifest["tables"].values()]
        with RedisStore.from_settings(s.ps, tables) as store:
            version = store.restore(path)
    except (ParamServerError, OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"cannot restore {path}: {exc}")
    out.print(f"restored version {version} from {path}")


if __name__ == "__main__":  # `python -m paramserver.cli replicate ...` (the replicator processes)
    app()
