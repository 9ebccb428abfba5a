"""The typed settings of the project: one model per room, composed into one ``Settings``.

Values come from environment variables with the ``RECSYS_`` prefix (``RECSYS_KAFKA_BOOTSTRAP=host:9092``);
each room's model reads the variables of its own prefix (``RECSYS_PS_*``, ``RECSYS_SERVING_*``, ...). Lists
are given as JSON (``RECSYS_PS_SHARDS='["redis://127.0.0.1:6380/0"]'``). A ``RECSYS_*`` variable that no
model knows is reported (``unknown_variables``; the CLI and ``load`` warn), so a misspelling is never
silently ignored.

Every default is written here and only here: rooms build their own config objects from their section
(``HParams.from_settings``, ``ProcessorConfig.from_settings``, ...), never with defaults of their own.

This module is a leaf of the foundation: it imports nothing of ours, so every room may use it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "RECSYS_"


def _section(prefix: str) -> SettingsConfigDict:
    # extra="forbid": a misspelled keyword argument fails; unknown *environment* variables are not
    # extras to pydantic-settings (it reads only the names it knows), so `unknown_variables` checks those.
    return SettingsConfigDict(env_prefix=ENV_PREFIX + prefix, extra="forbid", populate_by_name=True)


def _env(name: str) -> str:
    """The environment variable of a field that does not follow its section's prefix (kept for compatibility)."""
    return ENV_PREFIX + name.upper()


