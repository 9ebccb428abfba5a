"""The loop exporter: the figures of the loop no component serves on its own ``/metrics``.

Consumer lag (records behind the end of the topic) is Kafka's to tell, not the consumer's: a
stalled or dead worker cannot report its own lag. The parameter version each copy holds (the
training copy, every inference replica) is in the Redis servers themselves. This process reads
both on every Prometheus scrape and serves them on ``RECSYS_LOOP_EXPORTER_PORT``; a source that
does not answer yields no sample for that scrape (a gap in the plot), never a made-up zero, and
``recsys_loop_exporter_source_up`` says which source failed.

Run with ``python -m local_services.loop_exporter`` (``local_services.prometheus`` starts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from core.consumer_lag import group_lag
from core.procs import LOCALHOST
from core.settings import Settings

if TYPE_CHECKING:
    from paramserver.redis_store import RedisStore

log = logging.getLogger("recsys.loop_exporter")

# a replica must answer a scrape quickly: Prometheus gives up on the whole scrape at its timeout
REDIS_TIMEOUT_S = 1.0


def parameter_copies(s: Settings) -> list[tuple[str, list[str]]]:
    """(copy name, shard URLs) of the training copy and of every inference replica, nearest first."""
    replicas = [(f"replica-{i}", spec.split(",")) for i, spec in enumerate(s.ps.replicas)]
    return [("training", list(s.ps.shards)), *replicas]


def consumer_groups(s: Settings) -> list[tuple[str, str]]:
    """(group, topic) pairs whose lag is exported: the stream worker on the events, the online trainers on the
    samples."""
    return [(s.stream.app_id, s.kafka.topic_events), (s.online.group_id, s.kafka.topic_samples)]


class LoopCollector(Collector):
    """Reads consumer lag and parameter versions at collection time (one scrape, one reading)."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self._stores: dict[str, RedisStore] = {}
        self._lock = threading.Lock()  # scrapes may overlap; the stores' connections are reused

    def _store(self, name: str, urls: list[str]) -> RedisStore:
        from paramserver.redis_store import RedisStore

        store = self._stores.get(name)
        if store is None:
            store = RedisStore.from_settings(
                self.s.ps, None, shards=urls, timeout=REDIS_TIMEOUT_S, configure_servers=False
            )
            self._stores[name] = store
        return store

    def _versions(self, up: GaugeMetricFamily) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "recsys_ps_copy_version",
            "parameter version committed in each copy of the parameter service (training copy, inference replicas)",
            labels=["copy"],
        )
        staleness = GaugeMetricFamily(
            "recsys_ps_replica_staleness_seconds",
            "how long the oldest training-copy version a replica lacks has been committed (0: caught up)",
            labels=["copy"],
        )
        versions: dict[str, int] = {}
        for name, urls in parameter_copies(self.s):
            try:
                versions[name] = self._store(name, urls).version()
            except Exception as exc:  # noqa: BLE001 (any failure of one copy must not hide the others)
                log.warning("parameter copy %s unreadable: %s: %s", name, type(exc).__name__, exc)
                stale = self._stores.pop(name, None)
                if stale is not None:
                    stale.close()
                up.add_metric([f"ps:{name}"], 0.0)
                continue
            family.add_metric([name], float(versions[name]))
            up.add_metric([f"ps:{name}"], 1.0)
        latest = versions.get("training")
        if latest is not None:
            for name, version in versions.items():
                if name == "training":
                    continue
                if version >= latest:
                    staleness.add_metric([name], 0.0)
                    continue
                with contextlib.suppress(Exception):  # the commit log may be trimmed: then no figure, not a guess
                    committed = self._stores["training"].commit_time(version + 1)
                    if committed is not None:
                        staleness.add_metric([name], max(0.0, time.time() - committed))
        return family, staleness

    def _lags(self, up: GaugeMetricFamily) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "recsys_consumer_lag_records",
            "records of the topic after the group's committed offset, per partition (Kafka's own figures)",
            labels=["group", "topic", "partition"],
        )
        for group, topic in consumer_groups(self.s):
            try:
                lags = asyncio.run(group_lag(self.s.kafka, group, topic))
            except Exception as exc:  # noqa: BLE001 (Kafka down: a gap, and the source marked down)
                log.warning("lag of %s on %s unreadable: %s: %s", group, topic, type(exc).__name__, exc)
                up.add_metric([f"kafka:{group}"], 0.0)
                continue
            up.add_metric([f"kafka:{group}"], 1.0)
            # a group that never committed (no trainer ever ran) has no lag to show: the whole topic
            # counted as its lag would be a figure about nobody
            if all(p.committed is None for p in lags):
                continue
            for p in lags:
                family.add_metric([group, topic, str(p.partition)], float(p.lag))
        return family

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily(
            "recsys_loop_exporter_source_up", "1 when the source answered this scrape", labels=["source"]
        )
        with self._lock:
            lags = self._lags(up)
            versions, staleness = self._versions(up)
        yield lags
        yield versions
        yield staleness
        yield up


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    s = Settings()
    registry = CollectorRegistry()
    registry.register(LoopCollector(s))
    start_http_server(s.local.loop_exporter_port, addr=LOCALHOST, registry=registry)
    log.info("loop exporter on http://%s:%d/metrics", LOCALHOST, s.local.loop_exporter_port)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()


if __name__ == "__main__":
    main()
