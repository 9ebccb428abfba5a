"""The OpenAPI document as this app serves it: with the request limits of its own settings.

The request models (``serving.schemas``) carry only the widest bounds the settings allow; the limits
in force (``RECSYS_SERVING_MAX_K``, ``_MAX_CANDIDATES``, ``_MAX_PAIRS``) are the app's settings, checked
by the routers, and written into the schema here, so that a client (or schemathesis) reads the real ones.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from core.settings import ServingSettings


def state_limits(app: FastAPI, limits: ServingSettings) -> None:
    """Make ``app``'s /openapi.json state ``limits`` (the document is built once, on its first request)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _write_limits(build()["components"]["schemas"], limits)  # build() caches the dict we edit
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema


def _write_limits(schemas: dict[str, Any], limits: ServingSettings) -> None:
    recommend = schemas["RecommendRequest"]["properties"]
    recommend["k"]["maximum"] = limits.max_k
    recommend["k"]["default"] = min(recommend["k"]["default"], limits.max_k)
    recommend["k"]["description"] = f"how many items to return, at most {limits.max_k} (RECSYS_SERVING_MAX_K)"
    _array(recommend["candidate_item_ids"])["maxItems"] = limits.max_candidates
    recommend["candidate_item_ids"]["description"] += (
        f"; at most {limits.max_candidates} (RECSYS_SERVING_MAX_CANDIDATES)"
    )
    pairs = schemas["ScoreRequest"]["properties"]["pairs"]
    pairs["maxItems"] = limits.max_pairs
    pairs["description"] = f"(user, item) pairs to score, at most {limits.max_pairs} (RECSYS_SERVING_MAX_PAIRS)"


def _array(prop: dict[str, Any]) -> dict[str, Any]:
    """The array branch of an optional list (pydantic writes ``anyOf: [array, null]``)."""
    return next(branch for branch in prop.get("anyOf", [prop]) if branch.get("type") == "array")
