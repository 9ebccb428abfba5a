"""`recsys ps ...`: local shards and replicas, their status, the replicator, snapshots.

Shards and replicas are the Redis URLs of the settings (RECSYS_PS_SHARDS, RECSYS_PS_REPLICAS,
nearest replica first). `up` starts a redis-server for every such URL on 127.0.0.1 that does
not answer yet, plus one replicator process per replica; `down` stops what `up` started.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import urlparse

import typer
from rich.console import Console
from rich.table import Table

from recsys.cli_support import console, fail, load_settings
from recsys.settings import Settings

app = typer.Typer(no_args_is_help=True)
out = Console()

# compact hash buckets need values as large as a row and more entries than Redis' defaults
REDIS_ARGS = ["--hash-max-listpack-value", "4096", "--hash-max-listpack-entries", "1024"]


def _local_port(url: str) -> int:
    parsed = urlparse(url)
    if parsed.scheme != "redis" or parsed.hostname not in ("127.0.0.1", "localhost") or not parsed.port:
        raise typer.BadParameter(f"{url!r}: `recsys ps up` only starts servers at redis://127.0.0.1:PORT")
    return parsed.port


def _servers(s: Settings) -> list[tuple[str, str]]:
    """(service name, URL) of every shard and replica server."""
    named = [(f"ps-shard-{i}", url) for i, url in enumerate(s.ps_shards)]
    for i, spec in enumerate(s.ps_replicas):
        urls = spec.split(",")
        named += [(f"ps-replica-{i}" + (f"-{j}" if len(urls) > 1 else ""), url) for j, url in enumerate(urls)]
    return named


@app.command("up")
def up() -> None:
    """Start the shards and replicas of the settings on 127.0.0.1, and a replicator per replica."""
    from recsys import services

    s = load_settings()
    try:
        for name, url in _servers(s):
            port = _local_port(url)
            if services.redis_ping(port) and not any(e.name == name and e.running for e in services.status(s.run_dir)):
                console.print(f"{name}: {url} already answers (not started by us), using it")
                continue
            services.start_redis(s.run_dir, port, name=name, timeout=s.service_start_timeout_s, extra_args=REDIS_ARGS)
        for i, spec in enumerate(s.ps_replicas):
            name = f"ps-replicator-{i}"
            if any(e.name == name and e.running for e in services.status(s.run_dir)):
                continue
            cmd = [sys.executable, "-m", "paramserver.cli", "replicate", "--replica", spec]
            services._spawn(s.run_dir, name, cmd, 0, f"replicate --replica {spec}")  # noqa: SLF001
    except (services.ServiceError, typer.BadParameter) as exc:
        fail(str(exc))
    _print_status(s)


@app.command("down")
def down() -> None:
    """Stop the shards, replicas and replicators that `recsys ps up` started."""
    from recsys import services

    s = load_settings()
    entries = [e for e in services.status(s.run_dir) if e.name.startswith("ps-")]
    # replicators first, so none of them logs errors about servers going away
    for entry in sorted(entries, key=lambda e: not e.name.startswith("ps-replicator")):
        stopped = services.stop(s.run_dir, entry.name)
        console.print(f"{entry.name}: {'stopped' if stopped else 'was not running'}")
    if not entries:
        console.print("nothing was started by `recsys ps up`")


@app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")] = False,
) -> None:
    """Shards (applied version, memory, keys), the committed version, and each replica's version and lag."""
    _print_status(load_settings(), as_json)


def collect_status(s: Settings) -> dict:
    """The training copy's status and every replica's version, versions behind and lag."""
    from paramserver.redis_store import RedisStore
    from paramserver.replication import replica_status
    from paramserver.rows import ParamServerError

    source = None
    try:
        source = RedisStore(s.ps_shards, [], namespace=s.ps_namespace, timeout=1.0, configure_servers=False)
        info = source.status()
    except ParamServerError as exc:
        info = {"shards": [{"url": u, "up": False, "error": str(exc)} for u in s.ps_shards]}
    try:
        info["replicas"] = [replica_status(source, spec.split(","), timeout=1.0, namespace=s.ps_namespace)
                            for spec in s.ps_replicas]
    finally:
        if source is not None:
            source.close()
    return info


