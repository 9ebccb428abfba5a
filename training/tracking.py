"""MLflow bookkeeping of training jobs: runs, the manifest, dense weights, the registry, offsets.

Where the consumed offsets live: on the MLflow run of each job. Right after a job's push to
the parameter service commits, its run gets the tags ``recsys_committed=true`` and
``recsys_offsets_end`` (JSON partition -> offset). The next job on the same topic starts from
the end offsets of the newest committed run (``last_offsets``). So a job that dies before its
push leaves neither rows nor offsets behind and the rerun reads the same window again. A run
the gate refused or could not evaluate is marked ``recsys_window=carried``: the next job's
window starts before it (``window_start``), so its samples are trained on again.

Metric names: ``loss`` (per step), ``eval_auc``, ``eval_log_loss``, ``eval_calibration``
(mean prediction / observed CTR), ``eval_oracle_auc`` (when a truth file was given). A metric
that could not be had is never a silent gap: the tag ``recsys_missing_metrics`` says which and why
(MLflow's UI hides a NaN metric), and the run's description (``mlflow.note.content``) leads with it.

What an operator sees: the experiment is tagged as model training (``mlflow.experimentKind``), and
links into the UI carry ``workflowType=machine_learning`` (MLflow 3.17's UI picks its view from that
parameter, GenAI otherwise); runs are named after what they are (the orchestrator's run, else the
window) and tagged with the Airflow DAG run that made them (``airflow_*``); the window is the run's
dataset input (source type ``kafka``: topic, partitions, offsets).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.mlflow_auth import tracking_uri
from core.settings import MlflowSettings

TAG_TOPIC = "recsys_topic"
TAG_COMMITTED = "recsys_committed"
TAG_OFFSETS = "recsys_offsets_end"
TAG_PS_VERSION = "recsys_ps_version"
TAG_PROCESS = "recsys_process"  # host/pid/start ticks of the job that owns a RUNNING run
TAG_ABANDONED = "recsys_abandoned"
# set by the gate on a refused or not evaluable challenger's run: its window is trained on again
TAG_WINDOW = "recsys_window"
WINDOW_CARRIED = "carried"
TAG_WINDOW_REASON = "recsys_window_reason"
TAG_EVAL_STATUS = "eval_status"  # training.quality.EVALUATED | NOT_EVALUABLE
TAG_EVAL_REASON = "eval_reason"
TAG_MISSING_METRICS = "recsys_missing_metrics"  # JSON {metric: why it was not logged}
TAG_NOTE = "mlflow.note.content"  # the run's description on its page
# the orchestrator's run that made a job (the reverse link: its URL), set by the training DAG
TAG_AIRFLOW_DAG_ID = "airflow_dag_id"
TAG_AIRFLOW_RUN_ID = "airflow_run_id"
TAG_AIRFLOW_URL = "airflow_url"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # not GenAI: no traces, no token costs
UI_WORKFLOW = "workflowType=machine_learning"
CHALLENGER = "challenger"
DENSE_ARTIFACT_DIR = "dense"
DENSE_FILE = "dense.pt"
MANIFEST_FILE = "manifest.json"
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

# an unreachable tracking server should fail in seconds, not after MLflow's minutes of retries
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def run_url(ui_base: str | None, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI at ``ui_base`` (None: no UI), in the model-training view."""
    if not ui_base:
        return None
    return f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{UI_WORKFLOW}"


def finite_metrics(metrics: Mapping[str, float]) -> tuple[dict[str, float], dict[str, str]]:
    """The metrics MLflow shows, and why each other one is left out (NaN and infinity vanish from its UI)."""
    kept: dict[str, float] = {}
    missing: dict[str, str] = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            missing[key] = f"not a number: {value!r}"[:200]
            continue
        if math.isfinite(number):
            kept[key] = number
        else:
            missing[key] = f"not logged: the value was {number}"
    return kept, missing


