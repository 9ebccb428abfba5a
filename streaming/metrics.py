"""Prometheus metrics of the stream worker (served on RECSYS_STREAM_METRICS_PORT when set)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram

EVENTS_IN = Counter("recsys_stream_events_in_total", "valid events read from the events topic", ["event_type"])
RECORDS_IN = Counter("recsys_stream_records_in_total", "raw records read from the events topic")
RECORDS_OUT = Counter("recsys_stream_records_out_total", "records written, by destination", ["destination"])
DEADLETTERED = Counter("recsys_stream_deadlettered_total", "records sent to the dead-letter topic", ["reason"])
DUPLICATES = Counter("recsys_stream_duplicates_dropped_total", "client retries dropped by event id", ["event_type"])
SAMPLES = Counter("recsys_stream_samples_total", "labelled samples emitted (first emission)", ["label"])
LATE_CLICKS = Counter("recsys_stream_late_clicks_total", "clicks routed to the late topic", ["reason"])
OPEN_IMPRESSIONS = Gauge("recsys_stream_open_impressions", "impressions waiting for a click")
REKEYED = Counter(
    "recsys_stream_rekeyed_total",
    "events keyed to another partition than their user's, re-published to the events topic under the user id",
    ["event_type"],
)
REDELIVERED = Counter(
    "recsys_stream_redelivered_dropped_total",
    "records delivered again at an offset this worker had handled already (skipped: their effects are kept)",
)
STALE_PROFILES = Counter("recsys_stream_stale_profiles_total", "profiles older than the one already known")
FEATURE_SOURCE = Counter("recsys_stream_sample_features_total", "where sample features came from", ["source"])
FEATURE_ROWS = Counter("recsys_stream_feature_rows_total", "encoded rows written to Feast", ["entity", "store"])
JOIN_LAG = Histogram(
    "recsys_stream_join_lag_seconds",
    "wall time at emission minus the impression's event time",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600),
)
WATERMARK_LAG = Gauge(
    "recsys_stream_watermark_lag_seconds", "wall time minus the partition's event-time watermark", ["partition"]
)
BATCH_SECONDS = Histogram(
    "recsys_stream_batch_seconds",
    "time to handle one batch, sends included",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
FEATURE_PUSH_SECONDS = Histogram(
    "recsys_stream_feature_push_seconds",
    "time of one batched Feast write",
    ["store"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


# Served CTR per served state and policy: clicks / impressions, counted when the join emits a sample (its
# label known). The stream owns the join, so it owns this; the label values are bounded by ServedCounters.
SERVED_IMPRESSIONS = Counter(
    "recsys_served_impressions_total",
    "served impressions whose sample was emitted, by the model version that served them and the policy that chose",
    ["model_version", "policy"],
)
SERVED_CLICKS = Counter(
    "recsys_served_clicks_total",
    "of recsys_served_impressions_total, the clicked ones (samples with label 1)",
    ["model_version", "policy"],
)

UNKNOWN_LABEL = "none"  # an impression that named no model version or no policy
OTHER_LABEL = "other"  # past the cap of distinct versions, or a version too long to be a label
MAX_LABEL_CHARS = 128


class ServedCounters:
    """Adds per-batch served counts to the two counters, keeping their label values bounded.

    Policies are the contract's few (``feature_repo.contract.POLICIES``); model versions are whatever
    serving logged, so the first ``max_versions`` distinct ones get their own label and the rest
    count as ``other`` (a worker restart starts over; served versions change per promotion, rarely).
    """

    def __init__(self, max_versions: int) -> None:
        self.max_versions = max_versions
        self.versions: set[str] = set()

    def version_label(self, model_version: str | None) -> str:
        if model_version is None:
            return UNKNOWN_LABEL
        if model_version in self.versions:
            return model_version
        if len(self.versions) >= self.max_versions or len(model_version) > MAX_LABEL_CHARS:
            return OTHER_LABEL
        self.versions.add(model_version)
        return model_version

    def add(self, counts: Mapping[tuple[str | None, str | None, int], int]) -> None:
        """``counts``: samples by (model version, policy, label)."""
        for (model_version, policy, label), count in counts.items():
            labels = (self.version_label(model_version), policy or UNKNOWN_LABEL)
            SERVED_IMPRESSIONS.labels(*labels).inc(count)
            clicks = SERVED_CLICKS.labels(*labels)  # created at 0 beside its impressions, so the ratio exists
            if label == 1:
                clicks.inc(count)
