"""streaming/faust_overrides.py reaches into Faust and aiokafka: these tests fail when either changes under it.

A failure here means: read ``streaming/faust_overrides.py`` against the new version's source (its
fetch loop mirrors Faust's ``Consumer._drain_messages``/``getmany`` and its acks ``Consumer.ack``),
then move the pins in ``PINNED`` and pyproject together.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from collections import defaultdict
from importlib.metadata import version

import aiokafka
import mode
from aiokafka.client import AIOKafkaClient
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from faust.stores import memory
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka

from core.kafka import servers
from core.settings import PROJECT_ROOT, Settings
from streaming import faust_overrides
from streaming.faust_overrides import PINNED, BatchConsumer, ConsumerThread, StreamApp, table_dict


def test_installed_versions_are_the_pinned_ones_and_pyproject_pins_the_same():
    for package, pinned in PINNED.items():
        assert version(package) == pinned, f"{package} {version(package)} installed; overrides written for {pinned}"
    dependencies = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for package, pinned in PINNED.items():
        assert f"{package}=={pinned}" in dependencies, f"pyproject must pin {package}=={pinned} exactly"


def _parameters(function: object) -> list[str]:
    """Parameter names with their kind marks (``*name`` keyword-only): what a call or an override relies on."""
    return [
        ("*" if p.kind is inspect.Parameter.KEYWORD_ONLY else "") + p.name
        for p in inspect.signature(function).parameters.values()  # type: ignore[arg-type]
    ]


# (owner, name, parameters): every private method overridden or called, and the public ones the send path calls
RELIED_ON = [
    # overridden
    (faust_consumer.Consumer, "_drain_messages", ["self", "fetcher"]),
    (faust_aiokafka.Consumer, "_new_consumer_thread", ["self"]),
    (faust_aiokafka.AIOKafkaConsumerThread, "_create_worker_consumer", ["self", "transport"]),
    (mode.Service, "on_first_start", ["self"]),
    # called
    (faust_consumer.Consumer, "_wait_next_records", ["self", "timeout"]),
    (faust_consumer.Consumer, "_add_gap", ["self", "tp", "offset_from", "offset_to"]),
    (faust_aiokafka.Consumer, "_to_message", ["self", "tp", "record"]),
    (faust_consumer.Consumer, "perform_seek", ["self"]),
    (faust_consumer.Consumer, "commit", ["self", "topics", "start_new_transaction"]),
    (faust_aiokafka.Consumer, "highwater", ["self", "tp"]),
    (faust_aiokafka.Producer, "_ensure_producer", ["self"]),
    (AIOKafkaClient, "_wait_on_metadata", ["self", "topic"]),
    (aiokafka.AIOKafkaProducer, "create_batch", ["self"]),
    (aiokafka.AIOKafkaProducer, "send_batch", ["self", "batch", "topic", "*partition"]),
    (BatchBuilder, "append", ["self", "*timestamp", "*key", "*value", "*headers"]),
    (DefaultPartitioner, "__call__", ["key", "all_partitions", "available"]),
]


def test_every_private_method_relied_on_exists_with_the_signature_relied_on():
    for owner, name, expected in RELIED_ON:
        assert hasattr(owner, name), f"{owner.__qualname__}.{name} is gone"
        assert _parameters(getattr(owner, name)) == expected, f"{owner.__qualname__}.{name} changed its signature"


def test_the_consumer_state_read_and_written_is_the_one_faust_keeps():
    """The fetch loop and the batch acks read and write Faust's consumer bookkeeping directly."""
    # Faust's consumer is a mode Service: _stopped (read of the consumer and of its fetcher) is the Service's
    init = inspect.getsource(faust_consumer.Consumer.__init__) + inspect.getsource(mode.Service.__init__)
    ack = inspect.getsource(faust_consumer.Consumer.ack)
    used = inspect.getsource(BatchConsumer)
    for attribute in re.findall(r"self\.(_[a-z_]+)\b", used):
        if attribute in {"_new_consumer_thread", "_drain_messages", "_ack_oldest", "_ack_offsets"}:
            continue  # ours
        assert hasattr(BatchConsumer, attribute) or f"self.{attribute} =" in init, f"Faust keeps no {attribute}"
    for attribute in ("_committed_offset", "_acked_index", "_acked", "_n_acked", "_waiting_for_ack"):
        assert f"self.{attribute}" in ack, f"Faust's ack no longer uses {attribute}: re-read _ack_offsets"
    assert "_fetch_max_wait_ms" in inspect.getsource(aiokafka.AIOKafkaConsumer.start)
    assert "self.data: MutableMapping = {}" in inspect.getsource(memory.Store)


async def test_the_app_gets_the_batch_consumer_and_its_short_fetch_wait(tmp_path):
    from streaming.factory import create_app

    settings = Settings().override(
        kafka={"bootstrap": "127.0.0.1:9"}, stream={"data_dir": tmp_path, "fetch_max_wait_ms": 37}
    )
    app, worker = create_app(settings)
    assert isinstance(app, StreamApp) and servers(app.kafka_brokers) == "127.0.0.1:9"
    consumer = app.consumer
    assert isinstance(consumer, BatchConsumer)
    assert consumer.batch_topics == {settings.kafka.topic_events} and consumer.on_batch == worker.handle_batch
    for attribute in ("_read_offset", "_committed_offset", "_acked", "_acked_index"):
        assert isinstance(getattr(consumer, attribute), defaultdict)
    assert consumer._n_acked == 0 and consumer._waiting_for_ack is None and consumer._buffered_partitions == set()
    assert hasattr(consumer._stopped, "is_set")
    thread = consumer._thread
    assert isinstance(thread, ConsumerThread)
    kafka_consumer = thread._create_worker_consumer(app.transport)
    try:
        assert isinstance(kafka_consumer, aiokafka.AIOKafkaConsumer) and kafka_consumer._fetch_max_wait_ms == 37
    finally:
        await kafka_consumer.stop()
    # the tables' values are the memory store's plain dicts
    assert table_dict(app.tables["joins"]) is app.tables["joins"].data.data
    assert type(table_dict(app.tables["joins"])) is dict
    assert faust_overrides.committed_offsets(consumer) is consumer._committed_offset
