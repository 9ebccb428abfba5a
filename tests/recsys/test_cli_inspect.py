"""The CLI tells the truth about Kafka: summaries of every topic kind with bad records in them,
whether the stream group has drained, and replays of plain event logs longer than the skew limit."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.kafka import end_offsets, ensure_topics, publish, read_topic
from feature_repo.contract import Sample, click_event, impression_event, parse_event
from tests.recsys.test_cli import recsys

pytestmark = pytest.mark.integration


def _topics() -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {
        "RECSYS_TOPIC_EVENTS": f"ev.{tag}",
        "RECSYS_TOPIC_SAMPLES": f"sa.{tag}",
        "RECSYS_TOPIC_DEADLETTER": f"dl.{tag}",
        "RECSYS_TOPIC_LATE": f"la.{tag}",
    }


async def _send(bootstrap: str, topic: str, records: list[tuple[bytes, list[tuple[str, bytes]]]]) -> None:
    from core.kafka import start_producer

    producer = await start_producer(bootstrap)
    try:
        for value, headers in records:
            await producer.send_and_wait(topic, value, key=b"u1", headers=headers)
    finally:
        await producer.stop()


def _impression(n: int, ts: float) -> bytes:
    return orjson.dumps(
        impression_event(event_id=f"e{n}", timestamp=ts, request_id=f"r{n}", user_id="u1", item_id=f"i{n}", position=0)
    )


def _sample(label: int) -> bytes:
    return Sample(
        sample_id=uuid.uuid4().hex,
        request_id="r1",
        user_id="u1",
        item_id="i1",
        label=label,  # type: ignore[arg-type]
        event_time=time.time(),
        sparse={},
        dense={},
    ).to_json()


def _counts(stdout: str) -> dict[str, int]:
    """The rows of the summary's table: label -> records."""
    found = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 2 and cells[1].isdigit():
            found[cells[0]] = int(cells[1])
    return found


def test_events_summary_counts_every_topic_kind_despite_bad_records(kafka_bootstrap: str) -> None:
    env = {"RECSYS_KAFKA_BOOTSTRAP": kafka_bootstrap, **_topics()}
    now = time.time()
    reason = [("reason", b"bad_json"), ("message", b"x")]
    asyncio.run(
        _send(
            kafka_bootstrap,
            env["RECSYS_TOPIC_EVENTS"],
            [(_impression(1, now), []), (_impression(2, now), []), (b"\xff\xfe not utf8", []), (b"[1]", [])],
        )
    )
    asyncio.run(
        _send(
            kafka_bootstrap,
            env["RECSYS_TOPIC_DEADLETTER"],
            [(b"{", reason), (b"\xff", reason), (b"[]", [("reason", b"not_an_object")]), (b"??", [])],
        )
    )
    asyncio.run(
        _send(
            kafka_bootstrap,
            env["RECSYS_TOPIC_SAMPLES"],
            [(_sample(1), []), (_sample(0), []), (_sample(0), []), (b"not a sample", []), (b"{}", [])],
        )
    )
    late = [("reason", b"after_window"), ("sample_id", b"s")]
    click = orjson.dumps(click_event(event_id="c", timestamp=now, request_id="r", user_id="u1", item_id="i"))
    asyncio.run(_send(kafka_bootstrap, env["RECSYS_TOPIC_LATE"], [(click, late), (b"\x00garbage", late)]))

    def rows(topic: str, *extra: str) -> dict[str, int]:
        done = recsys("events", "summary", "--topic", topic, *extra, env=env)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        return _counts(done.stdout)

    assert rows(env["RECSYS_TOPIC_EVENTS"]) == {"impression": 2, "invalid:not_utf8": 1, "invalid:not_an_object": 1}
    assert rows(env["RECSYS_TOPIC_DEADLETTER"]) == {
        "reason:bad_json": 2,
        "reason:not_an_object": 1,
        "no reason header": 1,
    }
    samples = rows(env["RECSYS_TOPIC_SAMPLES"])
    assert samples["label=1"] == 1 and samples["label=0"] == 2
    assert sum(v for k, v in samples.items() if k.startswith("unparsable:")) == 2
    assert rows(env["RECSYS_TOPIC_LATE"]) == {"reason:after_window": 2}
    # forcing the kind: the late topic read as events judges the bytes
    assert rows(env["RECSYS_TOPIC_LATE"], "--kind", "events") == {"click": 1, "invalid:bad_json": 1}
    bad = recsys("events", "summary", "--kind", "nonsense", env=env)
    assert bad.returncode == 2 and "nonsense" in bad.stderr
    missing = recsys("events", "summary", "--topic", "no.such.topic." + uuid.uuid4().hex[:6], env=env)
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_events_summary_recognises_each_record_on_a_topic_of_another_name(kafka_bootstrap: str) -> None:
    """A topic the settings do not name (a copy, a mirror): each record is counted as what it is."""
    env = {"RECSYS_KAFKA_BOOTSTRAP": kafka_bootstrap, **_topics()}
    topic = f"mixed.{uuid.uuid4().hex[:8]}"
    dead = [("reason", b"bad_json"), ("message", b"x"), ("source_topic", b"ev")]
    late = [("reason", b"no_impression"), ("sample_id", b"s")]
    asyncio.run(
        _send(
            kafka_bootstrap,
            topic,
            [
                (_impression(1, time.time()), []),
                (b"{", dead),
                (b"\xff", dead),
                (b"{}", late),
                (_sample(1), []),
                (b'{"sample_id": "s", "label": "maybe"}', []),  # a sample's fields, a broken value
                (b"\xfe\xff garbage", []),
            ],
        )
    )
    done = recsys("events", "summary", "--topic", topic, env=env)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert f"{topic} (auto): 7 records" in done.stdout
    assert _counts(done.stdout) == {
        "impression": 1,
        "deadletter reason:bad_json": 2,
        "late reason:no_impression": 1,
        "sample label=1": 1,
        "sample unparsable:missing": 1,
        "invalid:not_utf8": 1,
    }


