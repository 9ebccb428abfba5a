"""Prometheus metrics of the stream worker (served on RECSYS_STREAM_METRICS_PORT when set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_IN = Counter("recsys_stream_events_in_total", "valid events read from the events topic", ["event_type"])
RECORDS_IN = Counter("recsys_stream_records_in_total", "raw records read from the events topic")
RECORDS_OUT = Counter("recsys_stream_records_out_total", "records written, by destination", ["destination"])
DEADLETTERED = Counter("recsys_stream_deadlettered_total", "records sent to the dead-letter topic", ["reason"])
DUPLICATES = Counter("recsys_stream_duplicates_dropped_total", "client retries dropped by event id", ["event_type"])
SAMPLES = Counter("recsys_stream_samples_total", "labelled samples emitted (first emission)", ["label"])
LATE_CLICKS = Counter("recsys_stream_late_clicks_total", "clicks routed to the late topic", ["reason"])
OPEN_IMPRESSIONS = Gauge("recsys_stream_open_impressions", "impressions waiting for a click")
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

# children bound once: .labels() costs more than the increment on the per-event path
EVENTS_IN_BY_TYPE = {kind: EVENTS_IN.labels(kind) for kind in ("impression", "click", "user_profile", "item_profile")}
SAMPLES_BY_LABEL = {label: SAMPLES.labels(str(label)) for label in (0, 1)}
FEATURES_LOGGED = FEATURE_SOURCE.labels("logged")
FEATURES_STREAM = FEATURE_SOURCE.labels("stream")