def window_dataset(
    topic: str, bootstrap: str, start: Mapping[int, int], end: Mapping[int, int], profile: Mapping[str, Any]
) -> Any:
    """The window of a job as an MLflow dataset: source type ``kafka``, source {bootstrap, topic, offsets}.

    The digest is of the topic and offsets: two runs on the same window show the same dataset.
    """
    import hashlib

    from mlflow.entities import Dataset

    offsets = {
        str(p): {"start": int(start.get(p, 0)), "end": int(o)} for p, o in sorted(end.items(), key=lambda kv: kv[0])
    }
    source = json.dumps({"bootstrap": bootstrap, "topic": topic, "partitions": offsets}, sort_keys=True)
    digest = hashlib.sha256(f"{topic}|{json.dumps(offsets, sort_keys=True)}".encode()).hexdigest()[:16]
    records = sum(o["end"] - o["start"] for o in offsets.values())
    return Dataset(
        name=f"{topic}@{window_label(start, end)}",
        digest=digest,
        source_type="kafka",
        source=source,
        profile=json.dumps({"records": records, **profile}, sort_keys=True, default=str),
    )


def window_label(start: Mapping[int, int], end: Mapping[int, int]) -> str:
    """A short name of a window: its records counted over all partitions, first to last (``1200-1850``)."""
    return f"{sum(start.get(p, 0) for p in end)}-{sum(end.values())}"


class TrackingUnavailable(RuntimeError):
    """MLflow could not be reached or used; the message says where and how to fix it."""


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite-backed store sit beside its database file (a server decides for itself)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    return None


def _this_process() -> str:
    from core.procs import process_start_ticks

    return f"{socket.gethostname()}/{os.getpid()}/{process_start_ticks(os.getpid())}"


