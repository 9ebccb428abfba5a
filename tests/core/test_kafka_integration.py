"""Against the real Kafka broker of the fixtures: topics, contract round trip, consumer groups."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from core.kafka import (
    KafkaUnavailable,
    commit_group_offsets,
    end_offsets,
    ensure_topics,
    produce_all,
    publish,
    read_topic,
)
from feature_repo.contract import parse_event
from traffic.simulator import SimConfig, Simulation

pytestmark = pytest.mark.integration


async def test_topics_are_created_with_partitions_and_creation_is_idempotent(
    kafka_bootstrap: str, unique_topic: str
) -> None:
    assert await ensure_topics(kafka_bootstrap, {unique_topic: 6}) == [unique_topic]
    assert await ensure_topics(kafka_bootstrap, {unique_topic: 6}) == []
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([unique_topic])
    finally:
        await admin.close()
    assert len(described[0]["partitions"]) == 6


async def test_reconfigure_sets_the_configs_of_a_topic_that_exists_already(
    kafka_bootstrap: str, unique_topic: str
) -> None:
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    await ensure_topics(kafka_bootstrap, {unique_topic: 1}, configs={unique_topic: {"cleanup.policy": "compact"}})
    wanted = {"cleanup.policy": "compact", "segment.ms": "5000", "delete.retention.ms": "1000"}
    assert await ensure_topics(kafka_bootstrap, {unique_topic: 1}, configs={unique_topic: wanted}) == []

    async def configs() -> dict[str, str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, unique_topic)])
        finally:
            await admin.close()
        return {entry[0]: entry[1] for entry in described[0].resources[0][4] if entry[0] in wanted}

    assert (await configs())["segment.ms"] != "5000"  # without reconfigure, an existing topic is left as it is
    await ensure_topics(kafka_bootstrap, {unique_topic: 1}, configs={unique_topic: wanted}, reconfigure=True)
    assert await configs() == wanted


async def test_contract_events_round_trip_through_kafka(kafka_bootstrap: str, unique_topic: str) -> None:
    await ensure_topics(kafka_bootstrap, {unique_topic: 3})
    sim = Simulation(SimConfig(users=50, items=40, requests=60))
    sent = list(sim.records())
    result = await publish(sent, kafka_bootstrap, unique_topic, show_progress=False)
    assert result.records == len(sent)

    received = [record async for record in read_topic(kafka_bootstrap, unique_topic)]
    assert sorted(r.value for r in received) == sorted(r.value for r in sent)
    events = [parse_event(r.value) for r in received]
    for record, event in zip(received, events):
        assert record.key == event.kafka_key()
    # one user's events share a partition, so their order survives
    by_user: dict[str, set[int]] = {}
    for record, event in zip(received, events):
        if hasattr(event, "user_id"):
            by_user.setdefault(event.user_id, set()).add(record.partition)
    assert all(len(partitions) == 1 for partitions in by_user.values())


async def test_consumer_group_commits_offsets_and_resumes(kafka_bootstrap: str, unique_topic: str) -> None:
    await ensure_topics(kafka_bootstrap, {unique_topic: 1})
    await produce_all(kafka_bootstrap, unique_topic, [(b"k", f"m{i}".encode()) for i in range(10)])
    group = f"group-{unique_topic}"

    async def consume(count: int) -> list[bytes]:
        consumer = AIOKafkaConsumer(
            unique_topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            values: list[bytes] = []
            while len(values) < count:
                batch = await consumer.getmany(timeout_ms=1000, max_records=count - len(values))
                for records in batch.values():
                    values.extend(r.value for r in records)
            await consumer.commit()
            return values
        finally:
            await consumer.stop()

    first = await consume(4)
    second = await consume(6)
    assert first == [f"m{i}".encode() for i in range(4)]
    assert second == [f"m{i}".encode() for i in range(4, 10)]


async def test_committed_group_offsets_are_where_the_groups_next_member_starts(
    kafka_bootstrap: str, unique_topic: str
) -> None:
    await ensure_topics(kafka_bootstrap, {unique_topic: 2})
    await produce_all(kafka_bootstrap, unique_topic, [(f"k{i}".encode(), f"m{i}".encode()) for i in range(40)])
    ends = await end_offsets(kafka_bootstrap, unique_topic)
    start = {p: end // 2 for p, end in ends.items()}  # as a champion's window end would be
    group = f"group-{unique_topic}"
    await commit_group_offsets(kafka_bootstrap, group, unique_topic, start)
    consumer = AIOKafkaConsumer(
        unique_topic, bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False
    )  # "earliest" or "latest" would not matter: the group has offsets
    await consumer.start()
    try:
        seen: dict[int, list[int]] = {}
        while sum(len(v) for v in seen.values()) < sum(ends[p] - start[p] for p in ends):
            for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
                seen.setdefault(tp.partition, []).extend(r.offset for r in records)
    finally:
        await consumer.stop()
    assert {p: offsets[0] for p, offsets in seen.items()} == {p: o for p, o in start.items() if o < ends[p]}
    assert {p: offsets[-1] + 1 for p, offsets in seen.items()} == {p: e for p, e in ends.items() if start[p] < e}


async def test_bounded_read_respects_start_and_stop_offsets(kafka_bootstrap: str, unique_topic: str) -> None:
    await ensure_topics(kafka_bootstrap, {unique_topic: 2})
    await produce_all(kafka_bootstrap, unique_topic, [(f"k{i}".encode(), f"v{i}".encode()) for i in range(40)])
    ends = await end_offsets(kafka_bootstrap, unique_topic)
    assert sum(ends.values()) == 40
    start = {p: end // 2 for p, end in ends.items()}
    tail = [r async for r in read_topic(kafka_bootstrap, unique_topic, start=start)]
    assert len(tail) == sum(end - end // 2 for end in ends.values())
    assert all(r.offset >= start[r.partition] for r in tail)
    # a read that starts at the end yields nothing and returns at once
    assert [r async for r in read_topic(kafka_bootstrap, unique_topic, start=ends)] == []


async def test_unreachable_broker_gives_a_clear_error() -> None:
    from core.procs import free_port

    with pytest.raises(KafkaUnavailable, match="recsys services up"):
        await asyncio.wait_for(ensure_topics(f"127.0.0.1:{free_port()}", {"x": 1}), timeout=60)
