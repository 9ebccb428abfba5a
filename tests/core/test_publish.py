"""core.kafka.publish, the one producer loop, against a fake producer: record shapes, pacing, ack windows."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from core import kafka
from traffic.simulator import SimRecord


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, float]] = []
        self.stopped = False

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> asyncio.Future[None]:
        self.sent.append((topic, key, value, time.time()))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def producer(monkeypatch: pytest.MonkeyPatch) -> FakeProducer:
    fake = FakeProducer()

    async def start(bootstrap: str, **options: object) -> FakeProducer:
        return fake

    monkeypatch.setattr(kafka, "start_producer", start)
    return fake


@dataclass(frozen=True)
class Keyed:
    key: bytes | None
    value: bytes


def test_pairs_triples_and_records_are_all_sent_in_order(producer: FakeProducer) -> None:
    records = [(b"k1", b"v1"), (None, b"v2", 0.0), Keyed(b"k3", b"v3"), SimRecord(b"k4", b"v4", 0.0, "click")]
    result = asyncio.run(kafka.publish(records, "unused:1", "t"))
    assert result.records == 4 and result.seconds >= 0 and result.rate > 0
    assert [(t, k, v) for t, k, v, _ in producer.sent] == [
        ("t", b"k1", b"v1"),
        ("t", None, b"v2"),
        ("t", b"k3", b"v3"),
        ("t", b"k4", b"v4"),
    ]
    assert producer.stopped
    assert asyncio.run(kafka.produce_all("unused:1", "t", [(b"k", b"v")])) == 1


def test_an_async_source_is_sent_as_it_yields(producer: FakeProducer) -> None:
    sent_before: list[int] = []

    async def live():
        for i in range(3):
            sent_before.append(len(producer.sent))  # what the producer had when this record was asked for
            yield (b"k", b"v%d" % i)
            await asyncio.sleep(0)

    result = asyncio.run(kafka.publish(live(), "unused:1", "t"))
    assert result.records == 3 and [v for _, _, v, _ in producer.sent] == [b"v0", b"v1", b"v2"]
    assert sent_before == [0, 1, 2]  # each record went out before the next was produced


def test_paced_sends_no_record_before_its_time(producer: FakeProducer) -> None:
    start = time.time() + 0.05
    records = [SimRecord(b"k", f"v{i}".encode(), start + i * 0.05, "click") for i in range(4)]
    asyncio.run(kafka.publish(records, "unused:1", "t", paced=True))
    for record, (_, _, _, sent_at) in zip(records, producer.sent):
        assert sent_at >= record.timestamp - 0.006  # sends closer than 5 ms to their time are not delayed


def test_rate_limits_the_sends_per_second(producer: FakeProducer) -> None:
    result = asyncio.run(kafka.publish([(b"k", b"v")] * 400, "unused:1", "t", rate=2000.0))
    assert result.records == 400 and result.seconds >= 400 / 2000.0 - 0.05


def test_acknowledgements_are_awaited_in_windows(producer: FakeProducer, monkeypatch: pytest.MonkeyPatch) -> None:
    windows: list[int] = []

    class Asyncio:  # core.kafka's view of asyncio, with gather counting what each await covers
        sleep = staticmethod(asyncio.sleep)

        @staticmethod
        def gather(*futures: asyncio.Future[None]) -> asyncio.Future[list[None]]:
            windows.append(len(futures))
            return asyncio.gather(*futures)

    monkeypatch.setattr(kafka, "asyncio", Asyncio)
    asyncio.run(kafka.publish([(b"k", b"v")] * 250, "unused:1", "t", ack_window=100))
    assert len(producer.sent) == 250 and windows == [100, 100, 50]
