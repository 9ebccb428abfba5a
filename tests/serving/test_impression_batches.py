"""Impressions go to Kafka as record batches built per partition: each user's on the partition ``send`` picks.

The stream worker joins a user's impressions with the same user's clicks, which other producers
send with aiokafka's ``send`` (key = user id): both must land on one partition. Real Kafka, a
3-partition topic, more records than fit one batch.
"""

from __future__ import annotations

import asyncio

import pytest

from core.kafka import connect_options, ensure_topics, read_topic
from serving.impressions import ImpressionLogger

pytestmark = pytest.mark.integration

USERS = [f"user-{n}" for n in range(40)]


async def _run(bootstrap: str, topic: str) -> list:
    from aiokafka import AIOKafkaProducer

    await ensure_topics(bootstrap, {topic: 3})
    producer = AIOKafkaProducer(**connect_options(bootstrap))
    await producer.start()
    try:
        for user in USERS:  # what a click producer does
            await producer.send_and_wait(topic, b"click", key=user.encode())
    finally:
        await producer.stop()
    logger = ImpressionLogger(bootstrap, topic, capacity=10_000)
    logger.start()
    # ~1,200 records of 2 kB: several batches of the producer's 256 kB per partition
    logger.log_records([(user.encode(), b"i" * 2000) for _ in range(30) for user in USERS])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30.0
    while (logger.buffered or logger.sent < 30 * len(USERS)) and loop.time() < deadline:
        await asyncio.sleep(0.05)  # close() drains only once connected: wait for the producer first
    await logger.close(drain_timeout_s=20.0)
    assert logger.sent == 30 * len(USERS) and logger.dropped == 0
    return [record async for record in read_topic(bootstrap, topic)]


def test_every_impression_lands_on_its_user_s_click_partition(kafka_bootstrap, unique_topic):
    records = asyncio.run(_run(kafka_bootstrap, unique_topic))
    clicks = {r.key: r.partition for r in records if r.value == b"click"}
    impressions = [r for r in records if r.value != b"click"]
    assert len(clicks) == len(USERS) and len(impressions) == 30 * len(USERS)
    assert len(set(clicks.values())) > 1  # the users really spread over the partitions
    assert [r for r in impressions if r.partition != clicks[r.key]] == []