def test_stream_status_waits_for_the_group_to_commit_to_the_end(kafka_bootstrap: str) -> None:
    topics = _topics()
    group = f"grp-{uuid.uuid4().hex[:8]}"
    env = {"RECSYS_KAFKA_BOOTSTRAP": kafka_bootstrap, "RECSYS_STREAM_APP_ID": group, **topics}
    topic = topics["RECSYS_TOPIC_EVENTS"]
    asyncio.run(ensure_topics(kafka_bootstrap, {topic: 2}))
    now = time.time()
    asyncio.run(publish([(f"u{n}".encode(), _impression(n, now)) for n in range(10)], kafka_bootstrap, topic))
    ends = asyncio.run(end_offsets(kafka_bootstrap, topic))
    assert sum(ends.values()) == 10

    behind = recsys("stream", "status", "--wait", "--timeout", "2", env=env)
    assert behind.returncode == 1, behind.stdout + behind.stderr
    assert "did not drain" in behind.stderr and "drained: no" in behind.stdout and "Traceback" not in behind.stderr

    async def commit(offsets: dict[int, int]) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, p) for p in offsets])
            await consumer.commit({TopicPartition(topic, p): o for p, o in offsets.items()})
        finally:
            await consumer.stop()

    asyncio.run(commit({p: max(0, end - 1) for p, end in ends.items()}))  # one record short on each partition
    partly = recsys("stream", "status", env=env)
    assert partly.returncode == 0 and "drained: no" in partly.stdout
    assert f"lag: {sum(1 for end in ends.values() if end)} records" in partly.stdout

    asyncio.run(commit(ends))
    done = recsys("stream", "status", "--wait", "--timeout", "60", env=env)
    assert done.returncode == 0, done.stderr
    assert "drained: yes" in done.stdout and "lag: 0 records" in done.stdout
    assert "open impressions: unknown" in done.stdout  # no worker ran: there is no joins changelog

    # the worker's joins changelog as Faust writes it (JSON key and value, None: a tombstone): the
    # latest value per sample id counts; "s1" is open, "s2" resolved after opening, "s3" deleted
    joins = [
        (b'"s1"', b'{"st": "o", "p": 0}'),
        (b'"s2"', b'{"st": "o", "p": 0}'),
        (b'"s2"', b'{"st": "p", "p": 0}'),
        (b'"s3"', b'{"st": "o", "p": 0}'),
        (b'"s3"', None),
    ]

    async def write_changelog() -> None:
        from core.kafka import start_producer

        producer = await start_producer(kafka_bootstrap)
        try:
            for key, value in joins:
                await producer.send_and_wait(f"{group}-joins-changelog", value, key=key, partition=0)
        finally:
            await producer.stop()

    asyncio.run(ensure_topics(kafka_bootstrap, {f"{group}-joins-changelog": 2}))
    asyncio.run(write_changelog())
    counted = recsys("stream", "status", env=env)
    assert counted.returncode == 0 and "open impressions: 1" in counted.stdout, counted.stdout + counted.stderr


def test_plain_event_lines_longer_than_the_skew_limit_are_all_published(tmp_path, kafka_bootstrap: str) -> None:
    topics = _topics()
    env = {"RECSYS_KAFKA_BOOTSTRAP": kafka_bootstrap, "RECSYS_MAX_FUTURE_SKEW_S": "300", **topics}
    start = time.time() - 86_400  # a day-old client log spanning two hours: 24x the skew limit
    path = tmp_path / "client.log.jsonl"
    lines = [_impression(n, start + n * 720) for n in range(11)]
    path.write_bytes(b"\n".join(lines) + b"\n")

    done = recsys("replay", str(path), env=env)
    assert done.returncode == 0, done.stderr
    assert "published 11 records" in done.stderr and "warning" not in done.stderr

    async def read() -> list[bytes]:
        return [r.value or b"" async for r in read_topic(kafka_bootstrap, topics["RECSYS_TOPIC_EVENTS"])]

    published = asyncio.run(read())
    assert len(published) == 11
    events = [parse_event(raw, max_future_skew_s=300) for raw in published]  # raises if any is out of window
    times = sorted(e.timestamp for e in events)
    assert times[-1] == pytest.approx(time.time(), abs=120) and times[-1] - times[0] == pytest.approx(7200)


def test_replay_reports_events_older_than_the_age_limit(tmp_path, kafka_bootstrap: str) -> None:
    env = {"RECSYS_KAFKA_BOOTSTRAP": kafka_bootstrap, "RECSYS_MAX_EVENT_AGE_S": "3600", **_topics()}
    now = time.time()
    path = tmp_path / "long.jsonl"
    path.write_bytes(b"\n".join([_impression(0, now - 7200), _impression(1, now - 60), _impression(2, now)]) + b"\n")
    done = recsys("replay", str(path), env=env)
    assert done.returncode == 0, done.stderr
    assert "1 of 3 events are older than the event age limit" in done.stderr and "published 3 records" in done.stderr
