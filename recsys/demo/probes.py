"""Freshness probes: how long a change takes to show where it is read.

event -> feature online (a profile until the online store shows it), click -> sample (until its
sample is on the samples topic), push -> replica applied (every inference replica), champion
change -> serving reload (the registry alias moved until serving reports the version).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson

from core.settings import Settings
from recsys.demo.config import CHAINS, PROBE_TABLE, DemoConfig, DemoError, Report, console, step
from recsys.demo.report import quantiles
from recsys.demo.stages import wait_served


async def probe_features_and_samples(s: Settings, probes: int, timeout: float) -> tuple[list[float], list[float]]:
    """Profile events until the online store shows them; impression+click pairs until their samples appear."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from core.kafka import end_offsets, start_producer
    from feature_repo.contract import Sample, click_event, event_key, impression_event, sample_id, user_profile_event
    from feature_repo.spec import encode_user
    from feature_repo.store import open_store, read_online

    store = await asyncio.to_thread(open_store, s.feast.data_dir, s.feast.online_store, s.feast_redis_url, False)
    producer = await start_producer(s.kafka.bootstrap)
    tag = uuid.uuid4().hex[:8]
    feature_times: list[float] = []
    sample_times: list[float] = []
    try:
        for i in range(probes):
            user = f"demo-probe-{tag}-{i}"
            profile = user_profile_event(
                event_id=f"{user}-profile",
                timestamp=time.time(),
                user_id=user,
                gender="F",
                age=20 + i % 50,
                occupation="writer",
                zip_code=f"{10000 + i}",
            )
            expected = encode_user(user, profile).sparse
            sent = time.perf_counter()
            await producer.send_and_wait(s.kafka.topic_events, orjson.dumps(profile), key=event_key(profile))
            while True:
                got = (await asyncio.to_thread(read_online, store, "user", [user]))[user]
                if got is not None and got.sparse == expected:
                    feature_times.append(time.perf_counter() - sent)
                    break
                if time.perf_counter() - sent > timeout:
                    raise DemoError(f"profile of {user} never reached the online store within {timeout:.0f}s")
                await asyncio.sleep(0.01)

        ends = await end_offsets(s.kafka.bootstrap, s.kafka.topic_samples)
        consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(s.kafka.topic_samples, p) for p in ends]
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, ends[tp.partition])
            for i in range(probes):
                user, item, request = f"demo-probe-{tag}-{i}", f"demo-probe-item-{i}", f"demo-probe-{tag}-r{i}"
                wanted = sample_id(request, item)
                now = time.time()
                impression = impression_event(
                    event_id=f"{request}-imp", timestamp=now, request_id=request, user_id=user, item_id=item, position=0
                )
                click = click_event(
                    event_id=f"{request}-click", timestamp=now, request_id=request, user_id=user, item_id=item
                )
                await producer.send_and_wait(s.kafka.topic_events, orjson.dumps(impression), key=user.encode())
                sent = time.perf_counter()
                await producer.send_and_wait(s.kafka.topic_events, orjson.dumps(click), key=user.encode())
                found = False
                while not found:
                    batches = await consumer.getmany(timeout_ms=50)
                    for records in batches.values():
                        for record in records:
                            try:
                                if Sample.from_json(record.value).sample_id == wanted:
                                    found = True
                            except ValueError:
                                continue
                    if time.perf_counter() - sent > timeout:
                        raise DemoError(f"the sample of click {request} never appeared within {timeout:.0f}s")
                sample_times.append(time.perf_counter() - sent)
        finally:
            await consumer.stop()
    finally:
        await producer.stop()
    return feature_times, sample_times