class KafkaSettings(BaseSettings):
    """Where the brokers are and what the topics are called (every room that reads or writes Kafka)."""

    model_config = _section("KAFKA_")

    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]")
    # deploying safely (README "Deploying safely"): SASL for every producer, consumer and the Faust worker
    security_protocol: str = Field(
        "PLAINTEXT",
        pattern=r"^(PLAINTEXT|SASL_PLAINTEXT|SASL_SSL|SSL)$",
        description="Kafka security protocol of every client (SASL_*: with the mechanism and credentials below)",
    )
    sasl_mechanism: str = Field(
        "PLAIN", pattern=r"^(PLAIN|SCRAM-SHA-256|SCRAM-SHA-512)$", description="SASL mechanism (SASL_* protocols)"
    )
    sasl_username: str | None = Field(None, min_length=1, description="SASL user (SASL_* protocols)")
    sasl_password: SecretStr | None = Field(None, description="SASL password (SASL_* protocols)")
    topic_events: str = Field("recsys.events", validation_alias=_env("topic_events"))
    topic_samples: str = Field("recsys.samples", validation_alias=_env("topic_samples"))
    topic_deadletter: str = Field("recsys.events.deadletter", validation_alias=_env("topic_deadletter"))
    topic_late: str = Field("recsys.events.late", validation_alias=_env("topic_late"))
    topic_partitions: int = Field(4, ge=1, le=1024, validation_alias=_env("topic_partitions"))

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap_has_port(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port], got {value!r}")
        return value

    @model_validator(mode="after")
    def _sasl_has_credentials(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_") and (self.sasl_username is None or self.sasl_password is None):
            raise ValueError(
                f"security protocol {self.security_protocol} needs RECSYS_KAFKA_SASL_USERNAME and "
                "RECSYS_KAFKA_SASL_PASSWORD"
            )
        return self

    def client_options(self) -> dict[str, Any]:
        """Security keyword arguments of aiokafka's producers, consumers and admin clients (none for PLAINTEXT)."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        options: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL_"):
            assert self.sasl_password is not None
            options.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password.get_secret_value(),
            )
        return options

    def all_topics(self) -> dict[str, int]:
        """Every topic of the project with its partition count."""
        return {
            name: self.topic_partitions
            for name in (self.topic_events, self.topic_samples, self.topic_deadletter, self.topic_late)
        }


class EventSettings(BaseSettings):
    """Limits of the event contract, shared by the stream worker and every producer."""

    model_config = _section("")

    max_event_bytes: int = Field(64 * 1024, ge=256, description="larger raw events are rejected as oversized")
    max_future_skew_s: float = Field(300.0, ge=0, description="events further in the future are rejected")
    max_event_age_s: float = Field(30 * 24 * 3600.0, gt=0, description="older events are rejected")


class ParamServerSettings(BaseSettings):
    """The parameter service: shards of the training copy, inference replicas, timeouts."""

    model_config = _section("PS_")

    shards: list[str] = Field(
        default_factory=lambda: ["redis://127.0.0.1:6379/0"],
        description="Redis URLs of the training copy of the parameter service, one per shard",
    )
    replicas: list[str] = Field(default_factory=list, description="Redis URLs of inference replicas, nearest first")
    namespace: str = Field(
        "ps", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="key prefix of the parameter service in its Redis servers"
    )
    rows_per_bucket: int = Field(
        24, ge=1, le=4096, description="target rows per Redis hash bucket (memory vs lookup cost)"
    )
    timeout_s: float = Field(5.0, gt=0, description="socket timeout of parameter-service requests")
    lock_ttl_s: float = Field(30.0, gt=0, description="lease of the push lock; a push outliving it aborts")
    lock_wait_s: float = Field(60.0, gt=0, description="how long a push waits for the push lock")
    log_retention_s: float = Field(300.0, ge=0, description="how long the per-version delta log is kept")
    failover_timeout_s: float = Field(0.3, gt=0, description="per-replica timeout before a reader moves on")
    failover_probe_s: float = Field(0.5, gt=0, description="how often a reader probes a failed nearer replica")
    replicator_poll_s: float = Field(0.05, gt=0, description="replicator wait for new versions per round")
    # replica faults (README "Failover"): concurrent reads never share a connection
    connections_per_server: int = Field(
        32,
        ge=1,
        le=4096,
        description="RESP connections kept open per Redis server for concurrent reads (more open while needed), "
        "and threads per server for reads spanning shards",
    )

    @field_validator("shards")
    @classmethod
    def _at_least_one_shard(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("the parameter service needs at least one shard")
        return value


class MlflowSettings(BaseSettings):
    """Where runs, checkpoints and the model registry live."""

    model_config = _section("MLFLOW_")

    tracking_uri: str = Field(
        default_factory=lambda: f"sqlite:///{PROJECT_ROOT / '.run' / 'mlflow.db'}",
        description="MLflow tracking URI (a server URL or a sqlite:/// path)",
    )
    ui_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="where people open the MLflow UI (run links in task logs); default: the tracking URI when "
        "it is a server URL, none for a sqlite:/// file",
    )
    # deploying safely (README "Deploying safely"): the server's basic-auth app and its clients
    username: str | None = Field(
        None,
        min_length=1,
        description="MLflow basic-auth user of every client (exported as MLFLOW_TRACKING_USERNAME); with a "
        "password, the local MLflow server starts with its basic-auth app and this admin user",
    )
    password: SecretStr | None = Field(
        None, min_length=12, description="password of that user (MLflow's policy: at least 12 characters)"
    )
    server_secret_key: SecretStr | None = Field(
        None,
        min_length=16,
        description="CSRF secret of the local basic-auth MLflow server (default: derived from the password)",
    )

    @model_validator(mode="after")
    def _user_and_password_together(self) -> MlflowSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("RECSYS_MLFLOW_USERNAME and RECSYS_MLFLOW_PASSWORD go together (set both or neither)")
        return self

    @property
    def authenticated(self) -> bool:
        """Whether clients authenticate (and the local server requires it)."""
        return self.password is not None

    @property
    def ui_base(self) -> str | None:
        """The MLflow UI's address links point at (None: a file store, no UI to link to)."""
        if self.ui_url:
            return self.ui_url.rstrip("/")
        return self.tracking_uri.rstrip("/") if self.tracking_uri.startswith(("http://", "https://")) else None


class FeastSettings(BaseSettings):
    """The feature store every component reads and the stream worker writes."""

    model_config = _section("FEAST_")

    repo_path: Path = Field(PROJECT_ROOT / "feature_repo", description="Feast repository folder")
    data_dir: Path = Field(
        PROJECT_ROOT / "feature_repo" / "data",
        description="Feast registry, SQLite online store and offline parquet (git-ignored)",
    )
    online_store: str = Field("sqlite", pattern=r"^(sqlite|redis)$", description="Feast online store kind")
    redis_url: str | None = Field(None, description="Redis of the Feast online store (default: RECSYS_REDIS_URL)")
    ui_port: int = Field(8888, ge=1, le=65535, description="port the printed `feast ui` command serves Feast's UI on")


class FeatureSettings(BaseSettings):
    """Which feature declaration (``feature_repo/specs/``) every room encodes with: one per deployment."""

    model_config = _section("FEATURE_")

    spec: str = Field(
        "movielens",
        min_length=1,
        description="feature declaration: a name in feature_repo/specs/ (movielens, ecommerce) or a .yaml path",
    )


class LocalSettings(BaseSettings):
    """Services the project starts itself on 127.0.0.1 (tests, demo): where their files go, their ports."""

    model_config = _section("")

    run_dir: Path = Field(PROJECT_ROOT / ".run", description="logs, PID files and data of local services")
    cache_dir: Path = Field(PROJECT_ROOT / ".cache", description="downloaded artifacts (Kafka jars, datasets)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis of the local services (tests, demo)")
    redis_port: int = Field(6379, ge=1, le=65535)
    kafka_version: str = "4.1.1"
    kafka_port: int = Field(9092, ge=1, le=65535)
    kafka_controller_port: int = Field(9093, ge=1, le=65535)
    service_start_timeout_s: float = Field(90.0, gt=0)
    # the live view of the loop (local_services.prometheus): Prometheus scraping every component's /metrics
    prometheus_port: int = Field(9090, ge=1, le=65535, description="port of the local Prometheus and its dashboard")
    prometheus_scrape_interval_s: float = Field(
        5.0, ge=1, le=300, description="how often Prometheus scrapes each component (also the dashboard's refresh)"
    )
    prometheus_retention: str = Field(
        "1d", pattern=r"^[0-9]+[smhdwy]$", description="how long the local Prometheus keeps samples"
    )
    loop_exporter_port: int = Field(
        9465,
        ge=1,
        le=65535,
        description="port of the loop exporter: consumer lag of the stream and trainers, parameter version per replica",
    )


class TrainingSettings(BaseSettings):
    """The batch trainer: ranks, model shape, optimisers, evaluation split, MLflow names."""

    model_config = _section("TRAIN_")

    ranks: int = Field(1, ge=1, le=512, description="torchrun ranks of `recsys train` (per node)")
    backend: str = Field(
        "auto", pattern=r"^(auto|gloo|nccl)$", description="torch.distributed backend; auto: nccl with CUDA, else gloo"
    )
    batch_size: int = Field(512, ge=1, le=1 << 20, description="samples per step and rank")
    epochs: int = Field(4, ge=1, le=1000, description="passes over the window's training samples")
    embedding_dim: int = Field(16, ge=1, le=4096, description="dimension of every embedding table")
    dense_arch: list[int] = Field(
        default_factory=lambda: [32, 16], description="bottom MLP layer sizes; the last equals the embedding dim"
    )
    over_arch: list[int] = Field(
        default_factory=lambda: [64, 32], description="top MLP hidden layer sizes (a final 1-unit layer is added)"
    )
    embedding_lr: float = Field(0.1, gt=0, description="row-wise Adagrad learning rate of the embeddings")
    dense_lr: float = Field(0.01, gt=0, description="Adam learning rate of the dense part")
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="newest share of the window (by event time) held out for evaluation"
    )
    init_std: float = Field(0.05, ge=0, description="std of the deterministic initial embedding rows")
    seed: int = Field(0, description="seed of dense initialisation and batch order")
    experiment: str = Field("recsys-training", min_length=1, description="MLflow experiment of training runs")
    model_name: str = Field("recsys-dlrm", min_length=1, description="registered MLflow model of the trainer")
    truth_file: Path | None = Field(
        None,
        description="JSONL of true click probabilities (simulated traffic): every job logs the oracle AUC of its "
        "evaluation set (`recsys train --truth` for one job)",
    )
    crash_after_steps: int | None = Field(
        None, ge=0, description="fault injection for tests: rank 0 kills itself (SIGKILL) after this many steps"
    )
    # inverse-propensity weighting (README "Exploration and bias"): off by default, see there why
    ips_weighting: bool = Field(
        False, description="weight each sample's loss by 1 / its logged propensity (clipped; unknown: weight 1)"
    )
    ips_max_weight: float = Field(
        10.0, ge=1, le=1e6, description="clip of the inverse-propensity weight (bounds the variance it adds)"
    )


