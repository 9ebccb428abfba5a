"""Simulator publish rate to Kafka versus a bare aiokafka producer sending the same bytes.

    uv run python -m bench simulator [--requests 20000] [--repeats 3] [--bootstrap host:port]

Without --bootstrap a private Kafka is started on free ports and stopped afterwards.
Both sides use the same producer settings and fresh 4-partition topics; runs alternate
so machine noise hits both alike. Prints per-run rates, medians and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from core.kafka import ensure_topics, publish, start_producer
from core.settings import Settings
from local_services import kafka as local_kafka
from local_services import services
from traffic.simulator import SimConfig, Simulation


async def bare_producer(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]) -> float:
    """The baseline: aiokafka's own send loop, deliberately not ``core.kafka.publish``."""
    producer = await start_producer(bootstrap)
    started = time.perf_counter()
    try:
        futures = [await producer.send(topic, value=value, key=key) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(records) / (time.perf_counter() - started)


async def simulator_publish(bootstrap: str, topic: str, config: SimConfig) -> float:
    result = await publish(Simulation(config).records(), bootstrap, topic, show_progress=False)
    return result.rate


async def run(bootstrap: str, requests: int, repeats: int) -> None:
    config = SimConfig(requests=requests, start_time=time.time())
    records = [(r.key, r.value) for r in Simulation(config).records()]
    size = sum(len(v) for _, v in records) / len(records)
    print(f"{len(records)} records per run, mean value {size:.0f} bytes, {repeats} runs each (alternating)")
    sim_rates, bare_rates = [], []
    for i in range(repeats):
        for name, rates in (("simulator", sim_rates), ("bare", bare_rates)):
            topic = f"bench.{name}.{uuid.uuid4().hex[:8]}"
            await ensure_topics(bootstrap, {topic: 4})
            if name == "simulator":
                rate = await simulator_publish(bootstrap, topic, config)
            else:
                rate = await bare_producer(bootstrap, topic, records)
            rates.append(rate)
            print(f"  run {i + 1} {name:>9}: {rate:>9,.0f} records/s")
    sim, bare = statistics.median(sim_rates), statistics.median(bare_rates)
    print(f"simulator publish (generate + send + ack): median {sim:,.0f} records/s")
    print(f"bare aiokafka producer, same bytes:        median {bare:,.0f} records/s")
    print(f"ratio simulator/bare: {sim / bare:.2f}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench simulator", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="simulated requests per run (10 impressions each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bootstrap", help="use this running Kafka instead of starting one")
    args = parser.parse_args(argv)
    if args.bootstrap:
        asyncio.run(run(args.bootstrap, args.requests, args.repeats))
        return 0
    defaults = Settings()
    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp:
        run_dir = Path(tmp)
        port = services.free_port()
        local_kafka.start_kafka(
            run_dir,
            defaults.local.cache_dir,
            defaults.local.kafka_version,
            port,
            services.free_port(),
            name="kafka-bench",
        )
        try:
            asyncio.run(run(f"127.0.0.1:{port}", args.requests, args.repeats))
        finally:
            services.stop(run_dir, "kafka-bench")
    return 0
