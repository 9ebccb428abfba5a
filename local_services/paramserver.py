"""Local servers of the parameter service: a redis-server per shard and replica URL of the settings on
127.0.0.1 that does not answer yet, plus one replicator process per replica (`recsys ps up`); `down`
stops what `up` started."""

from __future__ import annotations

import sys
from urllib.parse import unquote, urlparse

from core.redact import redact_url
from core.settings import Settings
from local_services import services

# compact hash buckets need values as large as a row and more entries than Redis' defaults
REDIS_ARGS = ["--hash-max-listpack-value", "4096", "--hash-max-listpack-entries", "1024"]


def local_port(url: str) -> int:
    """The port of a ``redis://127.0.0.1:PORT`` URL; ValueError for any other URL."""
    parsed = urlparse(url)
    if parsed.scheme != "redis" or parsed.hostname not in ("127.0.0.1", "localhost") or not parsed.port:
        raise ValueError(f"{redact_url(url)!r}: `recsys ps up` only starts servers at redis://127.0.0.1:PORT")
    return parsed.port


def url_auth(url: str) -> services.RedisAuth | None:
    """The credentials a ``redis://[user]:password@host:port`` URL carries, as the server must require them."""
    parsed = urlparse(url)
    if parsed.password is None:
        return None
    return services.RedisAuth(unquote(parsed.password), unquote(parsed.username) if parsed.username else None)


def servers(s: Settings) -> list[tuple[str, str]]:
    """(service name, URL) of every shard and replica server."""
    named = [(f"ps-shard-{i}", url) for i, url in enumerate(s.ps.shards)]
    for i, spec in enumerate(s.ps.replicas):
        urls = spec.split(",")
        named += [(f"ps-replica-{i}" + (f"-{j}" if len(urls) > 1 else ""), url) for j, url in enumerate(urls)]
    return named


def _running(s: Settings, name: str) -> bool:
    return any(e.name == name and e.running for e in services.status(s.local.run_dir))


def up(s: Settings) -> list[str]:
    """Start what is missing; returns a line for each server that answered already (not started by us).

    Raises ``services.ServiceError`` or ``ValueError`` (a URL that is not local)."""
    notes = []
    for name, url in servers(s):
        port, auth = local_port(url), url_auth(url)
        if services.redis_ping(port, auth) and not _running(s, name):
            notes.append(f"{name}: {redact_url(url)} already answers (not started by us), using it")
            continue
        services.start_redis(
            s.local.run_dir,
            port,
            name=name,
            timeout=s.local.service_start_timeout_s,
            extra_args=REDIS_ARGS,
            auth=auth,
        )
    for i, _spec in enumerate(s.ps.replicas):
        name = f"ps-replicator-{i}"
        if _running(s, name):
            continue
        # by index, not URL: the replicator reads the URL (and its password) from the settings it inherits
        cmd = [sys.executable, "-m", "paramserver.cli", "replicate", "--replica-index", str(i)]
        services.spawn(s.local.run_dir, name, cmd, 0, f"replicate --replica-index {i}")
    return notes


def down(s: Settings) -> list[tuple[str, bool]]:
    """Stop the shards, replicas and replicators `up` started: (name, whether it was running)."""
    entries = [e for e in services.status(s.local.run_dir) if e.name.startswith("ps-")]
    # replicators first, so none of them logs errors about servers going away
    ordered = sorted(entries, key=lambda e: not e.name.startswith("ps-replicator"))
    return [(entry.name, services.stop(s.local.run_dir, entry.name)) for entry in ordered]