class OnlineTrainingSettings(BaseSettings):
    """The online trainer (`recsys train online`): its consumer group, flush cadence and publishing guard.

    The model's shape and learning rates are the batch trainer's (``TrainingSettings``): one model.
    """

    model_config = _section("ONLINE_")

    group_id: str = Field(
        "recsys-online-trainer",
        pattern=r"^[A-Za-z0-9_.-]{1,128}$",
        description="Kafka consumer group of the online trainers: N processes share the partitions of the samples",
    )
    batch_size: int = Field(256, ge=1, le=1 << 16, description="samples per training step")
    flush_interval_s: float = Field(
        2.0, gt=0, le=5.0, description="how often a trainer pushes its accumulated deltas as one parameter version"
    )
    flush_max_samples: int = Field(
        0, ge=0, description="also flush after this many samples since the last flush (0: by time only)"
    )
    dense_publish_interval_s: float = Field(
        60.0, gt=0, description="how often the dense weights are written as a named artifact (slower than flushes)"
    )
    dense_dir: Path | None = Field(
        None, description="folder of the published dense artifacts (default: run_dir/online)"
    )
    journal_dir: Path | None = Field(
        None, description="folder of a per-flush journal (version, offsets, deltas), for audits and tests; None: off"
    )
    torch_threads: int = Field(
        1, ge=1, le=256, description="intra-op threads of one trainer (scale out with more trainers, not threads)"
    )
    poll_timeout_ms: int = Field(200, ge=1, le=60_000, description="longest wait of one fetch from Kafka")
    session_timeout_s: float = Field(
        10.0, ge=6, description="Kafka group session timeout: how soon a dead trainer's partitions move to the others"
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus metrics port of a trainer (0: off)")
    # the publishing guard (progressive validation): see training/online/guard.py
    guard_margin: float = Field(
        0.05, gt=0, lt=1, description="a flush whose AUC is this far below the trailing level is not published"
    )
    guard_log_loss_margin: float = Field(
        0.15, gt=0, description="... or whose log loss is this far above the trailing level"
    )
    guard_max_calibration: float = Field(
        3.0, gt=1, description="... or whose calibration (mean score / click rate) is beyond this factor either way"
    )
    guard_trailing_flushes: int = Field(
        20, ge=1, le=10_000, description="published flushes the trailing level averages over"
    )
    guard_warmup_flushes: int = Field(
        3, ge=1, le=10_000, description="published flushes needed before the guard judges (cold start)"
    )
    guard_min_samples: int = Field(
        200, ge=2, description="a flush with fewer scored samples (or one class only) is not judged on its own"
    )


class ServingSettings(BaseSettings):
    """The recommendation API: address, limits, caches, what it loads and how often it looks again."""

    model_config = _section("SERVING_")

    host: str = Field("127.0.0.1", description="address `recsys serve` binds to")
    port: int = Field(8000, ge=1, le=65535, description="port of `recsys serve`")
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes")
    admin_token: str | None = Field(
        None,
        min_length=16,
        description="bearer token of the admin endpoints (reload); unset: admin endpoints answer 403",
    )
    model_name: str = Field("recsys-dlrm", description="registered MLflow model that serving loads")
    model_alias: str = Field("champion", description="registry alias of the model serving loads")
    reload_poll_s: float = Field(
        30.0, ge=0, description="how often serving checks the alias for a new version (0: only on POST /admin/reload)"
    )
    allow_fallback_scorer: bool = Field(
        True,
        description="without a champion, rank by the dot product of "
        "user and item embeddings from the parameter service",
    )
    max_k: int = Field(100, ge=1, le=10_000, description="largest k of /v1/recommend")
    max_candidates: int = Field(1000, ge=1, le=100_000, description="most candidates of one request")
    max_pairs: int = Field(1000, ge=1, le=100_000, description="most (user, item) pairs of /v1/score")
    max_body_bytes: int = Field(256 * 1024, ge=1024, description="larger request bodies get 413")
    max_in_flight: int = Field(
        64, ge=1, le=100_000, description="ranking requests (/v1/recommend, /v1/score) in flight; beyond: 503 at once"
    )
    shed_retry_after_s: int = Field(1, ge=0, le=3600, description="Retry-After header of a shed (503) request")
    request_deadline_s: float = Field(
        2.0,
        gt=0,
        le=600,
        description="time a ranking request may take from admission; past it: 504 (well above the p99 of "
        "tens of ms, so only a hung or very slow dependency hits it)",
    )
    direct_feature_read: bool = Field(
        True,
        description="with the Redis online store, read its hashes directly (Feast's key and value encoding) "
        "instead of through the Feast SDK's get_online_features: the same values, a fraction of the CPU",
    )
    ranking_threads: int = Field(
        0,
        ge=0,
        le=1000,
        description="threads that run rankings at once (more wait, within their deadline); 0: anyio's default "
        "pool (40). Keep it above the requests a frozen replica can hold at once, or they queue behind it",
    )
    loop_lag_probe_s: float = Field(
        0.05,
        ge=0,
        le=60,
        description='period of the event-loop lag probe (recsys_serving_stage_seconds{stage="event_loop_lag"}); 0: off',
    )
    param_cache_rows: int = Field(500_000, ge=0, description="embedding rows cached per parameter version")
    param_version_poll_s: float = Field(
        1.0, gt=0, description="how often the cache checks the replica's parameter version"
    )
    online_dense: bool = Field(
        True,
        description="serve the online trainers' dense weights (the replica's online.dense rows) once any trainer "
        "wrote them, instead of the champion's dense part",
    )
    online_dense_refresh_s: float = Field(
        5.0,
        gt=0,
        description="how often serving re-reads the online dense weights (the rows follow every parameter version)",
    )
    item_feature_ttl_s: float = Field(
        30.0,
        ge=0,
        description="how long item features read from Feast are reused (0: read every candidate on every request)",
    )
    impression_buffer: int = Field(
        10_000, ge=1, description="impressions buffered for Kafka; beyond it they are dropped and counted"
    )
    retrieval_candidates: int = Field(
        200, ge=1, le=100_000, description="candidates the retrieval stage supplies when a request has none"
    )
    retrieval_half_life_s: float = Field(3600.0, gt=0, description="half-life of item popularity")
    retrieval_lookback: int = Field(
        50_000, ge=0, description="records per partition of the events topic the retrieval stage reads back at start-up"
    )
    reload_urls: list[str] = Field(
        default_factory=list,
        description="base URLs of serving replicas told "
        "to reload after a promotion; empty: http://host:port of these settings",
    )
    # exploration (README "Exploration and bias"): the share of requests served by the uniformly random policy
    explore_share: float = Field(
        0.1,
        ge=0,
        le=1,
        description="share of /v1/recommend requests whose list is a uniformly random ordered sample of the "
        "candidates (epsilon-greedy; decided per request id); 0: always the greedy top k",
    )
    # slow clients (README "Serving", API): how long one connection may take to send a request; past it the
    # request is cut off, so a slow-loris client cannot hold a connection (or a ranking slot) for ever
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="time a client has to send a request's line and headers, from its first byte (or the "
        "connection's start); past it: 408 and the connection closed",
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="time a client has to send a request's whole body once its headers are in; "
        "past it: 408 and the connection closed",
    )
    keep_alive_s: float = Field(
        5.0, gt=0, le=600, description="an idle keep-alive connection is closed after this long (uvicorn)"
    )


