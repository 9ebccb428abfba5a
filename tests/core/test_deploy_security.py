"""Deploying safely, the pure parts: URL redaction, secrets in settings errors, Kafka security options
reaching aiokafka's and Faust's constructors, MLflow credentials exported for MLflow's clients, Feast's
connection string."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from core.kafka import connect_options
from core.mlflow_auth import PASSWORD_ENV, USERNAME_ENV, tracking_uri
from core.redact import redact_url, redact_urls
from core.settings import KafkaSettings, MlflowSettings, describe_error


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://ps-user:s3cret@h:6379/2", "redis://ps-user:***@h:6379/2"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://ps-user@h:6379/0", "redis://ps-user@h:6379/0"),
        ("redis://:a@h:1/0,redis://u:b@g:2/0", "redis://:***@h:1/0,redis://u:***@g:2/0"),
        ("http://admin:pw@mlflow:5000", "http://admin:***@mlflow:5000"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert redact_urls([url]) == [shown]


def test_a_password_with_an_at_sign_is_hidden_whole() -> None:
    shown = redact_url("redis://u:p@ss@h:6379/0")
    assert "p@ss" not in shown and shown.endswith("@h:6379/0")


def test_settings_errors_never_echo_a_password() -> None:
    with pytest.raises(ValidationError) as bad_field:
        MlflowSettings(username="admin", password="short-pass")  # under MLflow's 12 characters
    assert "short-pass" not in describe_error(bad_field.value)
    with pytest.raises(ValidationError) as half:
        KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_password="kafka-secret-value")
    message = describe_error(half.value)
    assert "kafka-secret-value" not in message and "RECSYS_KAFKA_SASL_USERNAME" in message


def test_mlflow_user_and_password_go_together() -> None:
    with pytest.raises(ValidationError, match="go together"):
        MlflowSettings(username="admin")


def test_plaintext_kafka_adds_no_options() -> None:
    assert connect_options(KafkaSettings(bootstrap="k:9092")) == {"bootstrap_servers": "k:9092"}
    assert connect_options("k:9092") == {"bootstrap_servers": "k:9092"}


def test_sasl_settings_reach_the_aiokafka_clients() -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    kafka = KafkaSettings(
        bootstrap="k:9092",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="recsys",
        sasl_password="kafka-secret-value",
    )

    async def build() -> list:
        producer = AIOKafkaProducer(**connect_options(kafka))
        consumer = AIOKafkaConsumer(**connect_options(kafka))
        clients = [producer.client, consumer._client]
        await producer.stop()
        await consumer.stop()
        return clients

    for client in asyncio.run(build()):
        assert client._security_protocol == "SASL_PLAINTEXT"
        assert client._sasl_mechanism == "SCRAM-SHA-512"
        assert (client._sasl_plain_username, client._sasl_plain_password) == ("recsys", "kafka-secret-value")
    assert "kafka-secret-value" not in repr(kafka)


def test_sasl_settings_reach_faust() -> None:
    from streaming.factory import broker_credentials

    assert broker_credentials(KafkaSettings()) is None
    creds = broker_credentials(
        KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_username="recsys", sasl_password="kafka-secret-value")
    )
    assert creds is not None
    assert (creds.username, creds.password, creds.mechanism.value) == ("recsys", "kafka-secret-value", "PLAIN")
    assert creds.protocol.value == "SASL_PLAINTEXT"


def test_mlflow_credentials_are_exported_for_mlflows_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (USERNAME_ENV, PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
    assert tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert tracking_uri(MlflowSettings(tracking_uri="http://m:5000")) == "http://m:5000"
    import os

    assert USERNAME_ENV not in os.environ
    settings = MlflowSettings(tracking_uri="http://m:5000", username="ops", password="a-long-password-1")
    assert tracking_uri(settings) == "http://m:5000"
    assert (os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV]) == ("ops", "a-long-password-1")


def test_feast_connection_string_carries_the_credentials() -> None:
    from feature_repo.store import redis_connection_string

    assert redis_connection_string("redis://h:6379/1") == "h:6379,db=1"
    assert redis_connection_string("redis://:pw@h:6379/0") == "h:6379,db=0,password=pw"
    assert redis_connection_string("redis://feast:pw@h:6379/0") == "h:6379,db=0,username=feast,password=pw"
    with pytest.raises(ValueError, match="comma"):
        redis_connection_string("redis://:a%2Cb@h:6379/0")