def _print_status(s: Settings, as_json: bool = False) -> None:
    info = collect_status(s)
    if as_json:
        out.print_json(data=info)
        return
    table = Table("shard", "state", "applied", "memory", "keys",
                  title=f"training copy: version {info.get('version', '?')}, tables {info.get('tables', [])}, "
                        f"{info.get('log_versions', 0)} versions in the delta log")
    for entry in info["shards"]:
        table.add_row(entry["url"], "[green]up[/green]" if entry["up"] else f"[red]down[/red] {entry.get('error', '')}",
                      str(entry.get("applied", "-")), f"{entry.get('used_memory', 0) / 2**20:.1f} MiB",
                      str(entry.get("keys", "-")))
    out.print(table)
    if info["replicas"]:
        rt = Table("replica (nearest first)", "state", "version", "behind", "lag s", "last apply delay s")
        for entry in info["replicas"]:
            state = "[green]up[/green]" if entry["up"] else f"[red]down[/red] {entry.get('error', '')}"
            rt.add_row(entry["replica"], state, *(str(entry.get(k, "-")) for k in
                                                  ("version", "behind", "lag_s", "apply_delay_s")))
        out.print(rt)


@app.command("replicate")
def replicate(
    replica: Annotated[str, typer.Option(help="replica Redis URL (comma-separated URLs for a sharded replica)")],
    snapshot_dir: Annotated[Path | None, typer.Option(help="bootstrap a new replica from this snapshot")] = None,
    once: Annotated[bool, typer.Option(help="catch up once and exit")] = False,
) -> None:
    """Follow the training copy's delta log into one replica (run by `recsys ps up`)."""
    from paramserver.redis_store import RedisStore
    from paramserver.replication import Replicator
    from paramserver.rows import ParamServerError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    s = load_settings()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.is_set():
        try:
            source = RedisStore(s.ps_shards, [], namespace=s.ps_namespace, timeout=s.ps_timeout_s,
                                log_retention_s=s.ps_log_retention_s)
            target = RedisStore(replica.split(","), list(source.tables.values()), namespace=s.ps_namespace,
                                timeout=s.ps_timeout_s, log_retention_s=s.ps_log_retention_s)
            break
        except ParamServerError as exc:
            console.print(f"replicator waiting for servers: {exc}")
            stop.wait(1.0)
    else:
        return
    replicator = Replicator(source, target, poll_s=s.ps_replicator_poll_s, snapshot_dir=snapshot_dir)
    if once:
        while replicator.step(wait_s=0) is not None:
            pass
        out.print(f"replica at version {target.version()} (source {source.version()})")
        return
    console.print(f"replicating {s.ps_shards} -> {replica}")
    replicator.run(stop)


@app.command("snapshot")
def snapshot(path: Annotated[Path, typer.Argument(help="snapshot folder (incremental when it holds one)")]) -> None:
    """Checkpoint the training copy into a folder: full the first time, then only changed rows."""
    from paramserver.redis_store import RedisStore
    from paramserver.rows import ParamServerError

    s = load_settings()
    try:
        with RedisStore(s.ps_shards, [], namespace=s.ps_namespace, timeout=s.ps_timeout_s) as store:
            started = time.perf_counter()
            info = store.snapshot(path)
    except (ParamServerError, OSError) as exc:
        fail(str(exc))
    out.print(f"{info.kind} snapshot at version {info.version} into {info.path}: {info.rows} rows "
              f"in {time.perf_counter() - started:.2f}s")


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
        with RedisStore(s.ps_shards, tables, namespace=s.ps_namespace, timeout=s.ps_timeout_s) as store:
            version = store.restore(path)
    except (ParamServerError, OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"cannot restore {path}: {exc}")
    out.print(f"restored version {version} from {path}")


if __name__ == "__main__":  # `python -m paramserver.cli replicate ...` (the replicator processes)
    app()