class AirflowSettings(BaseSettings):
    """The local Airflow of `recsys airflow up` and the schedules of the DAGs."""

    model_config = _section("AIRFLOW_")

    port: int = Field(8080, ge=1, le=65535, description="port of the local Airflow api-server (UI) on 127.0.0.1")
    db_url: str | None = Field(
        None, description="Airflow metadata DB (SQLAlchemy URL, e.g. PostgreSQL); unset: SQLite under <run_dir>/airflow"
    )
    executor: str = Field(
        "LocalExecutor",
        pattern=r"^(LocalExecutor|SequentialExecutor|CeleryExecutor|"
        r"KubernetesExecutor)$",
        description="Airflow executor of `recsys airflow up`",
    )
    parallelism: int = Field(4, ge=1, le=1024, description="task instances running at once")
    start_timeout_s: float = Field(180.0, gt=0, description="how long `recsys airflow up` waits for health")
    training_schedule: str | None = Field(
        "@hourly", description="schedule of the training DAG (cron or preset; empty: manual only)"
    )
    features_schedule: str | None = Field("@hourly", description="schedule of the features DAG")
    dag_owner: str = Field(
        "recsys", min_length=1, description="owner shown on the DAGs in the Airflow UI (the team that runs them)"
    )


class GateSettings(BaseSettings):
    """The model lifecycle: when a challenger is promoted, when a run is skipped, how long publication waits."""

    model_config = _section("GATE_")

    tolerance: float = Field(
        0.002,
        ge=0,
        le=1,
        description="a challenger is promoted unless its AUC is "
        "worse than the champion's by more than this, on the same evaluation set",
    )
    # a window worth a run is one whose evaluation share can be judged: at a click rate of 10% and the default
    # eval_fraction (0.1), 2,000 samples put ~20 clicks and ~180 non-clicks in it (min_eval_positives/_negatives)
    min_new_samples: int = Field(
        2000, ge=1, description="training runs skip when fewer new samples arrived (enough for an evaluable window)"
    )
    # an AUC of a handful of clicks swings by more than the tolerance from one sample: below these
    # counts the evaluation set is "not evaluable" and the gate refuses the challenger, saying so
    min_eval_positives: int = Field(
        20, ge=1, description="fewest clicks in a job's evaluation set for its AUC to be compared"
    )
    min_eval_negatives: int = Field(
        20, ge=1, description="fewest non-clicked impressions in a job's evaluation set for its AUC to be compared"
    )
    max_carried_runs: int = Field(
        3,
        ge=0,
        description="consecutive refused or not evaluable runs whose windows the next job trains on again; "
        "past that the window is consumed anyway (bounds the window's growth)",
    )
    rollback_depth: int = Field(
        3,
        ge=0,
        description="promotions a rollback can undo, newest first: the rows each replaced are kept that long "
        "(a staging area per promotion, the size of the rows it promoted)",
    )
    publish_timeout_s: float = Field(
        300.0,
        gt=0,
        validation_alias=_env("publish_timeout_s"),
        description="how long publication waits for every inference replica to apply the pushed parameter version",
    )


