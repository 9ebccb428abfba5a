"""What a demo run is: its options, its report, the settings it needs, and how it tells the user.

``demo_overrides`` sets the RECSYS_* values the demo depends on (two inference replicas, a short
attribution window, Airflow runs only when triggered, ...) for every variable the caller left unset.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from core.settings import Settings

console = Console(stderr=True)
TRAINING_DAG = "recsys_training"
FEATURES_DAG = "recsys_features"
PROBE_TABLE = "demo_freshness_probe"
# freshness chains, in report order: key -> label
CHAINS = {
    "event_to_feature_online": "event → feature online",
    "click_to_sample": "click → sample",
    "push_to_replica_applied": "push → replica applied (all replicas)",
    "champion_to_serving_reload": "champion change → serving reload",
}
# the online stage's chain (its probes are counted apart: the stage can be skipped)
ONLINE_CHAIN = "click_to_served_online"
ONLINE_CHAIN_LABEL = "click → trained, on every replica and served (online trainer)"
ONLINE_STAGES = {
    "click_to_sample": "click → sample (stream worker's join)",
    "sample_to_flushed": "sample → flushed (consumed, trained, pushed)",
    "flushed_to_replicas": "flushed → on every replica",
    "flushed_to_served": "flushed → served score changed",
}


class DemoError(RuntimeError):
    """A stage of the demo failed; the message says which and why."""


@dataclass
class DemoConfig:
    """Sizes of one demo run (the CLI's options, same defaults): the world, the closed loop's phases, training."""

    users: int = 200
    items: int = 150
    seed: int = 1
    rate: float = 20.0  # closed-loop recommendation requests per second
    concurrency: int = 8  # closed-loop requests in flight at most
    cold_s: float = 90.0  # the first phase, served by the fallback scorer (no champion yet)
    phase_s: float = 150.0  # traffic during each training round, from the end of its train task
    final_s: float = 60.0  # the last phase, which measures the final champion
    rounds: int = 3  # training DAG runs
    bucket_s: float = 10.0  # time buckets of the served-CTR series
    epochs: int = 8
    ranks: int = 1
    probes: int = 20
    query_users: int = 100
    # the online stage's closed loop, served by the online trainer; 0 (the default): no online stage. Opt-in
    # because at the demo's rate the guard halts publishing (README "The whole loop": the online stage)
    online_s: float = 0.0
    online_probes: int = 20  # click -> served probes during the online stage
    quality_hours: int = 12  # online vs hourly batch from a cold start, simulated on this world (0: skipped)
    quality_hour_samples: int = 30_000  # impressions per simulated hour of that comparison
    mlflow_server: bool = True
    mlflow_port: int = 5000
    stop: bool = False
    stage_timeout_s: float = 600.0
    report_dir: Path | None = None


@dataclass
class Report:
    started: str
    config: dict[str, Any]
    urls: dict[str, str] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)  # closed-loop phases, in order
    rounds: list[dict[str, Any]] = field(default_factory=list)  # training DAG runs, in order
    closed_loop: dict[str, Any] = field(default_factory=dict)  # series, label check, targets
    model: dict[str, Any] = field(default_factory=dict)
    serving: dict[str, Any] = field(default_factory=dict)
    freshness: dict[str, dict[str, Any]] = field(default_factory=dict)
    online: dict[str, Any] = field(default_factory=dict)  # the online stage: trainer, flushes, AUC per flush
    online_quality: dict[str, Any] = field(default_factory=dict)  # online vs hourly batch (bench online_quality)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def demo_overrides(env: Mapping[str, str], run_dir: Path, mlflow_port: int | None) -> dict[str, str]:
    """RECSYS_* values the demo needs, for every variable the caller did not set itself.

    Two inference replicas stand for two datacenters; the attribution window is short so the
    negatives of a few minutes of traffic close during the demo; Airflow runs the training DAG
    only when triggered; serving polls the champion alias every second.
    """
    base = Settings()
    rp = base.local.redis_port
    token_file = run_dir / "demo" / "serving_admin_token"
    if token_file.exists():
        token = token_file.read_text().strip()
    else:
        token = secrets.token_urlsafe(24)
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text(token)
        token_file.chmod(0o600)
    tracking = f"http://127.0.0.1:{mlflow_port}" if mlflow_port else f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}"
    wanted = {
        "RUN_DIR": str(run_dir),
        "KAFKA_BOOTSTRAP": f"127.0.0.1:{base.local.kafka_port}",
        "REDIS_URL": f"redis://127.0.0.1:{rp}/0",
        "PS_SHARDS": json.dumps([f"redis://127.0.0.1:{rp + 1}/0"]),
        "PS_REPLICAS": json.dumps([f"redis://127.0.0.1:{rp + 2}/0", f"redis://127.0.0.1:{rp + 3}/0"]),
        "FEAST_ONLINE_STORE": "redis",
        "FEAST_DATA_DIR": str(run_dir / "feast"),
        "MLFLOW_TRACKING_URI": tracking,
        "SERVING_ADMIN_TOKEN": token,
        "SERVING_RELOAD_POLL_S": "1",
        "AIRFLOW_TRAINING_SCHEDULE": "",
        "AIRFLOW_FEATURES_SCHEDULE": "",
        "STREAM_ATTRIBUTION_WINDOW_S": "30",
        "PUBLISH_TIMEOUT_S": "180",
        # bench learning_curve: on the demo's world, row-wise Adagrad at 0.03 learns from the same
        # samples faster than the default 0.1 (which overfits the id rows of a few hundred users)
        "TRAIN_EMBEDDING_LR": "0.03",
        # explored lists earn about the random policy's CTR: at 0.1 they cost ~0.035 of the served CTR
        "SERVING_EXPLORE_SHARE": "0.05",
        # the loop dashboard (README "What operators see"): the worker and the simulator serve /metrics
        # next to Prometheus, which scrapes them
        "STREAM_METRICS_PORT": str(base.local.loop_exporter_port + 1),
        "SIM_METRICS_PORT": str(base.local.loop_exporter_port + 2),
    }
    return {f"RECSYS_{k}": v for k, v in wanted.items() if f"RECSYS_{k}" not in env}


def step(message: str) -> None:
    """Announce the next stage."""
    console.print(f"\n[bold blue]==> {message}[/bold blue]")
