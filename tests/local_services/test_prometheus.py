"""Prometheus of the local services: the generated scrape configuration, the installed dashboard, the
swappable registry, and the loop exporter against real Redis and Kafka (a source that is down leaves a
gap and says so, never a zero)."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from core.procs import free_port
from core.settings import Settings
from local_services import prometheus as local_prometheus
from local_services.loop_exporter import LoopCollector
from tests.serving.test_serving_integration import TABLES, _replicate, _seed_training_copy


def test_targets_follow_the_settings_and_skip_components_whose_metrics_are_off():
    s = Settings().override(
        serving={"port": 8101}, local={"loop_exporter_port": 9501}, stream={"metrics_port": 9502}, sim={}, online={}
    )
    targets = local_prometheus.targets_from_settings(s)
    assert {(t.job, t.address) for t in targets} == {
        ("serving", "127.0.0.1:8101"),
        ("loop-exporter", "127.0.0.1:9501"),
        ("stream-worker", "127.0.0.1:9502"),
    }  # trainer and simulator: metrics port 0, not scraped (no target that is down by design)
    s2 = s.override(online={"metrics_port": 9503}, sim={"metrics_port": 9504})
    jobs = {t.job for t in local_prometheus.targets_from_settings(s2)}
    assert {"online-trainer", "simulator"} <= jobs


def test_scrape_config_groups_targets_by_job_and_keeps_a_scrape_shorter_than_the_interval():
    config = local_prometheus.scrape_config(
        [
            local_prometheus.ScrapeTarget("online-trainer", "127.0.0.1:1"),
            local_prometheus.ScrapeTarget("online-trainer", "127.0.0.1:2"),
            local_prometheus.ScrapeTarget("serving", "127.0.0.1:3"),
        ],
        2.5,
    )
    assert config["global"]["scrape_interval"] == "2.5s" and config["global"]["scrape_timeout"] == "2.5s"
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert jobs == {"online-trainer": ["127.0.0.1:1", "127.0.0.1:2"], "serving": ["127.0.0.1:3"]}


def test_the_installed_dashboard_has_the_scrape_interval_and_no_placeholder(tmp_path):
    page = local_prometheus.install_dashboard(tmp_path / "consoles", 3.0).read_text()
    assert "@SCRAPE_INTERVAL_S@" not in page and 'Number("3")' in page
    # nothing loaded from elsewhere (the browser test also records every request the page makes)
    assert re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page) == []


def test_current_registry_serves_whichever_registry_is_current():
    port = free_port()
    current = local_prometheus.serve_current(port)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()

    assert "phase_total" not in scrape()  # nothing yet: an empty page, not an error
    first, second = CollectorRegistry(), CollectorRegistry()
    Counter("phase", "a phase's counter", registry=first).inc(3)
    Counter("phase", "a phase's counter", registry=second).inc(1)
    current.use(first)
    assert "phase_total 3.0" in scrape()
    current.use(second)
    assert "phase_total 1.0" in scrape() and "phase_total 3.0" not in scrape()


def _samples(collector: LoopCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.integration
def test_the_loop_exporter_reads_versions_staleness_and_lag_and_marks_a_dead_source(
    redis_factory, test_settings, kafka_bootstrap
):
    import asyncio

    from core.kafka import ensure_topics, produce_all

    train, replica = redis_factory("exporter-train"), redis_factory("exporter-replica")
    _seed_training_copy(train.url, ["u1", "u2"], ["i1", "i2", "i3"], TABLES)
    _replicate(train.url, [replica.url])
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    s = test_settings.override(ps={"shards": [train.url], "replicas": [replica.url, dead]})
    asyncio.run(ensure_topics(kafka_bootstrap, {s.kafka.topic_events: 2}))
    asyncio.run(produce_all(kafka_bootstrap, s.kafka.topic_events, [(b"u1", b"{}")] * 3))
    collector = LoopCollector(s)

    caught_up = _samples(collector)
    version = caught_up[("recsys_ps_copy_version", (("copy", "training"),))]
    assert version >= 1 and caught_up[("recsys_ps_copy_version", (("copy", "replica-0"),))] == version
    assert caught_up[("recsys_ps_replica_staleness_seconds", (("copy", "replica-0"),))] == 0.0
    # the dead replica: no version, no staleness, and its source marked down (a gap, not a zero)
    assert ("recsys_ps_copy_version", (("copy", "replica-1"),)) not in caught_up
    assert caught_up[("recsys_loop_exporter_source_up", (("source", "ps:replica-1"),))] == 0.0
    assert caught_up[("recsys_loop_exporter_source_up", (("source", "ps:training"),))] == 1.0
    # no group ever committed on these topics: no lag figure about nobody, but Kafka answered
    assert not any(name == "recsys_consumer_lag_records" for name, _ in caught_up)
    assert caught_up[("recsys_loop_exporter_source_up", (("source", f"kafka:{s.stream.app_id}"),))] == 1.0

    _seed_training_copy(train.url, ["u1"], ["i1"], TABLES)  # a version the replica lacks
    time.sleep(1.0)
    behind = _samples(collector)
    assert behind[("recsys_ps_copy_version", (("copy", "training"),))] == version + 1
    assert behind[("recsys_ps_copy_version", (("copy", "replica-0"),))] == version
    assert behind[("recsys_ps_replica_staleness_seconds", (("copy", "replica-0"),))] >= 1.0


def test_prometheus_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(local_prometheus.shutil, "which", lambda _name: None)
    with pytest.raises(local_prometheus.services.ServiceError, match="apt-get install -y prometheus"):
        local_prometheus.start_prometheus(tmp_path, free_port(), [], interval_s=5, retention="1h")
