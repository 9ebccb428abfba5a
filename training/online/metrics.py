"""Prometheus metrics of one online trainer (its own registry, served on ``--metrics-port``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

if TYPE_CHECKING:
    from training.online.learner import FlushResult


class OnlineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.records = Counter("recsys_online_records", "records read from the samples topic", registry=r)
        self.rejected = Counter("recsys_online_rejected", "records skipped as invalid samples", registry=r)
        self.samples = Counter("recsys_online_samples", "valid samples trained on", registry=r)
        self.flushes = Counter("recsys_online_flushes", "flushes by the guard's decision", ["decision"], registry=r)
        self.auc = Gauge("recsys_online_auc", "progressive-validation AUC of the last judged flush", registry=r)
        self.log_loss = Gauge("recsys_online_log_loss", "progressive-validation log loss of the last flush", registry=r)
        self.calibration = Gauge("recsys_online_calibration", "mean score / click rate of the last flush", registry=r)
        self.trailing_auc = Gauge("recsys_online_trailing_auc", "the guard's trailing AUC level", registry=r)
        self.alert = Gauge(
            "recsys_online_publishing_halted", "1 while the guard refuses flushes (served rows held)", registry=r
        )
        self.version = Gauge("recsys_online_ps_version", "parameter version of the last published flush", registry=r)

    def observe(self, result: FlushResult, halted: bool) -> None:
        q = result.quality
        self.flushes.labels(str(result.verdict.decision)).inc()
        if q.judgeable:
            self.auc.set(q.auc)
            self.log_loss.set(q.log_loss)
            self.calibration.set(q.calibration)
        if not math.isnan(result.verdict.trailing_auc):
            self.trailing_auc.set(result.verdict.trailing_auc)
        self.alert.set(1.0 if halted else 0.0)
        if result.version is not None:
            self.version.set(result.version)