class StreamSettings(BaseSettings):
    """The Faust stream worker: windows, batches, Kafka consumer options, its metrics and logs."""

    model_config = _section("STREAM_")

    app_id: str = Field(
        "recsys-stream",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Faust app id: consumer group and prefix of its changelog topics",
    )
    data_dir: Path | None = Field(None, description="Faust table data of the worker (default: run_dir/stream)")
    # Importing Feast (and the torch it imports) is most of a restart on this machine (~7-12 s quiet); the
    # join, the samples and the tables need none of it, only the feature writes do, and those wait for it
    feature_store_open: str = Field(
        "background",
        pattern=r"^(background|before_start)$",
        description="`recsys stream worker`: open the Feast store in a thread while the worker joins its group and "
        "processes (background: a restart processes again without waiting for Feast's import; feature writes wait) "
        "or before the worker starts (before_start)",
    )
    attribution_window_s: float = Field(600.0, gt=0, description="event time an impression waits for its click")
    early_click_wait_s: float = Field(
        120.0,
        ge=0,
        description="event time a click that came before its impression (another device or partition uploaded "
        "first) is held for it; clicks whose impression never comes within it go to the late topic",
    )
    dedup_window_s: float = Field(
        3600.0, gt=0, description="event time an event id is remembered for de-duplicating client retries"
    )
    resolved_retention_s: float = Field(
        60.0,
        gt=0,
        description="wall time a resolved impression's status is "
        "kept, to tell late clicks and impression retries apart",
    )
    # A restart restores every table by reading its changelog from the start; Kafka's cleaner compacts only
    # closed segments, so with the broker's defaults (7 days, 1 GiB) a restart replays the whole history.
    changelog_compaction: bool = Field(
        True,
        description="set the segment and cleaner options below on the tables' changelog topics (also on existing "
        "ones at start-up), so compaction keeps up and a restart reads live state only; off: the broker's defaults",
    )
    changelog_segment_ms: int = Field(
        60_000, ge=1000, description="changelog topics' segment.ms: a segment older than this is closed (compactable)"
    )
    changelog_segment_bytes: int = Field(
        8 * 1024**2,
        ge=1024**2,
        description="changelog topics' segment.bytes: a segment this large is closed (compactable)",
    )
    changelog_min_cleanable_dirty_ratio: float = Field(
        0.1,
        gt=0,
        le=1,
        description="changelog topics' min.cleanable.dirty.ratio: share of superseded records that starts the cleaner",
    )
    changelog_delete_retention_ms: int = Field(
        60_000,
        ge=0,
        description="changelog topics' delete.retention.ms: how long a tombstone outlives compaction (a restart "
        "reading longer than this may restore an entry deleted meanwhile; the worker drops those it must not keep)",
    )
    idle_advance_s: float = Field(
        5.0,
        gt=0,
        description="a partition idle this long (wall time) advances its "
        "event-time watermark with the wall clock, so windows close on a quiet stream",
    )
    batch_size: int = Field(
        2000, ge=1, le=100_000, description="most records the worker handles per batch (one fetch from Kafka)"
    )
    max_in_flight_batches: int = Field(
        4,
        ge=1,
        le=64,
        description="batches the worker processes ahead while Kafka acknowledges the outputs of earlier ones",
    )
    fetch_max_wait_ms: int = Field(
        100,
        ge=1,
        le=10_000,
        description="longest a fetch waits on the broker for new records (one fetch per broker is in flight at a time)",
    )
    commit_interval_s: float = Field(1.0, gt=0, description="how often the worker commits offsets")
    session_timeout_s: float = Field(
        30.0,
        ge=6,
        description="Kafka group session timeout of a worker: how "
        "soon the partitions of a dead worker move to the others",
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus metrics port of the worker (0: off)")
    log_level: str = Field("info", pattern=r"^(debug|info|warning|error)$")
    status_wait_timeout_s: float = Field(
        300.0, gt=0, description="`recsys stream status --wait`: longest wait for the stream to drain"
    )
    status_poll_s: float = Field(1.0, gt=0, description="`recsys stream status --wait`: how often lag is read")
    # the worker's log (core.logs): one error logged over and over (a broker restart) is written once per window
    log_repeat_s: float = Field(
        10.0,
        ge=0,
        description="a repeated warning or error is logged once per this many seconds, with its count (0: all)",
    )
    # served CTR per model version (recsys_served_*_total): the label's cardinality is bounded here
    served_metrics_max_versions: int = Field(
        32,
        ge=1,
        le=10_000,
        description="distinct model_version labels of the served-CTR counters; later versions count as 'other'",
    )


class SimulatorSettings(BaseSettings):
    """The closed-loop simulator (`recsys simulate --closed-loop`): how its users call serving."""

    model_config = _section("SIM_")

    serving_url: str | None = Field(
        None, description="base URL of the serving API the simulated users call (default: http://host:port of serving)"
    )
    rate: float = Field(20.0, gt=0, le=100_000, description="target recommendation requests per second")
    concurrency: int = Field(8, ge=1, le=1024, description="requests in flight at most")
    candidates_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of requests that send their own candidates; the others let serving's retrieval pick",
    )
    candidates: int = Field(
        100, ge=1, le=100_000, description="candidate items drawn from the world for a request that sends them"
    )
    request_timeout_s: float = Field(5.0, gt=0, le=600, description="client-side timeout of one request")
    max_retry_after_s: float = Field(
        10.0, ge=0, le=3600, description="longest pause honoured for a shed request's Retry-After"
    )
    bucket_s: float = Field(10.0, gt=0, description="width of the time buckets of the online-metrics series")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus metrics port of the closed-loop simulator (0: off)"
    )


