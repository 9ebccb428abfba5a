"""The stream worker on real-world logs, against real Kafka: mis-keyed events, early clicks, re-sent logs.

Helpers (worker subprocesses, topics per test, reading topics back) are test_streaming_kafka's.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
import test_streaming_kafka
from aiokafka import AIOKafkaProducer
from test_streaming_kafka import (
    NEVER_S,
    PARTITIONS,
    STALL_S,
    WINDOW_S,
    SampleTally,
    Setup,
    _partition_of,
    _partitions_taken,
    end_of_stream,
    read_all,
    samples_by_id,
    simulation,
    topic_configs,
    truth_labels,
)

from core.consumer_lag import group_lag
from feature_repo.contract import click_event, impression_event, sample_id
from streaming.tables import TABLES, changelog_sizes, changelog_topic
from traffic.simulator import SimConfig, SimRecord, Simulation

pytestmark = pytest.mark.integration
make_setup = test_streaming_kafka.make_setup  # the fixture, shared


def send_to(bootstrap: str, topic: str, records: list[tuple[int, bytes | None, bytes]]) -> None:
    """Send each (partition, key, value) to exactly that partition, as a client with its own partitioner would."""

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for partition, key, value in records:
                await producer.send_and_wait(topic, value, key=key, partition=partition)
        finally:
            await producer.stop()

    asyncio.run(run())


def as_sim(event: dict) -> SimRecord:
    return SimRecord(event["user_id"].encode(), orjson.dumps(event), event["timestamp"], event["event_type"])


def shown(user: str, ts: float, item: str) -> dict:
    """The impression of ``item`` in the one request of ``user`` (request id ``r-<user>``)."""
    return impression_event(
        event_id=f"imp-{user}-{item}", timestamp=ts, request_id=f"r-{user}", user_id=user, item_id=item, position=0
    )


def users_with_homes(n: int) -> list[str]:
    """Users whose home partitions cover every partition."""
    users, u = [], 0
    while len(users) < n or {_partition_of(x.encode()) for x in users} != set(range(PARTITIONS)):
        users.append(f"user-{u}")
        u += 1
    return users


@pytest.mark.slow
def test_two_workers_join_clicks_keyed_by_nothing_or_another_user(make_setup):
    setup: Setup = make_setup(idle_advance_s=NEVER_S)
    first, second = setup.start_worker(), setup.start_worker()  # one consumer group

    assignment: list[set[int]] = []

    def shared() -> bool:
        taken = [_partitions_taken(first), _partitions_taken(second)]
        assignment[:] = taken
        return all(taken) and not taken[0] & taken[1] and taken[0] | taken[1] == set(range(PARTITIONS))

    setup.wait_for("both workers to take partitions", shared, timeout=STALL_S)
    # who owned which partition when the clicks were published (read later, a rebalance could blur it)
    owner = {p: w for w, taken in enumerate(assignment) for p in taken}
    now = time.time() - 120
    users = users_with_homes(8)
    impressions, clicks, expected = [], [], {}
    wrong_keys = [None, b"", b"someone-else"]
    for n, user in enumerate(users):
        # within one window of each other: a re-published click lands behind later events of its partition,
        # and must still find its impression's window open (windows are 4 s here, 600 s by default)
        ts = now + n * 0.1
        for item in ("a", "b", "c"):
            impressions.append(shown(user, ts, item))
            expected[sample_id(f"r-{user}", item)] = int(item in "ac")
        home = _partition_of(user.encode())
        # "a": clicked, but keyed wrongly and on another partition (one, two or three away: whatever the
        # assignor, some land on the other worker); "c": clicked, keyed right
        elsewhere = (home + 1 + n % (PARTITIONS - 1)) % PARTITIONS
        click_a = click_event(
            event_id=f"clk-{user}-a", timestamp=ts + 0.5, request_id=f"r-{user}", user_id=user, item_id="a"
        )
        clicks.append((elsewhere, wrong_keys[n % 3], orjson.dumps(click_a)))
        click_c = click_event(
            event_id=f"clk-{user}-c", timestamp=ts + 0.5, request_id=f"r-{user}", user_id=user, item_id="c"
        )
        clicks.append((home, user.encode(), orjson.dumps(click_c)))
    setup.publish([as_sim(e) for e in impressions])
    send_to(setup.bootstrap, setup.events, clicks)
    published = len(impressions) + len(clicks)
    # the worker re-publishes each mis-keyed click to its user's partition; only then may windows close
    setup.wait_until("the mis-keyed clicks re-published", lambda: setup.count(setup.events), published + len(users))
    setup.publish(end_of_stream([as_sim(e) for e in impressions]))
    setup.wait_until(
        "every impression's sample", lambda: len(samples_by_id(setup.bootstrap, setup.samples)), len(expected)
    )

    got = samples_by_id(setup.bootstrap, setup.samples)
    assert {sid: s.label for sid, s in got.items()} == expected
    late = [r for r in read_all(setup.bootstrap, setup.late) if orjson.loads(r.value)["event_id"].startswith("clk-")]
    assert late == []
    copies = [r for r in read_all(setup.bootstrap, setup.events) if dict(r.headers).get("rekeyed_from")]
    assert sorted(orjson.loads(r.value)["event_id"] for r in copies) == sorted(f"clk-{u}-a" for u in users)
    for copy in copies:
        user = orjson.loads(copy.value)["user_id"]
        assert copy.key == user.encode() and copy.partition == _partition_of(copy.key)
    # the test means something only if some click was on the other worker's partition than its impression
    assert any(owner[p] != owner[_partition_of(orjson.loads(v)["user_id"].encode())] for p, k, v in clicks[::2])


def committed_all(setup: Setup) -> int:
    """Records of the events topic the worker's group has committed (every one processed and durable)."""
    lags = asyncio.run(group_lag(setup.bootstrap, setup.env["RECSYS_STREAM_APP_ID"], setup.events))
    return sum(lag.end - lag.lag for lag in lags)


