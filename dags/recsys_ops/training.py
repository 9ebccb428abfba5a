"""What the training DAG's tasks do: each function is idempotent, so Airflow may retry any task.

The tasks run the project's own commands (``recsys train`` under torchrun) or call the small
functions here; all configuration comes from the RECSYS_* settings of the process (the
Airflow services inherit the environment of ``recsys airflow up``), task parameters override
a few of them per run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from core.settings import PROJECT_ROOT, Settings

log = logging.getLogger(__name__)


class TaskFailed(RuntimeError):
    """The task cannot succeed; the message says why (Airflow shows it and may retry)."""


# --------------------------------------------------------------------------- new samples


def _last_offsets(s: Settings) -> dict[int, int]:
    """End offsets of the newest committed training job (recorded by the trainer on its MLflow run)."""
    from training.tracking import Tracking

    offsets, _run = Tracking(s.mlflow.tracking_uri, s.train.experiment).last_offsets(s.kafka.topic_samples)
    return offsets


def count_new_samples(s: Settings) -> dict[str, Any]:
    """Records on the samples topic that no committed training job has consumed yet."""
    from core.kafka import KafkaUnavailable, end_offsets

    try:
        end = asyncio.run(end_offsets(s.kafka.bootstrap, s.kafka.topic_samples))
    except KafkaUnavailable as exc:
        raise TaskFailed(str(exc)) from None
    start = _last_offsets(s)
    new = sum(max(0, offset - start.get(partition, 0)) for partition, offset in end.items())
    return {
        "topic": s.kafka.topic_samples,
        "new": new,
        "start": {str(p): o for p, o in start.items()},
        "end": {str(p): o for p, o in end.items()},
    }


# --------------------------------------------------------------------------- train


def train(
    s: Settings, run_key: str, ranks: int, epochs: int, outcome_dir: Path, timeout_s: float = 6 * 3600
) -> dict[str, Any]:
    """Run ``recsys train`` once per DAG run: a retry after a finished job returns that job's outcome.

    The trainer's outcome (status, run id, model version, parameter version, metrics; `recsys
    train --json`) is kept in a JSON file named after the DAG run, so a retried task does not
    train a second window.
    """
    outcome_dir.mkdir(parents=True, exist_ok=True)
    result = outcome_dir / f"{_safe(run_key)}.json"
    if result.exists():
        previous = json.loads(result.read_text())
        if previous.get("status") in ("trained", "no_new_samples", "no_valid_samples"):
            log.info("training of %s already done (%s), not training again", run_key, previous["status"])
            return previous
    cmd = [sys.executable, "-m", "recsys.cli", "train", "--ranks", str(ranks), "--epochs", str(epochs), "--json"]
    log.info("running %s", " ".join(cmd))
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, timeout=timeout_s, capture_output=True, text=True)
    log.info("recsys train output:\n%s", done.stderr[-20000:])
    stdout = done.stdout.strip()
    try:
        outcome = json.loads(stdout[stdout.index("{") :]) if "{" in stdout else None
    except json.JSONDecodeError:
        outcome = None
    if done.returncode != 0 or outcome is None:
        reason = outcome.get("message") if outcome else (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise TaskFailed(f"`recsys train` exited with {done.returncode}: {reason}")
    if outcome.get("status") == "trained" and not outcome.get("model_version"):
        raise TaskFailed(f"`recsys train` reports a trained model but no model version: {outcome}")
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome))
    tmp.rename(result)  # the outcome that makes a retry of this run a no-op
    return outcome


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:200]


# --------------------------------------------------------------------------- evaluate and gate


def evaluate(s: Settings, model_version: str) -> dict[str, Any]:
    """Make sure the champion's AUC on the challenger's evaluation set is recorded; return both AUCs.

    The trainer evaluates on the newest share of its window and logs ``eval_auc``. The champion
    (and the challenger beside it) are scored on that same set with the same parameter rows by
    recsys_ops.evaluation; the scores go to the challenger's run (``champion_eval_auc``,
    ``challenger_eval_auc_same_rows``, tag ``recsys_champion_version``). A score recorded already
    is reused, so a retry does not score twice.
    """
    from recsys_ops import gate

    client = gate.client_for(s.mlflow.tracking_uri)
    name = s.train.model_name
    version = client.get_model_version(name, str(model_version))
    run = client.get_run(version.run_id)
    champion = gate.champion_version(client, name)
    info: dict[str, Any] = {
        "model_version": str(model_version),
        "run_id": version.run_id,
        "challenger_auc": run.data.metrics.get(gate.CHALLENGER_METRIC),
        "champion_version": champion,
        "champion_auc": None,
    }
    if info["challenger_auc"] is None:
        raise TaskFailed(f"{name} v{model_version} (run {version.run_id}) has no {gate.CHALLENGER_METRIC}")
    if champion is None or champion == str(model_version):
        return info
    if run.data.tags.get(gate.TAG_CHAMPION_VERSION) == champion and gate.CHAMPION_METRIC in run.data.metrics:
        info["champion_auc"] = run.data.metrics[gate.CHAMPION_METRIC]
        return info
    from recsys_ops.evaluation import score_versions

    try:
        scored = score_versions(s, version.run_id, {"challenger": str(model_version), "champion": champion})
    except Exception as exc:  # noqa: BLE001 - any failure means: no comparable champion score
        raise TaskFailed(
            f"the champion v{champion} could not be scored on the evaluation set of v{model_version} "
            f"({type(exc).__name__}: {exc}); the gate will not compare AUCs of different sets"
        ) from exc
    log.info("scored on the evaluation set of v%s: %s", model_version, scored)
    gate.record_champion_score(
        client,
        name,
        str(model_version),
        champion,
        scored["auc"]["champion"],
        challenger_auc=scored["auc"]["challenger"],
    )
    info["challenger_auc_same_rows"] = scored["auc"]["challenger"]
    info["eval_samples"] = scored["eval_samples"]
    info["champion_auc"] = scored["auc"]["champion"]
    return info


def gate_decision(s: Settings, model_version: str, tolerance: float) -> dict[str, Any]:
    """recsys_ops.gate's verdict on the challenger (recorded as a version tag); no alias moves here."""
    from recsys_ops import gate

    client = gate.client_for(s.mlflow.tracking_uri)
    try:
        decision = gate.evaluate_gate(client, s.train.model_name, str(model_version), tolerance)
    except gate.GateError as exc:
        raise TaskFailed(str(exc)) from None
    client.set_model_version_tag(
        s.train.model_name, str(model_version), gate.TAG_GATE, "passed" if decision.promote else "refused"
    )
    log.info("gate: %s -> %s", decision.reason, "promote" if decision.promote else "refuse")
    return decision.as_dict()


def promote(s: Settings, decision: dict[str, Any]) -> dict[str, Any]:
    """Move the ``champion`` alias to a challenger that passed the gate (idempotent)."""
    from recsys_ops import gate

    client = gate.client_for(s.mlflow.tracking_uri)
    promoted = gate.promote(client, s.train.model_name, gate.Decision(**decision))
    return {"champion": gate.champion_version(client, s.train.model_name), "promoted": promoted}


# --------------------------------------------------------------------------- publish and reload


def wait_for_replicas(s: Settings, ps_version: int, timeout_s: float, poll_s: float = 0.5) -> dict[str, Any]:
    """Block until every inference replica (RECSYS_PS_REPLICAS) has applied ``ps_version``."""
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
            raise TaskFailed(
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
            raise TaskFailed(f"serving at {url} refused the reload: {response.status_code} {response.text[:300]}")
        body = response.json()
        served = str(body.get("model_version"))
        # serving answers "<model name>/<registry version>" (see serving/loader.py)
        if model_version is not None and served != str(model_version) and not served.endswith(f"/{model_version}"):
            raise TaskFailed(f"serving at {url} reloaded version {body.get('model_version')}, expected {model_version}")
        results[url] = body
    return results
