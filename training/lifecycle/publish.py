"""Publication of a promoted model: its parameter version on every inference replica, then serving.

A job pushes its rows to the training copy of the parameter service; the replicators of
`recsys ps up` copy each version to the inference replicas serving reads. The champion is
published once every replica has applied the job's version; serving is then asked to load
the champion now rather than at its next poll of the registry alias.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from core.settings import Settings
from training.lifecycle import LifecycleError

log = logging.getLogger(__name__)


class VersionReader(Protocol):
    """What the wait needs of a replica reader (paramserver.FailoverReader has it)."""

    def version(self) -> int: ...


def wait_for_replicas(
    s: Settings,
    ps_version: int,
    timeout_s: float,
    poll_s: float = 0.5,
    *,
    since: float | None = None,
    readers: Mapping[str, VersionReader] | None = None,
) -> dict[str, Any]:
    """Block until every inference replica (RECSYS_PS_REPLICAS) has applied ``ps_version``.

    Returns ``{"ps_version": ps_version, "replicas": {replica: applied version}, "applied_s": {replica:
    seconds from since (a time.perf_counter(); default: this call) until it was seen applied}}``; raises
    LifecycleError naming the replicas behind, and why, after ``timeout_s``. ``readers`` (one per replica
    spec, left open) lets a caller that waits many times reuse its connections; ``poll_s`` is the
    resolution of ``applied_s`` (the demo measures with 2 ms).
    """
    from paramserver import ParamServerError, open_reader

    since = time.perf_counter() if since is None else since
    specs = list(readers) if readers is not None else list(s.ps.replicas)
    if not specs:
        log.warning("no inference replicas configured (RECSYS_PS_REPLICAS): nothing to wait for")
        return {"ps_version": ps_version, "replicas": {}, "applied_s": {}}
    owned = {spec: open_reader(s.ps, [spec]) for spec in specs} if readers is None else {}
    polled = readers if readers is not None else owned
    applied: dict[str, int] = {}
    applied_s: dict[str, float] = {}
    last_error: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            for spec in specs:
                if spec in applied:
                    continue
                try:
                    version = polled[spec].version()
                except ParamServerError as exc:
                    last_error[spec] = str(exc)
                    continue
                if version >= ps_version:
                    applied[spec], applied_s[spec] = version, time.perf_counter() - since
                else:
                    last_error[spec] = f"at version {version}"
            if len(applied) == len(specs):
                return {"ps_version": ps_version, "replicas": applied, "applied_s": applied_s}
            if time.monotonic() > deadline:
                behind = {spec: last_error.get(spec, "not read") for spec in specs if spec not in applied}
                raise LifecycleError(
                    f"after {timeout_s:.0f}s these replicas have not applied version {ps_version}: "
                    f"{behind} (is `recsys ps up` running their replicators?)"
                )
            time.sleep(poll_s)
    finally:
        for reader in owned.values():
            reader.close()


def reload_serving(s: Settings, model_version: str | None) -> dict[str, Any]:
    """POST /admin/reload to every serving replica; one that does not run is reported, not an error.

    A serving process that is not running loads the champion when it starts, and a running one
    also polls the alias (RECSYS_SERVING_RELOAD_POLL_S): this call only makes the swap immediate.
    """
    import httpx

    urls = s.serving.reload_urls or [f"http://{s.serving.host}:{s.serving.port}"]
    headers = {"Authorization": f"Bearer {s.serving.admin_token}"} if s.serving.admin_token else {}
    results: dict[str, Any] = {}
    for url in urls:
        try:
            response = httpx.post(f"{url.rstrip('/')}/admin/reload", headers=headers, timeout=60.0)
        except httpx.TransportError as exc:
            log.warning("serving at %s not reachable (%s): it loads the champion when it starts", url, exc)
            results[url] = "not running"
            continue
        if response.status_code >= 300:
            raise LifecycleError(f"serving at {url} refused the reload: {response.status_code} {response.text[:300]}")
        body = response.json()
        served = str(body.get("model_version"))
        # serving answers "<model name>/<registry version>" (see serving/loader.py)
        if model_version is not None and served != str(model_version) and not served.endswith(f"/{model_version}"):
            raise LifecycleError(
                f"serving at {url} reloaded version {body.get('model_version')}, expected {model_version}"
            )
        results[url] = body
    return results
