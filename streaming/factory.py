"""The Faust app of the stream worker, made from settings: raw ``recsys.events`` in; samples, dead letters,
late clicks and Feast rows out.

``create_app(settings)`` wires the pieces: the events topic read in whole fetches by
``faust_overrides.BatchConsumer`` into ``worker.StreamWorker`` (which runs ``processor.Processor``
over the batch and sends its outputs), the four tables of ``tables``, a timer that closes the
windows of idle partitions, and the rebalance signals. Workers with the same RECSYS_STREAM_APP_ID
form one consumer group (the README says what is verified about running several).
"""

from __future__ import annotations

import ssl
from typing import Any

import faust.auth
from faust.types import TP

from core.settings import KafkaSettings, Settings
from streaming.faust_overrides import StreamApp, install_batch_consumer
from streaming.tables import changelog_configs, declare_tables
from streaming.worker import StreamWorker


def broker_credentials(kafka: KafkaSettings) -> faust.auth.Credentials | None:
    """Faust's credentials for the settings' security protocol (None: plaintext)."""
    if kafka.security_protocol == "PLAINTEXT":
        return None
    ssl_context = ssl.create_default_context() if kafka.security_protocol.endswith("SSL") else None
    if kafka.security_protocol == "SSL":
        return faust.auth.SSLCredentials(ssl_context)
    assert kafka.sasl_password is not None
    return faust.auth.SASLCredentials(
        username=kafka.sasl_username,
        password=kafka.sasl_password.get_secret_value(),
        mechanism=kafka.sasl_mechanism,
        ssl_context=ssl_context,
    )


def create_app(settings: Settings) -> tuple[StreamApp, StreamWorker]:
    """The app and the worker it feeds (the worker's table data folder is created here)."""
    s = settings
    brokers = ";".join(f"kafka://{server.strip()}" for server in s.kafka.bootstrap.split(","))
    folder = s.stream_data_dir
    folder.mkdir(parents=True, exist_ok=True)
    app = StreamApp(
        s.stream.app_id,
        broker=brokers,
        broker_credentials=broker_credentials(s.kafka),
        store="memory://",
        datadir=str(folder),
        processing_guarantee="at_least_once",
        topic_partitions=s.kafka.topic_partitions,
        topic_replication_factor=1,
        table_standby_replicas=0,
        broker_commit_interval=s.stream.commit_interval_s,
        broker_session_timeout=s.stream.session_timeout_s,
        broker_heartbeat_interval=min(3.0, s.stream.session_timeout_s / 3),
        broker_max_poll_records=s.stream.batch_size,
        stream_buffer_maxsize=max(4096, 2 * s.stream.batch_size),
        consumer_max_fetch_size=8 * 1024**2,
        consumer_auto_offset_reset="earliest",
        producer_linger=0.005,
        producer_max_batch_size=256 * 1024,
        stream_wait_empty=False,
        web_enabled=False,
        worker_redirect_stdouts=False,
        autodiscover=False,
        key_serializer="raw",
        value_serializer="raw",
    )
    app.kafka_brokers = s.kafka
    app.changelog_configs = changelog_configs(s.stream)
    events = app.topic(
        s.kafka.topic_events, key_serializer="raw", value_serializer="raw", partitions=s.kafka.topic_partitions
    )
    worker = StreamWorker(app, s, declare_tables(app, s.kafka.topic_partitions))

    # subscribed, with acknowledgements, but read by BatchConsumer rather than through an agent's stream
    app.topics.add(events)
    install_batch_consumer(
        app,
        batch_topics=frozenset({s.kafka.topic_events}),
        on_batch=worker.handle_batch,
        max_in_flight=s.stream.max_in_flight_batches,
        fetch_max_wait_ms=s.stream.fetch_max_wait_ms,
    )

    @app.timer(interval=max(0.2, min(1.0, s.stream.idle_advance_s / 2)))
    async def idle_windows() -> None:
        await worker.tick()

    # (mode types signal receivers with mypy_extensions arguments that no function satisfies under mypy: ignored)
    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        worker.ready = False
        worker.processor.release_partitions(tp.partition for tp in revoked if tp.topic == s.kafka.topic_events)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: Any, assigned: set[TP], **kwargs: Any) -> None:
        worker.ready = False

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]
    async def on_rebalance_complete(sender: Any, **kwargs: Any) -> None:
        worker.ready = True

    @app.task
    async def open_feature_store() -> None:
        worker.features.start()

    return app, worker