@pytest.mark.slow
def test_clicks_published_seconds_before_their_impressions_get_label_1_across_a_restart(make_setup):
    setup: Setup = make_setup(idle_advance_s=NEVER_S)
    setup.env["RECSYS_STREAM_EARLY_CLICK_WAIT_S"] = "3"
    now = time.time() - 120
    users = users_with_homes(6)
    impressions, clicks, expected = [], [], {}
    for n, user in enumerate(users):
        ts = now + n * 0.1
        for item in ("a", "b"):
            impressions.append(shown(user, ts, item))
            expected[sample_id(f"r-{user}", item)] = int(item == "a")
        # the click happened after its impression, but its device uploaded first
        clicks.append(
            click_event(event_id=f"clk-{user}-a", timestamp=ts + 0.5, request_id=f"r-{user}", user_id=user, item_id="a")
        )
    # and one click whose impression never comes
    orphan = click_event(event_id="clk-orphan", timestamp=now, request_id="r-none", user_id=users[0], item_id="a")
    first = setup.start_worker()
    setup.publish([as_sim(e) for e in [*clicks, orphan]])
    setup.wait_until("the clicks processed and committed", lambda: committed_all(setup), len(clicks) + 1)
    first.kill()  # the held clicks live in the joins table: a new worker restores them from its changelog
    time.sleep(2)  # seconds between the clicks and their impressions
    setup.start_worker()
    setup.publish([as_sim(e) for e in impressions])
    setup.wait_until("the impressions' samples", lambda: len(samples_by_id(setup.bootstrap, setup.samples)), len(users))
    setup.publish(end_of_stream([as_sim(e) for e in impressions]))  # event time passes every window and wait
    setup.wait_until(
        "every impression's sample", lambda: len(samples_by_id(setup.bootstrap, setup.samples)), len(expected)
    )
    setup.wait_until("the orphan click late", lambda: setup.count(setup.late), 1)

    got = samples_by_id(setup.bootstrap, setup.samples)
    assert {sid: s.label for sid, s in got.items()} == expected
    late = [r for r in read_all(setup.bootstrap, setup.late) if orjson.loads(r.value)["event_id"].startswith("clk-")]
    assert [(orjson.loads(r.value)["event_id"], dict(r.headers)["reason"]) for r in late] == [
        ("clk-orphan", b"no_impression")
    ]
    assert late[0].value == orjson.dumps(orphan)  # the click itself, as its client sent it


def markers(ts: float, tag: str) -> list[SimRecord]:
    """One click per partition at event time ``ts`` (on no impression): every partition's event time moves there."""
    keys: dict[int, str] = {}
    n = 0
    while len(keys) < PARTITIONS:
        keys.setdefault(_partition_of(f"marker-{n}".encode()), f"marker-{n}")
        n += 1
    return [
        as_sim(click_event(event_id=f"{tag}-{p}", timestamp=ts, request_id=f"{tag}", user_id=user, item_id="marker"))
        for p, user in sorted(keys.items())
    ]


@pytest.mark.slow
def test_a_log_published_again_after_the_dedup_window_gives_no_sample_id_a_second_label(make_setup):
    setup: Setup = make_setup(idle_advance_s=NEVER_S)
    # both forget quickly here: event ids after 2 s of event time, resolved entries after 1 s of wall time
    setup.env["RECSYS_STREAM_DEDUP_WINDOW_S"] = "2"
    setup.env["RECSYS_STREAM_RESOLVED_RETENTION_S"] = "1"
    sim, records = simulation(requests=200, seed=11)
    expected = truth_labels(sim)
    assert 0 < sum(expected.values()) < len(expected)
    end = max(r.timestamp for r in records)
    setup.start_worker()
    setup.publish(records + markers(end + WINDOW_S + 1, "first-end"))
    setup.wait_until(
        "every impression's sample", lambda: len(samples_by_id(setup.bootstrap, setup.samples)), len(expected)
    )
    first_pass = setup.count(setup.samples)
    # event time far past the de-dup window, then wall time past the retention of resolved entries
    setup.publish(markers(end + 60, "later"))
    published = len(records) + 2 * PARTITIONS
    setup.wait_until("the first pass committed", lambda: committed_all(setup), published)
    time.sleep(3)
    setup.publish(records)  # the client sends the whole log again
    setup.publish(markers(end + 120, "second-end"))
    published += len(records) + PARTITIONS
    setup.wait_until("the second pass committed", lambda: committed_all(setup), published)

    got = samples_by_id(setup.bootstrap, setup.samples)  # fails on an id with two labels
    assert {sid: s.label for sid, s in got.items()} == expected
    assert setup.count(setup.samples) == first_pass  # nothing emitted again at all