class Tracking:
    def __init__(self, tracking: MlflowSettings | str, experiment: str) -> None:
        from mlflow import MlflowClient

        self.uri = uri = tracking_uri(tracking)
        try:
            if uri.startswith("sqlite:///"):
                Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                self.experiment_id = self.client.create_experiment(
                    experiment,
                    artifact_location=_artifact_location(uri, experiment),
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
            else:
                self.experiment_id = found.experiment_id
                if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the tag was set
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except Exception as exc:  # MLflow raises many types (MlflowException, requests, SQLAlchemy)
            raise self.unreachable(exc) from exc
        if isinstance(tracking, MlflowSettings):
            self.ui_base = tracking.ui_base
        else:
            self.ui_base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else None

    def run_url(self, run_id: str) -> str | None:
        """The run's page in the MLflow UI (None when the store is a file with no UI configured)."""
        return run_url(self.ui_base, self.experiment_id, run_id)

    def unreachable(self, exc: BaseException) -> TrackingUnavailable:
        return TrackingUnavailable(
            f"MLflow at {self.uri} is unreachable ({type(exc).__name__}: {str(exc)[:300]}). Start the tracking "
            "server or point RECSYS_MLFLOW_TRACKING_URI at a running one (or a sqlite:///path/mlflow.db file)."
        )

    def _committed_runs(self, topic: str, newest: int) -> list[Any]:
        if not _TOPIC.match(topic):
            raise ValueError(f"invalid Kafka topic name {topic!r}")
        try:
            return list(
                self.client.search_runs(
                    [self.experiment_id],
                    f"tags.{TAG_TOPIC} = '{topic}' and tags.{TAG_COMMITTED} = 'true'",
                    order_by=["attributes.start_time DESC"],
                    max_results=newest,
                )
            )
        except Exception as exc:
            raise self.unreachable(exc) from exc

    def last_offsets(self, topic: str) -> tuple[dict[int, int], str | None]:
        """End offsets recorded by the newest committed job on ``topic`` ({} and None before the first).

        Where new samples begin; a job's window may start earlier (``window_start``).
        """
        runs = self._committed_runs(topic, 1)
        return (_end_offsets(runs[0]), runs[0].info.run_id) if runs else ({}, None)

    def window_start(self, topic: str, max_carried: int) -> tuple[dict[int, int], str | None]:
        """Where the next job's window starts: the end of the newest committed run whose window is not carried.

        The gate marks the run of a refused or not evaluable challenger ``recsys_window=carried``:
        its samples go into the next job's window again (its dense part, trained from scratch on
        one window, is thrown away with it). At most ``max_carried`` such runs in a row are
        carried; past that the window starts at the newest end, as without carrying.
        """
        runs = self._committed_runs(topic, max_carried + 1)
        for run in runs:
            if run.data.tags.get(TAG_WINDOW) != WINDOW_CARRIED:
                return _end_offsets(run), run.info.run_id
        if len(runs) <= max_carried:  # nothing but carried runs since the topic's first job
            return {}, None
        return _end_offsets(runs[0]), runs[0].info.run_id  # too many carried in a row: consume them

    def close_abandoned_runs(self) -> list[str]:
        """Mark KILLED the RUNNING runs whose job process on this host is gone (SIGKILL, OOM, a lost node).

        Such a run never committed offsets, so nothing is lost; left RUNNING it would read as a
        job in progress forever. Runs of other hosts, and runs without the process tag, are left alone.
        """
        from core.procs import process_start_ticks

        closed = []
        try:
            for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=200):
                host, _, pid_start = run.data.tags.get(TAG_PROCESS, "").partition("/")
                pid, _, ticks = pid_start.partition("/")
                if host != socket.gethostname() or not pid.isdigit() or not ticks.isdigit():
                    continue
                if process_start_ticks(int(pid)) == int(ticks):
                    continue  # still running
                self.client.set_tag(run.info.run_id, TAG_ABANDONED, f"process {pid} on {host} is gone")
                self.client.set_terminated(run.info.run_id, "KILLED")
                closed.append(run.info.run_id)
        except Exception as exc:  # MLflow raises many types; the job fails with the tracking message
            raise self.unreachable(exc) from exc
        return closed

    def start_run(
        self, topic: str, params: Mapping[str, Any], name: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={**(tags or {}), TAG_TOPIC: topic, TAG_PROCESS: _this_process()},
        )
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return run.info.run_id

    def log_series(self, run_id: str, key: str, values: Sequence[float], first_step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(v), now, first_step + i) for i, v in enumerate(values)]
        for start in range(0, len(metrics), 1000):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float]) -> dict[str, str]:
        """Log the finite metrics; the others are named with their reason in ``recsys_missing_metrics``.

        Returns that ``{metric: reason}`` (empty when every metric was logged).
        """
        from mlflow.entities import Metric

        kept, missing = finite_metrics(metrics)
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in kept.items()])
        if missing:
            self.client.set_tag(run_id, TAG_MISSING_METRICS, json.dumps(missing, sort_keys=True)[:5000])
        return missing

    def log_window(
        self,
        run_id: str,
        topic: str,
        bootstrap: str,
        start: Mapping[int, int],
        end: Mapping[int, int],
        profile: Mapping[str, Any],
    ) -> None:
        """Record the job's window as the run's dataset input (context ``training``)."""
        from mlflow.entities import DatasetInput, InputTag

        dataset = window_dataset(topic, bootstrap, start, end, profile)
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])

    def describe(self, run_id: str, text: str) -> None:
        """The run's description (Markdown, on top of its page)."""
        self.client.set_tag(run_id, TAG_NOTE, text[:5000])

    def commit_offsets(self, run_id: str, end_offsets: Mapping[int, int], ps_version: int) -> None:
        """Record that the job's rows are staged (pulled at ``ps_version``): its window is consumed."""
        self.client.set_tag(run_id, TAG_OFFSETS, json.dumps({str(p): o for p, o in sorted(end_offsets.items())}))
        self.client.set_tag(run_id, TAG_PS_VERSION, str(ps_version))
        self.client.set_tag(run_id, TAG_COMMITTED, "true")

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def log_json(self, run_id: str, name: str, data: Mapping[str, Any], artifact_path: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_file(self, run_id: str, path: Path, artifact_path: str) -> str:
        self.client.log_artifact(run_id, str(path), artifact_path)
        return f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"

    def register(self, run_id: str, model_name: str, source: str, tags: Mapping[str, str]) -> str:
        """A new version of ``model_name`` from ``source``, tagged and aliased ``challenger``; returns it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(model_name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        version = self.client.create_model_version(
            model_name, source=source, run_id=run_id, tags={"role": CHALLENGER, **tags}
        )
        self.client.set_registered_model_alias(model_name, CHALLENGER, version.version)
        return str(version.version)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)


def _end_offsets(run: Any) -> dict[int, int]:
    raw = json.loads(run.data.tags[TAG_OFFSETS])
    return {int(p): int(o) for p, o in raw.items()}


def carry_window(client: Any, run_id: str, reason: str) -> None:
    """Mark a committed run's window to be trained on again by the next job (idempotent).

    ``client``: an MlflowClient (the gate has one; a ``Tracking`` needs an experiment).
    """
    client.set_tag(run_id, TAG_WINDOW, WINDOW_CARRIED)
    client.set_tag(run_id, TAG_WINDOW_REASON, reason[:5000])