SECTIONS: dict[str, type[BaseSettings]] = {
    "kafka": KafkaSettings,
    "events": EventSettings,
    "ps": ParamServerSettings,
    "mlflow": MlflowSettings,
    "feast": FeastSettings,
    "features": FeatureSettings,
    "local": LocalSettings,
    "train": TrainingSettings,
    "serving": ServingSettings,
    "airflow": AirflowSettings,
    "gate": GateSettings,
    "stream": StreamSettings,
    "sim": SimulatorSettings,
    "online": OnlineTrainingSettings,
}

SectionT = TypeVar("SectionT", bound=BaseSettings)


class Settings(BaseModel):
    """Every room's settings, composed. Pass it (or the one section a function needs) in explicitly."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    events: EventSettings = Field(default_factory=EventSettings)
    ps: ParamServerSettings = Field(default_factory=ParamServerSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    feast: FeastSettings = Field(default_factory=FeastSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)
    train: TrainingSettings = Field(default_factory=TrainingSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    airflow: AirflowSettings = Field(default_factory=AirflowSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    sim: SimulatorSettings = Field(default_factory=SimulatorSettings)
    online: OnlineTrainingSettings = Field(default_factory=OnlineTrainingSettings)

    def override(self, **sections: Mapping[str, Any]) -> Settings:
        """A copy with some fields of some sections replaced, validated like the environment's values:
        ``s.override(serving={"port": 8001}, ps={"shards": [url]})``."""
        update = {}
        for name, values in sections.items():
            if name not in SECTIONS:
                raise ValueError(f"no settings section {name!r}; known: {', '.join(SECTIONS)}")
            current = getattr(self, name)
            update[name] = type(current)(**{**current.model_dump(), **values})
        return self.model_copy(update=update)

    @property
    def feast_redis_url(self) -> str:
        """Redis of the Feast online store: RECSYS_FEAST_REDIS_URL, else the local services' Redis."""
        return self.feast.redis_url or self.local.redis_url

    @property
    def sim_serving_url(self) -> str:
        """Serving as the closed-loop simulator calls it: RECSYS_SIM_SERVING_URL, else serving's own host and port."""
        return self.sim.serving_url or f"http://{self.serving.host}:{self.serving.port}"

    @property
    def stream_data_dir(self) -> Path:
        """Faust table data of the worker: RECSYS_STREAM_DATA_DIR, else <run_dir>/stream."""
        return self.stream.data_dir or self.local.run_dir / "stream"