def probe_replicas(s: Settings, probes: int, timeout: float) -> tuple[list[float], dict[str, list[float]]]:
    """Push a probe table to the training copy until every inference replica applied each push.

    Returns the time until the slowest replica had it, per probe, and the time of each replica.
    """
    import numpy as np

    from paramserver import Rows, TableConfig, open_reader, open_store
    from training.lifecycle.publish import wait_for_replicas

    if not s.ps.replicas:
        raise DemoError("no inference replicas configured (RECSYS_PS_REPLICAS)")
    source = open_store("redis", [TableConfig(PROBE_TABLE, dim=4, capacity=1024)], s.ps)
    # one reader per replica, so each one's version is read from that replica alone
    replicas = {spec: open_reader(s.ps, [spec]) for spec in s.ps.replicas}
    slowest: list[float] = []
    per_replica: dict[str, list[float]] = {spec: [] for spec in replicas}
    try:
        for i in range(probes):
            ids = np.arange(i * 4, i * 4 + 4, dtype=np.int64)
            rows = Rows(ids, np.full((4, 4), float(i), dtype=np.float32), np.zeros((4, 1), dtype=np.float32))
            sent = time.perf_counter()
            version = source.push({PROBE_TABLE: rows})
            # polled every 2 ms: the time itself is the measurement
            waited = wait_for_replicas(s, version, timeout, poll_s=0.002, since=sent, readers=replicas)
            for spec, seconds in waited["applied_s"].items():
                per_replica[spec].append(seconds)
            slowest.append(time.perf_counter() - sent)
    finally:
        source.close()
        for reader in replicas.values():
            reader.close()
    return slowest, per_replica


def probe_champion(s: Settings, client: Any, version: str, probes: int, timeout: float) -> list[float]:
    """Move the champion alias between the champion and a registry copy of it, until serving follows.

    The copy is a second registered version with the same artifacts (tag ``demo_probe_copy_of``), so
    every alias move is a real champion change for serving; the alias ends on the trained champion,
    and the copy is deleted once serving is back on it: the registry keeps no probe versions.
    """
    name = s.train.model_name
    mv = client.get_model_version(name, version)
    copy = client.create_model_version(
        name,
        mv.source,
        run_id=mv.run_id,
        tags={"demo_probe_copy_of": str(version), "role": "demo-probe"},
        description=f"demo freshness probe: a copy of version {version}",
    )
    base = f"http://127.0.0.1:{s.serving.port}"
    times: list[float] = []
    try:
        for i in range(probes):
            target = str(copy.version) if i % 2 == 0 else str(version)
            client.set_registered_model_alias(name, "champion", target)
            sent = time.perf_counter()
            wait_served(base, f"{s.serving.model_name}/{target}", timeout)
            times.append(time.perf_counter() - sent)
    finally:
        client.set_registered_model_alias(name, "champion", str(version))
        try:
            wait_served(base, f"{s.serving.model_name}/{version}", timeout)
        finally:
            client.delete_model_version(name, str(copy.version))
    return times


def measure_freshness(s: Settings, config: DemoConfig, client: Any, version: str, report: Report) -> None:
    """Each freshness chain of CHAINS, ``config.probes`` times; quantiles into the report."""
    timeout = 120.0
    step(f"freshness: {config.probes} probes of each chain")
    features, samples = asyncio.run(probe_features_and_samples(s, config.probes, timeout))
    report.freshness["event_to_feature_online"] = quantiles(features)
    report.freshness["click_to_sample"] = quantiles(samples)
    slowest, per_replica = probe_replicas(s, config.probes, timeout)
    report.freshness["push_to_replica_applied"] = {
        **quantiles(slowest),
        "per_replica": {spec: quantiles(v) for spec, v in per_replica.items()},
    }
    report.freshness["champion_to_serving_reload"] = {
        **quantiles(probe_champion(s, client, version, config.probes, timeout)),
        "how": f"alias moved in the registry; serving polls it every {s.serving.reload_poll_s:g}s",
    }
    for key, label in CHAINS.items():
        f = report.freshness[key]
        console.print(f"{label}: median {f['median_s'] * 1000:.0f} ms, p99 {f['p99_s'] * 1000:.0f} ms (n={f['n']})")
