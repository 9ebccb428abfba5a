"""Serving follows the online trainer on real Kafka and Redis (issue #16, item 3).

An online trainer process trains on the samples topic and flushes into the training copy; a
replicator keeps an inference replica at the training copy's versions; the serving app (in
process, over HTTP) reads rows and the online dense weights from the replica. Requests run
all along: none fails, each answer names the dense part and the rows it was scored with
(``online/v<dense version>@ps<rows version>``, rows never older than the dense part), the
served state follows new flushes, and a poisoned stream that the guard refuses never reaches
serving: the answers stay those of the last good state, bit for bit, until clean data resumes.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from paramserver import Replicator, open_store
from serving.app import create_app
from serving.components import Components
from serving.features import StaticFeatures
from serving.loader import OnlineDense
from serving.model import EmbeddingDotScorer, ModelHandle
from serving.wiring import open_rows
from tests.serving.test_serving_integration import serve
from tests.training.test_online_integration import GUARDED, Group
from traffic.simulator import SimConfig
from traffic.synthetic import simulate_samples
from training.model import ModelConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVED = re.compile(r"^online/v(\d+)@ps(\d+)$")


class Traffic:
    """A thread sending recommend requests until stopped; keeps (status, model version) of every answer."""

    def __init__(self, base: str, body: dict) -> None:
        self.base, self.body = base, body
        self.answers: list[tuple[int, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as client:
            while not self.stop.is_set():
                r = client.post("/v1/recommend", json=self.body)
                self.answers.append((r.status_code, r.json().get("model_version", r.text)))
                time.sleep(0.01)

    def wait_for(self, predicate, what: str, timeout: float = 180.0) -> str:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.answers and predicate(self.answers[-1][1]):
                return self.answers[-1][1]
            assert self.thread.is_alive(), "the request thread died"
            time.sleep(0.05)
        raise AssertionError(f"never served {what}; last answers {self.answers[-5:]}")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def _versions(served: str) -> tuple[int, int]:
    match = SERVED.match(served)
    assert match, f"not an online served state: {served!r}"
    return int(match[1]), int(match[2])


def test_serving_follows_the_online_trainer_without_a_failed_request_and_never_serves_a_refused_flush(
    kafka_bootstrap: str, redis_factory, tmp_path: Path
) -> None:
    group = Group(kafka_bootstrap, redis_factory("online").url, tmp_path, **GUARDED)
    replica_server = redis_factory("online-replica")
    settings = group.s.override(
        serving={
            "reload_poll_s": 0,
            "explore_share": 0.0,
            "param_version_poll_s": 0.2,
            "online_dense_refresh_s": 0.3,
            "request_deadline_s": 60.0,
        }
    )
    samples = simulate_samples(SimConfig(users=40, items=30, requests=560, seed=32)).samples
    user, items = samples[0].user_id, sorted({s.item_id for s in samples})[:10]
    body = {"user_id": user, "k": 5, "candidate_item_ids": items}
    source = open_store("redis", [], group.s.ps)
    replica = open_store("redis", [], group.s.ps, shards=[replica_server.url])
    stop_replication = threading.Event()
    replication = threading.Thread(
        target=Replicator(source, replica, poll_s=0.05).run, args=(stop_replication,), daemon=True
    )
    replication.start()
    rows = open_rows(settings, [replica_server.url])
    online = OnlineDense(rows, ModelConfig.of_settings(settings.train))
    # before any trainer flushed: the fallback scorer answers (so a failed request is a failed switch)
    model = ModelHandle(None, lambda: EmbeddingDotScorer({}), rows.refresh_version, online)
    comps = Components(model=model, rows=rows, features=StaticFeatures(), follow_stream=False, log_impressions=False)
    traffic: Traffic | None = None
    group.start()
    try:
        with serve(create_app(settings, comps)) as base:
            traffic = Traffic(base, body)
            try:
                _follow(group, source, traffic, base, body, samples)
            finally:
                traffic.close()  # before the server stops
    finally:
        group.stop_all()
        stop_replication.set()
        replication.join(timeout=30)
        source.close()
        replica.close()
    assert traffic is not None
    answers = traffic.answers
    assert answers and all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:5]
    served = [v for _, v in answers if SERVED.match(v)]
    assert served, "online states served"
    assert all(_versions(v)[1] >= _versions(v)[0] for v in served), "rows never older than the dense part"
    assert len(set(served)) >= 3, "several online states were served in turn"


def _follow(group: Group, source, traffic: Traffic, base: str, body: dict, samples: list) -> None:  # noqa: ANN001
    """Clean flushes served in turn, a poisoned stream never served, then publishing resumes."""
    group.produce(samples[:1600])
    first = traffic.wait_for(lambda v: SERVED.match(v) is not None, "the online dense weights")
    group.produce(samples[1600:3200])
    group.wait_until_committed()
    good_version = source.version()
    good = f"online/v{good_version}@ps{good_version}"
    traffic.wait_for(lambda v: v == good, good)
    assert _versions(good)[0] > _versions(first)[0], "the served state followed the new flushes"
    with httpx.Client(base_url=base, timeout=60) as client:
        scored_good = client.post("/v1/recommend", json=body).json()

        poisoned = [s.model_copy(update={"label": 1 - s.label}) for s in samples[3200:4400]]
        group.produce(poisoned)
        group.wait_until_committed()
        assert source.version() == good_version, "the guard refused the poisoned flushes"
        time.sleep(1.0)  # several polls of serving's version (0.2 s) and online dense (0.3 s): nothing to pick up
        again = client.post("/v1/recommend", json=body).json()
        assert again["model_version"] == good, "serving stays at the last good state"
        assert again["items"] == scored_good["items"], "the same scores, bit for bit"

        group.produce(samples[4400:])
        group.wait_until_committed()
        assert source.version() > good_version, "publishing resumed"
        traffic.wait_for(lambda v: SERVED.match(v) is not None and _versions(v)[0] > good_version, "resumed")