def environment_names() -> set[str]:
    """Every environment variable some section reads."""
    names: set[str] = set()
    for section in SECTIONS.values():
        names.update(env_name(section, field_name) for field_name in section.model_fields)
    return names


def env_name(section: type[BaseSettings], field_name: str) -> str:
    """The environment variable that sets ``field_name`` of ``section``."""
    alias = section.model_fields[field_name].validation_alias
    return (
        alias.upper() if isinstance(alias, str) else (section.model_config.get("env_prefix", "") + field_name).upper()
    )


def describe_error(exc: ValidationError) -> str:
    """A settings validation error in the user's terms: the environment variable, the problem, the value."""
    section = next((cls for cls in SECTIONS.values() if cls.__name__ == exc.title), None)
    lines = []
    for error in exc.errors():
        field_name = str(error["loc"][0]) if error["loc"] else ""
        where = env_name(section, field_name) if section and field_name in section.model_fields else field_name
        if not field_name:  # a check across fields: its input is every field, secrets included
            lines.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        secret = "password" in field_name or "secret" in field_name
        lines.append(f"{where}: {error['msg']} (got {'***' if secret else repr(error.get('input'))})")
    return "; ".join(lines)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """``RECSYS_*`` variables of the environment that no settings section reads (misspellings)."""
    known = environment_names()
    env = os.environ if environ is None else environ
    return sorted(name for name in env if name.upper().startswith(ENV_PREFIX) and name.upper() not in known)


class UnknownSettingWarning(UserWarning):
    """A RECSYS_* environment variable that no settings section reads."""


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of the environment; warns (UnknownSettingWarning) about RECSYS_* variables nobody reads."""
    for name in unknown_variables(environ):
        warnings.warn(
            f"{name} is set but no setting reads it (misspelt?); it is ignored", UnknownSettingWarning, stacklevel=2
        )
    return Settings()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment (entry points only; pass them on)."""
    return load()
