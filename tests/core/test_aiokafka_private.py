"""Breaks when aiokafka changes under core/aiokafka_private.py (its one private call)."""

from __future__ import annotations

import inspect
import tomllib
from importlib.metadata import version

from aiokafka import AIOKafkaConsumer
from aiokafka.client import AIOKafkaClient

from core import aiokafka_private
from core.settings import PROJECT_ROOT


def test_the_installed_and_locked_aiokafka_is_the_pinned_one() -> None:
    assert version("aiokafka") == aiokafka_private.PINNED
    dependencies = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"aiokafka=={aiokafka_private.PINNED}" in dependencies


async def test_the_private_metadata_refresh_still_exists() -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1")  # not started: no connection is made
    try:
        assert isinstance(consumer._client, AIOKafkaClient)  # noqa: SLF001
    finally:
        await consumer.stop()
    # called with no argument and awaited (it returns a future)
    assert list(inspect.signature(AIOKafkaClient.force_metadata_update).parameters) == ["self"]
