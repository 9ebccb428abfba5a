"""Load shedding and request deadlines of the ranking endpoints (pure logic: a fake feature store that hangs).

The fake feature store blocks every fetch until the test lets it go (at most a minute, so a
broken test cannot hang the suite). Time bounds are loose on purpose: a shed or expired
request must come back long before the hung dependency would have let it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from serving.app import create_app
from serving.components import Components
from serving.features import StaticFeatures
from serving.model import EmbeddingDotScorer, ModelHandle

HANG_S = 60.0  # what a "hung" dependency would take: every bound below is far under it


class HangingFeatures(StaticFeatures):
    """A feature store whose fetch waits until ``release`` is set; ``entered`` counts fetches begun."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = 0
        self._lock = threading.Lock()

    def fetch(self, user_ids, item_ids):
        with self._lock:
            self.entered += 1
        self.release.wait(HANG_S)
        return super().fetch(user_ids, item_ids)

    def wait_entered(self, n: int) -> None:
        deadline = time.monotonic() + HANG_S
        while self.entered < n:
            assert time.monotonic() < deadline, f"only {self.entered} of {n} requests reached the feature store"
            time.sleep(0.01)


@pytest.fixture
def hanging():
    return HangingFeatures()


def _client(features: HangingFeatures, **serving) -> TestClient:
    settings = Settings().override(serving={"reload_poll_s": 0, "param_version_poll_s": 0.05, **serving})
    comps = Components(
        model=ModelHandle(None, lambda: EmbeddingDotScorer({"user_id": 4, "item_id": 4})),
        rows=None,
        features=features,
        follow_stream=False,
        log_impressions=False,
    )
    return TestClient(create_app(settings, comps), raise_server_exceptions=False)


def _score(client: TestClient):
    return client.post("/v1/score", json={"pairs": [{"user_id": "u1", "item_id": "i1"}]})


def _metric(client: TestClient, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_beyond_max_in_flight_requests_get_503_with_retry_after_and_recover(hanging):
    with _client(hanging, max_in_flight=2, request_deadline_s=HANG_S * 2, shed_retry_after_s=3) as client:
        with ThreadPoolExecutor(2) as pool:
            busy = [
                pool.submit(_score, client),
                pool.submit(client.post, "/v1/recommend", json={"user_id": "u1", "candidate_item_ids": ["i1"]}),
            ]
            hanging.wait_entered(2)
            started = time.monotonic()
            shed = client.post("/v1/recommend", json={"user_id": "u2", "candidate_item_ids": ["i1"]})
            shed_score = _score(client)
            took = time.monotonic() - started
            # the health, metrics and ping endpoints never take a slot
            health = [client.get(p).status_code for p in ("/healthz", "/v1/ping", "/metrics")]
            ready = client.get("/readyz").json()
            hanging.release.set()
            answers = [f.result(timeout=HANG_S) for f in busy]
        assert shed.status_code == 503 and shed_score.status_code == 503
        assert shed.headers["retry-after"] == "3"
        assert "too many requests in flight" in shed.json()["detail"]
        assert took < HANG_S / 4  # answered at once, not after the busy requests
        assert health == [200, 200, 200]
        assert ready["ready"] is False  # readiness answers its own question (no replica here), it is not shed
        assert [a.status_code for a in answers] == [200, 200]
        assert _score(client).status_code == 200  # the load is gone: served again
        assert _metric(client, 'recsys_serving_shed_total{endpoint="recommend"}') == 1
        assert _metric(client, 'recsys_serving_shed_total{endpoint="score"}') == 1
        assert _metric(client, "recsys_serving_in_flight ") == 0


@pytest.mark.parametrize("path", ["/v1/score", "/v1/recommend"])
def test_a_hung_dependency_is_answered_504_by_the_deadline(hanging, path):
    deadline_s = 0.5
    body = (
        {"pairs": [{"user_id": "u1", "item_id": "i1"}]}
        if path == "/v1/score"
        else {"user_id": "u1", "candidate_item_ids": ["i1"]}
    )
    with _client(hanging, max_in_flight=1, request_deadline_s=deadline_s) as client:
        started = time.monotonic()
        r = client.post(path, json=body)
        took = time.monotonic() - started
        assert r.status_code == 504, r.text
        assert "deadline" in r.json()["detail"]
        assert took < 10 * deadline_s  # loose: the dependency itself would have taken HANG_S
        # the abandoned work still runs in its thread and keeps its slot: the next request is shed
        assert client.post(path, json=body).status_code == 503
        hanging.release.set()
        endpoint = path.rsplit("/", 1)[1]
        wait_until = time.monotonic() + HANG_S
        while _metric(client, "recsys_serving_in_flight "):  # the abandoned thread ends and frees its slot
            assert time.monotonic() < wait_until
            time.sleep(0.01)
        assert client.post(path, json=body).status_code == 200
        assert _metric(client, f'recsys_serving_deadline_expired_total{{endpoint="{endpoint}"}}') == 1
        assert _metric(client, f'recsys_serving_request_seconds_count{{endpoint="{endpoint}",status="504"}}') == 1


def test_openapi_declares_503_and_504_on_the_ranking_endpoints(hanging):
    hanging.release.set()
    with _client(hanging) as client:
        paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/recommend", "/v1/score"):
        responses = paths[path]["post"]["responses"]
        assert {"503", "504"} <= responses.keys()
        assert "Retry-After" in responses["503"]["headers"]
    assert "503" not in paths["/healthz"]["get"]["responses"]


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        Settings().override(serving={"max_in_flight": 0})
    with pytest.raises(ValueError):
        Settings().override(serving={"request_deadline_s": 0})


class CountingFeatures(StaticFeatures):
    """A feature store that notes how many fetches run at once (each takes a little while)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = self.most = 0
        self._lock = threading.Lock()

    def fetch(self, user_ids, item_ids):
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.05)
        with self._lock:
            self.now -= 1
        return super().fetch(user_ids, item_ids)


def test_ranking_threads_bounds_the_rankings_running_at_once():
    features = CountingFeatures()
    with _client(features, ranking_threads=2, max_in_flight=16) as client:  # type: ignore[arg-type]
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: _score(client), range(24)))
    assert [a.status_code for a in answers] == [200] * 24
    assert 1 <= features.most <= 2, features.most
