"""Shared fixtures: real Kafka and Redis started once per test session on free ports.

They live in a temporary run directory, so a running demo (`recsys services up`) and
the tests never collide. Every started process is stopped when the session ends.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.settings import PROJECT_ROOT, Settings
from local_services import kafka as local_kafka
from local_services import services


@dataclass(frozen=True)
class RedisServer:
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture(scope="session")
def services_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def kafka_bootstrap(services_run_dir: Path) -> Iterator[str]:
    """A real single-node Kafka (KRaft) on 127.0.0.1, for the whole test session."""
    defaults = Settings()
    port, controller_port = services.free_port(), services.free_port()
    local_kafka.start_kafka(
        services_run_dir,
        defaults.local.cache_dir,
        defaults.local.kafka_version,
        port,
        controller_port,
        name="kafka-test",
        timeout=120,
    )
    yield f"127.0.0.1:{port}"
    services.stop(services_run_dir, "kafka-test")


@pytest.fixture(scope="session")
def redis_factory(services_run_dir: Path) -> Iterator[Callable[[str], RedisServer]]:
    """Start named Redis servers on free ports (shards, replicas); all stop at session end.

    Asking twice for the same name returns the running server.
    """
    started: dict[str, RedisServer] = {}

    def start(name: str) -> RedisServer:
        if name not in started or not services.redis_ping(started[name].port):
            port = services.free_port()
            services.start_redis(services_run_dir, port, name=f"redis-test-{name}")
            started[name] = RedisServer(name, port)
        return started[name]

    yield start
    for name in started:
        services.stop(services_run_dir, f"redis-test-{name}")


@pytest.fixture(scope="session")
def redis_server(redis_factory: Callable[[str], RedisServer]) -> RedisServer:
    """The default Redis of the test session."""
    return redis_factory("default")


@pytest.fixture
def unique_topic() -> str:
    """A fresh topic name, so tests sharing the session broker do not see each other's records."""
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def test_settings(kafka_bootstrap: str, redis_server: RedisServer, tmp_path: Path) -> Settings:
    """Settings pointing at the session's services, with topics private to this test."""
    tag = uuid.uuid4().hex[:8]
    return Settings().override(
        kafka={
            "bootstrap": kafka_bootstrap,
            "topic_events": f"events.{tag}",
            "topic_samples": f"samples.{tag}",
            "topic_deadletter": f"deadletter.{tag}",
            "topic_late": f"late.{tag}",
        },
        local={"redis_url": redis_server.url, "run_dir": tmp_path / "run", "cache_dir": PROJECT_ROOT / ".cache"},
        ps={"shards": [redis_server.url]},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )
