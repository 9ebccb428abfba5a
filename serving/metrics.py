"""Prometheus metrics of one serving app (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self._stages: dict[str, tuple[Any, Any]] = {}
        self.registry = r = CollectorRegistry()
        self.request_latency = Histogram(
            "recsys_serving_request_seconds",
            "request latency by endpoint",
            ["endpoint", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # clock="wall": elapsed time (waiting for the interpreter lock included); clock="cpu": the CPU time the
        # stage's own thread spent (time.thread_time). A wall far above cpu means the stage waited, not worked.
        # stage="event_loop_lag": how late the event loop ran a timer (wall only): work that blocks the loop.
        self.stage_latency = Histogram(
            "recsys_serving_stage_seconds",
            "wall and CPU time of each stage of a ranking, and the event loop's lag",
            ["stage", "clock"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.candidates = Histogram(
            "recsys_serving_candidates",
            "candidates ranked per request",
            buckets=(1, 10, 50, 100, 200, 500, 1000, 5000),
            registry=r,
        )
        self.cache_hits = Counter("recsys_serving_row_cache_hits", "embedding rows served from the cache", registry=r)
        self.cache_misses = Counter(
            "recsys_serving_row_cache_misses", "embedding rows pulled from a replica", registry=r
        )
        self.replica_in_use = Gauge(
            "recsys_serving_replica_in_use",
            "index of the parameter replica reads go to (nearest first; -1 none)",
            registry=r,
        )
        self.replica_healthy = Gauge(
            "recsys_serving_replica_healthy", "1 when the replica answers", ["replica"], registry=r
        )
        self.failovers = Gauge("recsys_serving_replica_failovers", "times reads moved to another replica", registry=r)
        self.parameter_version = Gauge(
            "recsys_serving_parameter_version", "parameter version of the row cache", registry=r
        )
        self.model = Info("recsys_serving_model", "the model being served", registry=r)
        self.model_reloads = Counter("recsys_serving_model_reloads", "model swaps after the first load", registry=r)
        self.degraded = Counter("recsys_serving_degraded", "answers given in a degraded mode", ["reason"], registry=r)
        self.policy = Counter(
            "recsys_serving_recommendations",
            "recommend answers by the policy that chose the list (exploit: greedy top k, explore: random)",
            ["policy"],
            registry=r,
        )
        self.cold_start = Counter("recsys_serving_cold_start", "requests for users without a profile", registry=r)
        self.impressions_sent = Counter("recsys_serving_impressions_sent", "impressions written to Kafka", registry=r)
        self.impressions_dropped = Counter(
            "recsys_serving_impressions_dropped", "impressions dropped because the buffer was full", registry=r
        )
        self.impressions_buffered = Gauge(
            "recsys_serving_impressions_buffered", "impressions waiting for Kafka", registry=r
        )
        self.retrieval_items = Gauge("recsys_serving_retrieval_items", "items known to the retrieval stage", registry=r)
        self.shed = Counter(
            "recsys_serving_shed",
            "ranking requests answered 503 because too many were in flight",
            ["endpoint"],
            registry=r,
        )
        self.deadline_expired = Counter(
            "recsys_serving_deadline_expired",
            "ranking requests answered 504 at their deadline",
            ["endpoint"],
            registry=r,
        )
        self.in_flight = Gauge(
            "recsys_serving_in_flight", "ranking requests in flight (with work abandoned at its deadline)", registry=r
        )

    def stage(self, name: str, wall: float, cpu: float) -> tuple[float, float]:
        """Observe stage ``name`` begun at (``wall``, ``cpu``) = (perf_counter, thread_time); returns now's pair."""
        now_wall, now_cpu = time.perf_counter(), time.thread_time()
        children = self._stages.get(name)
        if children is None:  # labels() per call costs a lock and a tuple lookup: keep the pair per stage
            children = self._stages[name] = (
                self.stage_latency.labels(name, "wall"),
                self.stage_latency.labels(name, "cpu"),
            )
        children[0].observe(now_wall - wall)
        children[1].observe(now_cpu - cpu)
        return now_wall, now_cpu

    def row_lookup(self, hits: int, misses: int) -> None:
        if hits:
            self.cache_hits.inc(hits)
        if misses:
            self.cache_misses.inc(misses)
