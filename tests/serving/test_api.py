"""The API as documented: limits from the settings in the schema, every error answer declared, offline docs.

Pure logic through the real FastAPI app (no service); the schema against the running full stack is
checked by schemathesis in test_serving_integration.py, slow clients in test_slow_clients.py.
"""

from __future__ import annotations

import re
from urllib.parse import urljoin

import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from serving.app import create_app
from serving.components import Components
from serving.features import StaticFeatures
from serving.model import EmbeddingDotScorer, ModelHandle
from serving.schemas import Problem, ValidationProblem


def _app(**serving):
    settings = Settings().override(serving={"reload_poll_s": 0, "explore_share": 0.0, **serving})
    comps = Components(
        model=ModelHandle(None, lambda: EmbeddingDotScorer({"user_id": 4, "item_id": 4})),
        rows=None,
        features=StaticFeatures(),
        follow_stream=False,
        log_impressions=False,
    )
    return create_app(settings, comps)


@pytest.mark.parametrize("max_k, max_candidates, max_pairs", [(7, 33, 44), (100, 1000, 1000)])
def test_openapi_states_the_limits_of_the_settings(max_k, max_candidates, max_pairs):
    schema = TestClient(_app(max_k=max_k, max_candidates=max_candidates, max_pairs=max_pairs)).get("/openapi.json")
    schemas = schema.json()["components"]["schemas"]
    k = schemas["RecommendRequest"]["properties"]["k"]
    assert k["maximum"] == max_k and k["default"] == min(10, max_k)
    candidates = schemas["RecommendRequest"]["properties"]["candidate_item_ids"]["anyOf"]
    assert [b["maxItems"] for b in candidates if b.get("type") == "array"] == [max_candidates]
    assert schemas["ScoreRequest"]["properties"]["pairs"]["maxItems"] == max_pairs


def test_the_stated_limits_are_the_enforced_ones():
    with TestClient(_app(max_k=7, max_candidates=9, max_pairs=3)) as client:
        items = [f"i{j}" for j in range(9)]
        r = client.post("/v1/recommend", json={"user_id": "u1", "candidate_item_ids": items})
        assert r.status_code == 200 and len(r.json()["items"]) == 7  # the omitted k is the stated default, 7
        assert client.post("/v1/recommend", json={"user_id": "u1", "k": 7, "candidate_item_ids": items}).is_success
        for body in ({"user_id": "u1", "k": 8}, {"user_id": "u1", "candidate_item_ids": [*items, "one-more"]}):
            r = client.post("/v1/recommend", json=body)
            assert r.status_code == 422
            assert ValidationProblem.model_validate(r.json()).detail[0].type == "too_large"
        pairs = [{"user_id": "u1", "item_id": i} for i in items[:4]]
        assert client.post("/v1/score", json={"pairs": pairs[:3]}).is_success
        assert client.post("/v1/score", json={"pairs": pairs}).status_code == 422


def test_a_whole_number_k_is_the_integer_json_schema_says_it_is():
    with TestClient(_app()) as client:
        r = client.post("/v1/recommend", json={"user_id": "u1", "k": 2.0, "candidate_item_ids": ["a", "b", "c"]})
        assert r.status_code == 200 and len(r.json()["items"]) == 2
        for k in (2.5, "2", True):
            r = client.post("/v1/recommend", json={"user_id": "u1", "k": k, "candidate_item_ids": ["a"]})
            assert r.status_code == 422, k


EXPECTED_ERRORS = {
    ("post", "/v1/recommend"): {"400", "408", "413", "422", "500", "503", "504"},
    ("post", "/v1/score"): {"400", "408", "413", "422", "500", "503", "504"},
    ("post", "/admin/reload"): {"401", "403", "408", "413", "422", "500", "503"},
    ("get", "/readyz"): {"408", "413", "500", "503"},
    ("get", "/healthz"): {"408", "413", "500"},
    ("get", "/metrics"): {"408", "413", "500"},
    ("get", "/v1/ping"): {"408", "413", "500"},
}


def test_every_operation_declares_each_error_it_can_answer_with_a_model():
    paths = TestClient(_app()).get("/openapi.json").json()["paths"]
    declared = {(m, p): op["responses"] for p, ops in paths.items() for m, op in ops.items()}
    assert set(declared) == set(EXPECTED_ERRORS)
    for operation, responses in declared.items():
        assert {s for s in responses if s[0] in "45"} == EXPECTED_ERRORS[operation], operation
        for status in EXPECTED_ERRORS[operation]:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] in {"Problem", "ValidationProblem", "Readiness"}, (operation, status)


def test_error_answers_have_the_declared_shapes():
    with TestClient(_app(admin_token="a-very-secret-admin-token"), raise_server_exceptions=False) as client:
        not_utf8 = client.post("/v1/score", content=b'{"pairs": "\xff"}', headers={"content-type": "application/json"})
        assert not_utf8.status_code == 400 and Problem.model_validate(not_utf8.json())
        for response in (
            client.post("/v1/recommend", json={"user_id": ""}),
            client.post("/v1/recommend", content=b"{not json", headers={"content-type": "application/json"}),
            client.post("/admin/reload?force=perhaps", headers={"Authorization": "Bearer a-very-secret-admin-token"}),
        ):
            assert response.status_code == 422 and ValidationProblem.model_validate(response.json()).detail
        too_large = client.post("/v1/recommend", content=b"x" * 300_000, headers={"content-type": "application/json"})
        assert too_large.status_code == 413 and Problem.model_validate(too_large.json())


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_load_every_asset_from_the_app_itself(page):
    client = TestClient(_app())
    html = client.get(page)
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    assert not re.search(r"https?://|//cdn", html.text), "the page names a URL outside the app"
    assets = re.findall(r'(?:src|href)="([^"]+)"', html.text) + re.findall(r"url: '([^']+)'", html.text)
    assets += re.findall(r'spec-url="([^"]+)"', html.text)
    kinds = {a.rsplit(".", 1)[-1] for a in assets}
    assert {"js", "json"} <= kinds and (page != "/docs" or "css" in kinds), assets
    for asset in assets:
        r = client.get(urljoin(page, asset))
        assert r.status_code == 200 and len(r.content) > 1000, asset
        expected = {"js": "javascript", "css": "text/css", "json": "application/json", "png": "image/png"}
        assert expected[asset.rsplit(".", 1)[-1]] in r.headers["content-type"], asset
