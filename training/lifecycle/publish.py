"""Publication of a promoted model: its parameter version on every inference replica, then serving.

A job pushes its rows to the training copy of the parameter service; the replicators of
`recsys ps up` copy each version to the inference replicas serving reads. The champion is
published once every replica has applied the job's version; serving is then asked to load
the champion now rather than at its next poll of the registry alias.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from core.settings import Settings
from training.lifecycle import LifecycleError

log = logging.getLogger(__name__)


def wait_for_replicas(s: Settings, ps_version: int, timeout_s: float, poll_s: float = 0.5) -> dict[str, Any]:
    """Block until every inference replica (RECSYS_PS_REPLICAS) has applied ``ps_version``.

    Returns ``{"ps_version": ps_version, "replicas": {replica: applied version}}``; raises
    LifecycleError naming the replicas behind after ``timeout_s``.
    """
    from paramserver.replication import replica_status

    replicas = [spec.split(",") for spec in s.ps.replicas]
    if not replicas:
        log.warning("no inference replicas configured (RECSYS_PS_REPLICAS): nothing to wait for")
        return {"ps_version": ps_version, "replicas": {}}
    deadline = time.monotonic() + timeout_s
    while True:
        states = {
            ",".join(urls): replica_status(None, urls, timeout=min(2.0, s.ps.timeout_s), namespace=s.ps.namespace)
            for urls in replicas
        }
        behind = {
            name: st.get("version", st.get("error"))
            for name, st in states.items()
            if not st.get("up") or int(st.get("version", -1)) < ps_version
        }
        if not behind:
            return {"ps_version": ps_version, "replicas": {n: st["version"] for n, st in states.items()}}
        if time.monotonic() > deadline:
            raise LifecycleError(
                f"after {timeout_s:.0f}s these replicas have not applied version {ps_version}: "
                f"{behind} (is `recsys ps up` running their replicators?)"
            )
        time.sleep(poll_s)


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