@pytest.mark.slow
def test_a_restart_after_a_long_history_reads_compacted_changelogs_and_misroutes_no_click(make_setup):
    setup: Setup = make_setup(idle_advance_s=NEVER_S)
    app_id = setup.env["RECSYS_STREAM_APP_ID"]
    # Segments closed after 1 s or 1 MiB, tombstones kept 1 s: the cleaner (every 15 s, the broker's default)
    # keeps up within the test. Event ids are forgotten after 5 s of event time, resolved entries after 1 s of
    # wall time, so the re-sent clicks below reach the joiner, and the restart outlives every retention.
    setup.env |= {
        "RECSYS_STREAM_CHANGELOG_SEGMENT_MS": "1000",
        "RECSYS_STREAM_CHANGELOG_SEGMENT_BYTES": str(1024**2),
        "RECSYS_STREAM_CHANGELOG_MIN_CLEANABLE_DIRTY_RATIO": "0.01",
        "RECSYS_STREAM_CHANGELOG_DELETE_RETENTION_MS": "1000",
        "RECSYS_STREAM_DEDUP_WINDOW_S": "5",
        "RECSYS_STREAM_RESOLVED_RETENTION_S": "1",
        "RECSYS_STREAM_EARLY_CLICK_WAIT_S": "3",
    }
    sim, records = simulation(requests=15_000, seed=13)
    expected = truth_labels(sim)
    end = max(r.timestamp for r in records)
    first = setup.start_worker()
    setup.publish(records)
    sink = SampleTally(setup.bootstrap, setup.samples)

    # The stream goes on, a little at a time, as a live one does: the cleaner removes tombstones only while it
    # cleans a log, and it cleans one that got new records (a stopped stream keeps its last tombstones).
    stream = list(records)

    def compacted() -> bool:
        start = max(max(r.timestamp for r in stream) + 0.5, time.time() - 60)  # (never far in the future)
        config = SimConfig(
            users=60,
            items=40,
            requests=20,
            slate_size=5,
            seed=len(stream),
            start_time=start,
            requests_per_second=100.0,
            click_delay_mean_s=0.5,
            click_delay_max_s=2.0,  # within the window, as simulation()'s
        )
        more = Simulation(config)
        chunk = list(more.records())
        stream.extend(chunk)
        expected.update(truth_labels(more))
        setup.publish(chunk)
        sizes = asyncio.run(changelog_sizes(setup.bootstrap, app_id))
        held, written = sum(h for h, _ in sizes.values()), sum(w for _, w in sizes.values())
        return held * 10 < written

    # what a restart reads no longer grows with the history: most of it was compacted away (with the broker's
    # segment defaults nothing is, and held == written)
    setup.wait_for("the changelogs compacted", compacted, timeout=300)
    changelogs = [changelog_topic(app_id, table) for table in TABLES]
    configs = asyncio.run(topic_configs(setup.bootstrap, changelogs))
    assert {name: (c["cleanup.policy"], c["segment.ms"]) for name, c in configs.items()} == {
        name: ("compact", "1000") for name in changelogs
    }
    end = max(r.timestamp for r in stream)
    setup.publish(markers(end + WINDOW_S + 1, "first-end"))
    setup.wait_until("every impression's sample", sink.distinct, len(expected))
    first_pass = setup.count(setup.samples)

    # The client sends the stream's clicks again, and the worker is killed while it handles them: the new
    # worker restores its tables for longer than every retention, then gets those clicks re-delivered.
    clicks = [r for r in stream if r.kind == "click"]
    assert len(clicks) > 1000
    committed = committed_all(setup)
    setup.publish(clicks)
    setup.wait_until("some re-sent clicks committed", lambda: committed_all(setup), committed + 1)
    first.kill()
    setup.start_worker()
    setup.publish(markers(end + 30, "second-end"))  # past every click's early-click wait: held ones go late
    published = len(stream) + len(clicks) + 2 * PARTITIONS
    setup.wait_until("everything committed by the restarted worker", lambda: committed_all(setup), published)

    got = samples_by_id(setup.bootstrap, setup.samples)  # fails on an id with two labels
    assert {sid: s.label for sid, s in got.items()} == expected
    assert setup.count(setup.samples) == first_pass  # nothing emitted again
    misrouted = [
        (orjson.loads(r.value)["event_id"], dict(r.headers)["reason"])
        for r in read_all(setup.bootstrap, setup.late)
        if not orjson.loads(r.value)["event_id"].startswith(("first-end", "second-end"))
    ]
    assert misrouted == []
