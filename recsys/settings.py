"""The one typed settings object of the project.

Every component reads its configuration from here; values come from environment
variables with the ``RECSYS_`` prefix (``RECSYS_KAFKA_BOOTSTRAP=host:9092``). Lists
are given as JSON (``RECSYS_PS_SHARDS='["redis://127.0.0.1:6380/0"]'``).

This module is a leaf: it imports nothing of ours, so every room may use it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore")

    # --- Kafka -------------------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]")
    topic_events: str = "recsys.events"
    topic_samples: str = "recsys.samples"
    topic_deadletter: str = "recsys.events.deadletter"
    topic_late: str = "recsys.events.late"
    topic_partitions: int = Field(4, ge=1, le=1024)

    # --- Redis / parameter service --------------------------------------------------
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis of the local services (tests, demo)")
    ps_shards: list[str] = Field(
        default_factory=lambda: ["redis://127.0.0.1:6379/0"],
        description="Redis URLs of the training copy of the parameter service, one per shard",
    )
    ps_replicas: list[str] = Field(
        default_factory=list,
        description="Redis URLs of inference replicas, nearest first",
    )
    ps_namespace: str = Field("ps", pattern=r"^[A-Za-z0-9_.-]{1,32}$",
                              description="key prefix of the parameter service in its Redis servers")
    ps_rows_per_bucket: int = Field(24, ge=1, le=4096,
                                    description="target rows per Redis hash bucket (memory vs lookup cost)")
    ps_timeout_s: float = Field(5.0, gt=0, description="socket timeout of parameter-service requests")
    ps_lock_ttl_s: float = Field(30.0, gt=0, description="lease of the push lock; a push outliving it aborts")
    ps_lock_wait_s: float = Field(60.0, gt=0, description="how long a push waits for the push lock")
    ps_log_retention_s: float = Field(300.0, ge=0, description="how long the per-version delta log is kept")
    ps_failover_timeout_s: float = Field(0.3, gt=0, description="per-replica timeout before a reader moves on")
    ps_failover_probe_s: float = Field(0.5, gt=0, description="how often a reader probes a failed nearer replica")
    ps_replicator_poll_s: float = Field(0.05, gt=0, description="replicator wait for new versions per round")

    # --- MLflow / Feast -----------------------------------------------------------------
    mlflow_tracking_uri: str = Field(
        default_factory=lambda: f"sqlite:///{PROJECT_ROOT / '.run' / 'mlflow.db'}",
        description="MLflow tracking URI (a server URL or a sqlite:/// path)",
    )
    feast_repo_path: Path = Field(PROJECT_ROOT / "feature_repo", description="Feast repository folder")

    # --- local services ---------------------------------------------------------------------
    run_dir: Path = Field(PROJECT_ROOT / ".run", description="logs, PID files and data of local services")
    cache_dir: Path = Field(PROJECT_ROOT / ".cache", description="downloaded artifacts (Kafka jars, datasets)")
    kafka_version: str = "4.1.1"
    kafka_port: int = Field(9092, ge=1, le=65535)
    kafka_controller_port: int = Field(9093, ge=1, le=65535)
    redis_port: int = Field(6379, ge=1, le=65535)
    service_start_timeout_s: float = Field(90.0, gt=0)

    # --- event validation -----------------------------------------------------------------
    max_event_bytes: int = Field(64 * 1024, ge=256, description="larger raw events are rejected as oversized")
    max_future_skew_s: float = Field(300.0, ge=0, description="events further in the future are rejected")
    max_event_age_s: float = Field(30 * 24 * 3600.0, gt=0, description="older events are rejected")

    # --- training (issue #5) -------------------------------------------------------------------
    train_ranks: int = Field(1, ge=1, le=512, description="torchrun ranks of `recsys train` (per node)")
    train_backend: str = Field("auto", pattern=r"^(auto|gloo|nccl)$",
                               description="torch.distributed backend; auto: nccl with CUDA, else gloo")
    train_batch_size: int = Field(512, ge=1, le=1 << 20, description="samples per step and rank")
    train_epochs: int = Field(4, ge=1, le=1000, description="passes over the window's training samples")
    train_embedding_dim: int = Field(16, ge=1, le=4096, description="dimension of every embedding table")
    train_dense_arch: list[int] = Field(default_factory=lambda: [32, 16],
                                        description="bottom MLP layer sizes; the last equals the embedding dim")
    train_over_arch: list[int] = Field(default_factory=lambda: [64, 32],
                                       description="top MLP hidden layer sizes (a final 1-unit layer is added)")
    train_embedding_lr: float = Field(0.1, gt=0, description="row-wise Adagrad learning rate of the embeddings")
    train_dense_lr: float = Field(0.01, gt=0, description="Adam learning rate of the dense part")
    train_eval_fraction: float = Field(0.1, gt=0, lt=1, description="newest share of the window (by event time) "
                                       "held out for evaluation")
    train_init_std: float = Field(0.05, ge=0, description="std of the deterministic initial embedding rows")
    train_seed: int = Field(0, description="seed of dense initialisation and batch order")
    train_experiment: str = Field("recsys-training", min_length=1, description="MLflow experiment of training runs")
    train_model_name: str = Field("recsys-dlrm", min_length=1, description="registered MLflow model of the trainer")
    train_crash_after_steps: int | None = Field(None, ge=0, description="fault injection for tests: rank 0 kills "
                                                "itself (SIGKILL) after this many steps")

    # --- serving (issue #7) -------------------------------------------------------------------
    serving_host: str = Field("127.0.0.1", description="address `recsys serve` binds to")
    serving_port: int = Field(8000, ge=1, le=65535, description="port of `recsys serve`")
    serving_workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes")
    serving_admin_token: str | None = Field(None, min_length=16, description="bearer token of the admin endpoints "
                                            "(reload); unset: admin endpoints answer 403")
    serving_model_name: str = Field("recsys-dlrm", description="registered MLflow model that serving loads")
    serving_model_alias: str = Field("champion", description="registry alias of the model serving loads")
    serving_reload_poll_s: float = Field(30.0, ge=0, description="how often serving checks the alias for a new "
                                         "version (0: only on POST /admin/reload)")
    serving_allow_fallback_scorer: bool = Field(True, description="without a champion, rank by the dot product of "
                                                "user and item embeddings from the parameter service")
    serving_max_k: int = Field(100, ge=1, le=10_000, description="largest k of /v1/recommend")
    serving_max_candidates: int = Field(1000, ge=1, le=100_000, description="most candidates of one request")
    serving_max_pairs: int = Field(1000, ge=1, le=100_000, description="most (user, item) pairs of /v1/score")
    serving_max_body_bytes: int = Field(256 * 1024, ge=1024, description="larger request bodies get 413")
    serving_param_cache_rows: int = Field(500_000, ge=0, description="embedding rows cached per parameter version")
    serving_param_version_poll_s: float = Field(1.0, gt=0, description="how often the cache checks the "
                                                "replica's parameter version")
    serving_item_feature_ttl_s: float = Field(30.0, ge=0, description="how long item features read from Feast "
                                              "are reused (0: read every candidate on every request)")
    serving_impression_buffer: int = Field(10_000, ge=1, description="impressions buffered for Kafka; beyond it "
                                           "they are dropped and counted")
    serving_retrieval_candidates: int = Field(200, ge=1, le=100_000, description="candidates the retrieval stage "
                                              "supplies when a request has none")
    serving_retrieval_half_life_s: float = Field(3600.0, gt=0, description="half-life of item popularity")
    serving_retrieval_lookback: int = Field(50_000, ge=0, description="records per partition of the events topic "
                                            "the retrieval stage reads back at start-up")

    # --- orchestration (issue #6) -------------------------------------------------------------
    airflow_port: int = Field(8080, ge=1, le=65535, description="port of the local Airflow api-server (UI) "
                              "on 127.0.0.1")
    airflow_db_url: str | None = Field(None, description="Airflow metadata DB (SQLAlchemy URL, e.g. PostgreSQL); "
                                       "unset: SQLite under <run_dir>/airflow")
    airflow_executor: str = Field("LocalExecutor", pattern=r"^(LocalExecutor|SequentialExecutor|CeleryExecutor|"
                                  r"KubernetesExecutor)$", description="Airflow executor of `recsys airflow up`")
    airflow_parallelism: int = Field(4, ge=1, le=1024, description="task instances running at once")
    airflow_start_timeout_s: float = Field(180.0, gt=0, description="how long `recsys airflow up` waits for health")
    airflow_training_schedule: str | None = Field("@hourly", description="schedule of the training DAG (cron or "
                                                  "preset; empty: manual only)")
    airflow_features_schedule: str | None = Field("@hourly", description="schedule of the features DAG")
    gate_tolerance: float = Field(0.002, ge=0, le=1, description="a challenger is promoted unless its AUC is "
                                  "worse than the champion's by more than this, on the same evaluation set")
    gate_min_new_samples: int = Field(1, ge=1, description="training runs skip when fewer new samples arrived")
    publish_timeout_s: float = Field(300.0, gt=0, description="how long publication waits for every inference "
                                     "replica to apply the pushed parameter version")
    serving_reload_urls: list[str] = Field(default_factory=list, description="base URLs of serving replicas told "
                                           "to reload after a promotion; empty: http://serving_host:serving_port")

    # --- streaming and feature store (issue #3) ----------------------------------------------
    stream_app_id: str = Field("recsys-stream", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                               description="Faust app id: consumer group and prefix of its changelog topics")
    stream_data_dir: Path | None = Field(None, description="Faust table data of the worker (default: run_dir/stream)")
    stream_attribution_window_s: float = Field(600.0, gt=0, description="event time an impression waits for its click")
    stream_dedup_window_s: float = Field(3600.0, gt=0, description="event time an event id is remembered for "
                                         "de-duplicating client retries")
    stream_resolved_retention_s: float = Field(60.0, gt=0, description="wall time a resolved impression's status is "
                                               "kept, to tell late clicks and impression retries apart")
    stream_idle_advance_s: float = Field(5.0, gt=0, description="a partition idle this long (wall time) advances its "
                                         "event-time watermark with the wall clock, so windows close on a quiet stream")
    stream_batch_size: int = Field(2000, ge=1, le=100_000, description="most records the worker handles per batch "
                                   "(one fetch from Kafka)")
    stream_max_in_flight_batches: int = Field(4, ge=1, le=64, description="batches the worker processes ahead "
                                              "while Kafka acknowledges the outputs of earlier ones")
    stream_fetch_max_wait_ms: int = Field(100, ge=1, le=10_000, description="longest a fetch waits on the broker "
                                          "for new records (one fetch per broker is in flight at a time)")
    stream_commit_interval_s: float = Field(1.0, gt=0, description="how often the worker commits offsets")
    stream_session_timeout_s: float = Field(30.0, ge=6, description="Kafka group session timeout of a worker: how "
                                            "soon the partitions of a dead worker move to the others")
    stream_metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus metrics port of the worker (0: off)")
    stream_log_level: str = Field("info", pattern=r"^(debug|info|warning|error)$")
    feast_data_dir: Path = Field(PROJECT_ROOT / "feature_repo" / "data",
                                description="Feast registry, SQLite online store and offline parquet (git-ignored)")
    feast_online_store: str = Field("sqlite", pattern=r"^(sqlite|redis)$", description="Feast online store kind")
    feast_redis_url: str | None = Field(None, description="Redis of the Feast online store (default: redis_url)")

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_port(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port], got {value!r}")
        return value

    @field_validator("ps_shards")
    @classmethod
    def _at_least_one_shard(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("the parameter service needs at least one shard")
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
