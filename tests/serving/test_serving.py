"""Serving: pure-logic unit tests (in-process parameter store, static features, no Kafka).

The API's request handling, bad input, degraded answers, admin security, the row cache and
the atomic model swap are exercised here through the real FastAPI app; the behaviour
against real Redis replicas, Kafka, Feast and MLflow is in test_serving_integration.py.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from feature_repo.spec import encode_item, encode_user, item_id_key, user_id_key
from paramserver import Rows, ShardUnavailable, TableConfig, open_store
from serving.app import create_app
from serving.components import Components
from serving.features import StaticFeatures, assemble
from serving.model import EmbeddingDotScorer, ModelHandle
from serving.params import RowFetcher
from serving.retrieval import PopularityIndex
from serving.state import get_state

TOKEN = "a-very-secret-admin-token"
DIM = 4


class MemoryReader:
    """The FailoverReader surface over the in-process store; ``down`` simulates every replica failing."""

    def __init__(self, store) -> None:
        self.store = store
        self.tables = store.tables
        self.current = 0
        self.failovers = 0
        self.down = False
        self.pulls = 0

    def pull(self, table, ids):
        if self.down:
            raise ShardUnavailable("all replicas down")
        self.pulls += 1
        return self.store.pull(table, ids)

    def version(self):
        if self.down:
            raise ShardUnavailable("all replicas down")
        return self.store.version()

    def healthy(self):
        return [not self.down]

    def behind(self):
        return [False]

    floor = 0

    def require_version(self, version):
        pass

    def close(self):
        pass


def _settings(**kw) -> Settings:
    return Settings().override(
        serving={
            "admin_token": TOKEN,
            "reload_poll_s": 0,
            "max_candidates": 50,
            "max_k": 20,
            "max_body_bytes": 4096,
            "param_version_poll_s": 0.05,
            "explore_share": 0.0,  # the greedy order, which these tests assert (test_exploration covers the rest)
        },
        **kw,
    )


def _store():
    tables = [TableConfig("user_id", DIM), TableConfig("item_id", DIM)]
    store = open_store("memory", tables)
    # user u1 likes the item "good" (same direction), dislikes "bad"
    store.push(
        {
            "user_id": Rows(np.array([user_id_key("u1")]), np.ones((1, DIM), np.float32), np.zeros((1, 1), np.float32)),
            "item_id": Rows(
                np.array([item_id_key("good"), item_id_key("bad")]),
                np.array([[1.0] * DIM, [-1.0] * DIM], np.float32),
                np.zeros((2, 1), np.float32),
            ),
        }
    )
    return store


@pytest.fixture
def parts():
    store = _store()
    reader = MemoryReader(store)
    rows = RowFetcher(reader, max_rows=1000, poll_s=0.05)
    features = StaticFeatures(
        {"u1": encode_user("u1", {"gender": "F", "age": 30})}, {"good": encode_item("good", {"genres": ["drama"]})}
    )
    model = ModelHandle(None, lambda: EmbeddingDotScorer({"user_id": DIM, "item_id": DIM}))
    return store, reader, rows, features, model


@pytest.fixture
def client(parts):
    store, reader, rows, features, model = parts
    index = PopularityIndex()
    comps = Components(
        model=model, rows=rows, features=features, index=index, follow_stream=False, log_impressions=False
    )
    with TestClient(create_app(_settings(), comps), raise_server_exceptions=False) as c:
        c.parts = parts
        c.index = index
        yield c


def test_recommend_ranks_by_embeddings_and_reports_versions(client):
    r = client.post("/v1/recommend", json={"user_id": "u1", "k": 3, "candidate_item_ids": ["bad", "x", "good"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [i["item_id"] for i in body["items"]] == ["good", "x", "bad"]
    assert body["items"][0]["score"] > body["items"][2]["score"]
    assert body["model_version"] == "embedding-dot@ps1"
    assert body["cold_start"] is False and body["degraded"] is False and body["retrieval"] is False
    assert len(body["request_id"]) == 32


def test_explored_requests_say_so_and_log_the_mixture_propensity_of_each_shown_item(parts):
    from feature_repo.contract import parse_event
    from serving.exploration import propensity
    from serving.routers.recommend import _impression_records

    store, reader, rows, features, model = parts
    comps = Components(model=model, rows=rows, features=features, follow_stream=False, log_impressions=False)
    settings = _settings().override(serving={"explore_share": 0.5})
    candidates = ["bad", "x", "good", "y"]
    with TestClient(create_app(settings, comps)) as c:
        pairs = [{"user_id": "u1", "item_id": i} for i in candidates]
        scores = [p["score"] for p in c.post("/v1/score", json={"pairs": pairs}).json()["scores"]]
        greedy = np.argsort(-np.array(scores), kind="stable").tolist()
        bodies = [
            c.post("/v1/recommend", json={"user_id": "u1", "k": 2, "candidate_item_ids": candidates}).json()
            for _ in range(40)
        ]
        ranking = c.app.state.serving.running.ranker.recommend("u1", 2, candidates)
    assert {b["policy"] for b in bodies} == {"exploit", "explore"}  # 40 requests at 0.5: both occur
    for body in bodies:
        shown = [i["item_id"] for i in body["items"]]
        if body["policy"] == "exploit":
            assert shown == [candidates[i] for i in greedy[:2]] and shown[0] == "good"
        assert len(set(shown)) == 2 and set(shown) <= set(candidates)
    events = [parse_event(value) for _, value in _impression_records(ranking)]
    assert [e.item_id for e in events] == [item for item, _ in ranking.items]
    for event in events:
        assert event.policy == ranking.policy
        expected = propensity(candidates.index(event.item_id), event.position, greedy, 0.5)
        assert event.propensity == pytest.approx(expected)


def test_score_endpoint_scores_pairs(client):
    r = client.post(
        "/v1/score", json={"pairs": [{"user_id": "u1", "item_id": "good"}, {"user_id": "u1", "item_id": "bad"}]}
    )
    assert r.status_code == 200, r.text
    scores = [s["score"] for s in r.json()["scores"]]
    assert scores[0] > 0.5 > scores[1]


def test_unknown_user_gets_cold_start_answer(client):
    r = client.post("/v1/recommend", json={"user_id": "never-seen", "k": 2, "candidate_item_ids": ["good", "bad"]})
    assert r.status_code == 200
    body = r.json()
    assert body["cold_start"] is True and body["degraded"] is False
    assert len(body["items"]) == 2


@pytest.mark.parametrize(
    "payload, where",
    [
        ({"k": 3}, "user_id"),
        ({"user_id": "", "k": 3}, "user_id"),
        ({"user_id": "u1", "k": "3"}, "k"),
        ({"user_id": "u1", "k": 0}, "k"),
        ({"user_id": "u1", "k": 21}, "k"),
        ({"user_id": "u1", "candidate_item_ids": ["i"] * 51}, "candidate_item_ids"),
        ({"user_id": "u1", "candidate_item_ids": [1, 2]}, "candidate_item_ids"),
        ({"user_id": "u1", "surprise": 1}, "surprise"),
    ],
)
def test_schema_errors_are_422_with_details(client, payload, where):
    r = client.post("/v1/recommend", json=payload)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert any(where in map(str, d["loc"]) for d in detail), detail
    assert "Traceback" not in r.text


def test_not_json_is_422(client):
    r = client.post("/v1/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_oversized_body_is_413_declared_or_chunked(client):
    big = {"user_id": "u1", "candidate_item_ids": ["x" * 200] * 40}
    assert client.post("/v1/recommend", json=big).status_code == 413

    def chunks():
        yield b'{"user_id": "u1", "candidate_item_ids": ['
        for _ in range(100):
            yield b'"' + b"y" * 100 + b'",'
        yield b'"z"]}'

    r = client.post("/v1/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    # the server is fine afterwards
    assert client.post("/v1/recommend", json={"user_id": "u1", "candidate_item_ids": ["good"]}).status_code == 200


def test_feature_store_down_gives_flagged_degraded_answer(client):
    _, _, _, features, _ = client.parts
    features.down = True
    r = client.post("/v1/recommend", json={"user_id": "u1", "k": 2, "candidate_item_ids": ["bad", "good"]})
    assert r.status_code == 200
    body = r.json()
    assert body["degraded"] is True and body["degraded_reasons"] == ["feature_store"]
    # the ids alone still rank with the embeddings
    assert [i["item_id"] for i in body["items"]] == ["good", "bad"]


def test_every_replica_down_gives_flagged_degraded_answer(client):
    _, reader, rows, _, _ = client.parts
    reader.down = True
    rows._cache.rows.clear()  # nothing cached: the rows must come from a replica
    r = client.post("/v1/recommend", json={"user_id": "u1", "k": 2, "candidate_item_ids": ["bad", "good"]})
    assert r.status_code == 200
    body = r.json()
    assert body["degraded"] is True and "parameter_service" in body["degraded_reasons"]
    assert [i["item_id"] for i in body["items"]] == ["bad", "good"]  # candidate order kept
    assert client.get("/readyz").status_code == 503


def test_internal_error_is_500_without_trace(client):
    _, _, _, _, model = client.parts

    class Broken(EmbeddingDotScorer):
        def score(self, pooled, dense):
            raise RuntimeError("secret internals /home/x/model.py line 3")

    model.set(Broken({"user_id": DIM, "item_id": DIM}))
    r = client.post("/v1/recommend", json={"user_id": "u1", "candidate_item_ids": ["good"]})
    assert r.status_code == 500
    assert r.json()["detail"] == "internal error"
    assert "secret" not in r.text and "Traceback" not in r.text


def test_admin_reload_requires_token(client):
    assert client.post("/admin/reload").status_code == 401
    assert client.post("/admin/reload", headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}).status_code == 401
    r = client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["model_version"] == "embedding-dot"


def test_admin_disabled_without_token(parts):
    _, _, rows, features, model = parts
    comps = Components(model=model, rows=rows, features=features, follow_stream=False, log_impressions=False)
    settings = Settings().override(serving={"reload_poll_s": 0})
    with TestClient(create_app(settings, comps)) as c:
        assert c.post("/admin/reload", headers={"Authorization": "Bearer anything-at-all-here"}).status_code == 403


def test_before_start_up_the_ranking_and_admin_endpoints_answer_503(parts):
    _, _, rows, features, model = parts
    comps = Components(model=model, rows=rows, features=features, follow_stream=False, log_impressions=False)
    c = TestClient(create_app(_settings(), comps))  # not entered: the lifespan has not run
    r = c.post("/v1/recommend", json={"user_id": "u1", "candidate_item_ids": ["good"]})
    assert r.status_code == 503 and r.json() == {"detail": "starting up"}
    assert c.post("/v1/score", json={"pairs": [{"user_id": "u1", "item_id": "good"}]}).status_code == 503
    assert c.post("/admin/reload").status_code == 401  # the token is checked first
    assert c.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 503
    ready = c.get("/readyz")
    assert ready.status_code == 503 and ready.json()["ready"] is False and ready.json()["replicas_healthy"] == []


def test_state_can_be_swapped_with_dependency_overrides(client):
    state = client.app.state.serving
    strict = dataclasses.replace(state, settings=state.settings.override(serving={"max_k": 2}))
    client.app.dependency_overrides[get_state] = lambda: strict
    try:
        r = client.post("/v1/recommend", json={"user_id": "u1", "k": 3, "candidate_item_ids": ["good", "bad"]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "k"]
    finally:
        client.app.dependency_overrides.clear()
    assert (
        client.post("/v1/recommend", json={"user_id": "u1", "k": 3, "candidate_item_ids": ["good"]}).status_code == 200
    )


def test_health_metrics_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    client.post("/v1/recommend", json={"user_id": "u1", "candidate_item_ids": ["good", "bad"]})
    client.post("/v1/recommend", json={"user_id": "u1", "candidate_item_ids": ["good", "bad"]})
    text = client.get("/metrics").text
    assert "recsys_serving_request_seconds_bucket" in text
    assert "recsys_serving_row_cache_hits_total" in text
    assert 'recsys_serving_model_info{scorer="embedding-dot",version="embedding-dot"} 1.0' in text
    assert "recsys_serving_replica_in_use 0.0" in text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/recommend", "/v1/score", "/healthz", "/readyz", "/metrics", "/admin/reload"} <= set(paths)


def test_retrieval_supplies_candidates_when_none_given(client):
    for event in (
        {"event_type": "item_profile", "item_id": "good", "timestamp": time.time(), "genres": ["drama"]},
        {"event_type": "item_profile", "item_id": "bad", "timestamp": time.time(), "genres": ["drama"]},
        {"event_type": "click", "item_id": "bad", "user_id": "u9", "timestamp": time.time()},
    ):
        client.index.observe(event)
    r = client.post("/v1/recommend", json={"user_id": "u1", "k": 5})
    body = r.json()
    assert r.status_code == 200 and body["retrieval"] is True
    assert {i["item_id"] for i in body["items"]} == {"good", "bad"}
    assert body["items"][0]["item_id"] == "good"  # the model re-ranks what retrieval found


def test_row_cache_hits_and_version_invalidation(parts):
    store, reader, rows, _, _ = parts
    ids = {"item_id": np.array([item_id_key("good"), item_id_key("good"), item_id_key("bad")])}
    first, v1 = rows.lookup(ids)
    pulls = reader.pulls
    again, _ = rows.lookup(ids)
    assert reader.pulls == pulls  # served from the cache
    np.testing.assert_array_equal(first["item_id"], again["item_id"])
    assert first["item_id"].shape == (3, DIM)
    store.push(
        {
            "item_id": Rows(
                np.array([item_id_key("good")]), np.full((1, DIM), 7.0, np.float32), np.zeros((1, 1), np.float32)
            )
        }
    )
    rows._observe(reader.version())  # what the background poll does
    fresh, v2 = rows.lookup(ids)
    assert v2 == v1 + 1
    assert fresh["item_id"][0, 0] == 7.0 and fresh["item_id"][2, 0] == -1.0


def test_popularity_index_prefers_favourite_categories():
    index = PopularityIndex(half_life_s=3600)
    now = time.time()
    for j in range(10):
        index.observe(
            {
                "event_type": "item_profile",
                "item_id": f"c{j}",
                "timestamp": now,
                "genres": ["comedy" if j < 5 else "horror"],
            }
        )
    for j in range(5, 10):  # horror items are globally popular
        for _ in range(3):
            index.observe({"event_type": "click", "item_id": f"c{j}", "user_id": "other", "timestamp": now})
    index.observe({"event_type": "click", "item_id": "c0", "user_id": "fan", "timestamp": now})
    index.observe({"event_type": "click", "item_id": "c1", "user_id": "fan", "timestamp": now})
    index.observe({"event_type": "bogus", "item_id": None, "timestamp": "x"})  # ignored
    fan = index.candidates("fan", 4)
    assert fan[0] in {"c0", "c1"}  # the fan's comedy first, although horror is more popular overall
    assert set(index.candidates("stranger", 3)) <= {f"c{j}" for j in range(5, 10)}
    assert len(index.candidates("fan", 100)) == 10


def test_model_swap_is_atomic_under_concurrent_scoring():
    versions = iter(range(1, 10_000))

    class Slow(EmbeddingDotScorer):
        def score(self, pooled, dense):
            mine = self.version
            time.sleep(0.001)
            assert self.version == mine
            return super().score(pooled, dense)

    class Loader:
        def champion_version(self):
            return str(next(versions))

        def rows_version(self, version):
            return None

        def load(self, version):
            time.sleep(0.002)  # building a model takes time; requests must not see it half-built
            return Slow({"user_id": DIM, "item_id": DIM}, version=f"m{version}")

    handle = ModelHandle(Loader(), None)
    handle.reload()
    errors: list[BaseException] = []
    seen: set[str] = set()
    stop = threading.Event()

    def request_loop() -> None:
        pooled = {"user_id": np.ones((3, DIM), np.float32), "item_id": np.ones((3, DIM), np.float32)}
        while not stop.is_set():
            scorer = handle.current
            try:
                assert scorer is not None
                out = scorer.score(pooled, np.zeros((3, 2), np.float32))
                assert out.shape == (3,)
                seen.add(scorer.version)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    def wait_until_seen(version: str) -> None:  # requests really run alongside the swaps, however slow the machine
        deadline = time.monotonic() + 60
        while version not in seen and not errors and time.monotonic() < deadline:
            time.sleep(0.001)

    threads = [threading.Thread(target=request_loop) for _ in range(4)]
    for t in threads:
        t.start()
    wait_until_seen(handle.current.version)
    for _ in range(20):
        handle.reload()
    wait_until_seen(handle.current.version)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert handle.reloads == 20
    assert len(seen) > 1


def test_a_new_champion_waits_until_the_rows_serving_reads_hold_its_parameter_version():
    replica = {"version": 4}
    loaded: list[str] = []

    class Loader:
        champion = "1"

        def champion_version(self):
            return self.champion

        def rows_version(self, version):
            return {"1": 4, "2": 9}[version]

        def load(self, version):
            loaded.append(version)
            return EmbeddingDotScorer({"user_id": DIM, "item_id": DIM}, version=f"m/{version}")

    loader = Loader()
    handle = ModelHandle(loader, None, rows_version=lambda: replica["version"])
    assert handle.reload() == (True, None) and handle.current.version == "m/1"
    assert handle.rows_needed == 4  # serving reads no replica below the loaded champion's rows
    loader.champion = "2"  # the alias moved; the replica has not applied the champion's rows yet
    assert handle.reload() == (False, "m/1") and handle.reload(force=True) == (False, "m/1")
    assert handle.current.version == "m/1" and handle.waiting_for_rows == ("2", 9) and loaded == ["1"]
    assert handle.rows_needed == 4  # the old champion with its own rows is still a served state
    replica["version"] = 9
    assert handle.reload() == (True, "m/1") and handle.current.version == "m/2"
    assert handle.waiting_for_rows is None and loaded == ["1", "2"]
    assert handle.rows_needed == 9


def test_assemble_missing_and_out_of_range_columns():
    assert assemble("user", "u", {"gender": None, "age_bucket": None}) is None
    user = assemble("user", "u", {"gender": 2, "age_bucket": 3, "occupation": 10_000, "user_age": 0.5})
    assert user.sparse["gender"] == [2] and user.sparse["occupation"] == [0]
    assert user.sparse["user_id"] == [user_id_key("u")] and user.dense["user_age"] == 0.5
    item = assemble("item", "i", {"genres": [1, 3], "item_category": 1})
    assert item.sparse["genres"] == [1, 3]


def test_model_poll_picks_up_a_new_champion(parts):
    _, _, rows, features, _ = parts
    champion = {"version": "1"}

    class Loader:
        def champion_version(self):
            return champion["version"]

        def rows_version(self, version):
            return None

        def load(self, version):
            return EmbeddingDotScorer({"user_id": DIM, "item_id": DIM}, version=f"m/{version}", name="test")

    model = ModelHandle(Loader(), None)
    comps = Components(model=model, rows=rows, features=features, follow_stream=False, log_impressions=False)
    settings = Settings().override(serving={"reload_poll_s": 0.05, "param_version_poll_s": 0.05})
    with TestClient(create_app(settings, comps)) as c:
        first = c.post("/v1/recommend", json={"user_id": "u1", "candidate_item_ids": ["good"]}).json()
        champion["version"] = "2"
        deadline = time.time() + 30
        while model.current.version != "m/2" and time.time() < deadline:
            time.sleep(0.02)
        second = c.post("/v1/recommend", json={"user_id": "u1", "candidate_item_ids": ["good"]}).json()
        metrics = c.get("/metrics").text
    assert first["model_version"] == "m/1@ps1" and second["model_version"] == "m/2@ps1"
    assert "recsys_serving_model_reloads_total 1.0" in metrics


def test_serve_cli_rejects_bad_arguments():
    from typer.testing import CliRunner

    from recsys.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["serve", "--help"])
    assert help_text.exit_code == 0 and "--port" in help_text.output
    assert runner.invoke(app, ["serve", "--port", "0"]).exit_code == 2
    assert runner.invoke(app, ["serve", "--log-level", "loud"]).exit_code == 2


def test_reload_does_not_rebuild_an_unchanged_champion_named_differently_from_its_alias_version() -> None:
    """The alias resolves to "3" while the scorer serves "recsys-dlrm/3": a poll must not reload it again."""
    loads: list[str] = []
    champion = {"version": "3"}

    class Loader:
        def champion_version(self):
            return champion["version"]

        def rows_version(self, version):
            return None

        def load(self, version):
            loads.append(version)
            return EmbeddingDotScorer({"user_id": DIM, "item_id": DIM}, version=f"recsys-dlrm/{version}")

    handle = ModelHandle(Loader(), None)
    assert handle.reload()[0] is True
    assert handle.reload() == (False, "recsys-dlrm/3")
    assert handle.reload() == (False, "recsys-dlrm/3")
    assert loads == ["3"]
    champion["version"] = "4"
    assert handle.reload() == (True, "recsys-dlrm/3")
    assert loads == ["3", "4"] and handle.current.version == "recsys-dlrm/4"
    assert handle.reload(force=True)[0] is False and loads == ["3", "4", "4"]


def test_rows_of_tables_created_after_start_are_read_without_a_version_change():
    """Serving starts before the trainer: the tables it wants appear later, with no further push.

    This was the "near random right after the champion swap" of the demo: the reader knew no
    tables, so every lookup returned initial rows until some later push moved the version.
    """
    store = _store()

    class NoTablesYet(MemoryReader):
        def __init__(self, store) -> None:
            super().__init__(store)
            self.tables = {}

    opened = []

    def reopen():
        opened.append(MemoryReader(store))
        return opened[-1]

    rows = RowFetcher(NoTablesYet(store), max_rows=1000, poll_s=0.05, reopen=reopen, init_std=0.01)
    ids = {"item_id": np.array([item_id_key("good"), item_id_key("bad")])}
    vectors, version = rows.lookup(ids, {"item_id": DIM})
    assert version == store.version()
    assert opened, "a lookup of an unknown table should look for it again"
    np.testing.assert_array_equal(vectors["item_id"], np.array([[1.0] * DIM, [-1.0] * DIM], np.float32))
    # once found, lookups do not reopen again
    rows.lookup(ids, {"item_id": DIM})
    assert len(opened) == 1


def test_reopen_for_a_table_that_never_appears_is_rate_limited():
    store = _store()
    opened = []

    def reopen():
        opened.append(MemoryReader(store))
        return opened[-1]

    rows = RowFetcher(MemoryReader(store), max_rows=1000, poll_s=10.0, reopen=reopen, init_std=0.01)
    for _ in range(20):
        vectors, _ = rows.lookup({"not_pushed_yet": np.array([1, 2])}, {"not_pushed_yet": DIM})
        assert vectors["not_pushed_yet"].shape == (2, DIM)
    assert len(opened) == 1


def test_a_full_row_cache_evicts_the_least_recently_used_rows():
    store = _store()
    reader = MemoryReader(store)
    rows = RowFetcher(reader, max_rows=8, poll_s=10.0)
    table = "item_id"

    def pulls_for(ids: list[int]) -> int:
        before = reader.pulls
        rows.lookup({table: np.array(ids)})
        return reader.pulls - before

    rows.lookup({table: np.array(list(range(8)))})  # (the first lookup also learns the version)
    assert pulls_for(list(range(8))) == 0  # cache full: rows 0..7
    assert pulls_for([0, 1, 2]) == 0  # hits: now the most recently used
    assert pulls_for([8]) == 1  # over the bound: the least recently used quarter and more (3..5) go
    assert pulls_for([0, 1, 2, 8]) == 0  # kept: recently used (a cache that starts over would pull again)
    assert pulls_for([3]) == 1  # evicted
    assert rows._cache.size <= 8


def _histogram_count(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "_count{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_stage_metrics_give_wall_and_cpu_time_per_stage_and_the_event_loop_lag(client):
    for _ in range(3):
        assert (
            client.post("/v1/recommend", json={"user_id": "u1", "candidate_item_ids": ["good", "bad"]}).status_code
            == 200
        )
    time.sleep(0.3)  # a few periods of the loop-lag probe (loop_lag_probe_s = 0.05 by default)
    text = client.get("/metrics").text
    for stage in ("features", "rows", "score"):
        for clock in ("wall", "cpu"):
            assert _histogram_count(text, "recsys_serving_stage_seconds", stage=stage, clock=clock) == 3, (stage, clock)
    assert _histogram_count(text, "recsys_serving_stage_seconds", stage="thread_wait", clock="wall") == 3
    assert _histogram_count(text, "recsys_serving_stage_seconds", stage="event_loop_lag", clock="wall") >= 1


def test_answers_serialised_without_the_model_still_match_the_response_models(client):
    from serving.schemas import RecommendResponse, ScoreResponse

    r = client.post("/v1/recommend", json={"user_id": "u1", "k": 2, "candidate_item_ids": ["good", "bad", "x"]})
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    # strict: every field present with its declared type, nothing more
    assert RecommendResponse.model_validate(body, strict=True).model_dump(mode="json") == body
    s = client.post("/v1/score", json={"pairs": [{"user_id": "u1", "item_id": "good"}]})
    assert ScoreResponse.model_validate(s.json(), strict=True).model_dump(mode="json") == s.json()
