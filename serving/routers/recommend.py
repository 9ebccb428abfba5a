"""Ranking: /v1/recommend (the top k of a user's candidates, logged as impressions) and /v1/score.

A share of recommend requests (``RECSYS_SERVING_EXPLORE_SHARE``) shows a random list instead of the
top k (``serving.exploration``); every impression logs its propensity and the policy that chose it.

The ranking itself is blocking (feature store, parameter reader), so it runs in the thread
pool and the event loop stays free. The limits ``max_k``, ``max_candidates`` and ``max_pairs`` come from
the settings (read per request, so a test may swap them) and answer 422 like a schema error; the
OpenAPI document states the app's own (``serving.openapi``). Both endpoints
sit behind load shedding (``serving.shedding``): 503 with ``Retry-After`` when too many
requests are in flight, 504 when the ranking has not finished by the request's deadline.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import orjson
from fastapi import APIRouter, HTTPException, Request, Response

from feature_repo.contract import impression_event
from serving.metrics import Metrics
from serving.ranker import Ranking
from serving.schemas import (
    BODY_ERRORS,
    Problem,
    RecommendRequest,
    RecommendResponse,
    ScoreRequest,
    ScoreResponse,
)
from serving.shedding import DeadlineExpired, run_with_deadline
from serving.state import Started, State

T = TypeVar("T")

router = APIRouter(
    tags=["ranking"],
    responses={
        **BODY_ERRORS,
        503: {
            "model": Problem,
            "description": "too many requests in flight (retry after `Retry-After` seconds), or still starting up",
            "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
        },
        504: {"model": Problem, "description": "the ranking did not finish by the request's deadline"},
    },
)


@router.post("/v1/recommend", response_model=RecommendResponse)
async def recommend(request: Request, body: RecommendRequest, state: State, running: Started) -> Response:
    """Rank the candidates (or the retrieval stage's items) for a user; the top k are logged as impressions."""
    started = time.perf_counter()
    limits = state.settings.serving
    # an omitted k is the default, within the limit (the schema states the same default)
    k = body.k if "k" in body.model_fields_set else min(body.k, limits.max_k)
    if k > limits.max_k:
        raise _limit_error(["k"], f"k must be at most {limits.max_k} (got {k})")
    if body.candidate_item_ids is not None and len(body.candidate_item_ids) > limits.max_candidates:
        raise _limit_error(
            ["candidate_item_ids"],
            f"at most {limits.max_candidates} candidates (got {len(body.candidate_item_ids)})",
        )
    ranking = await _in_time(
        request, state, "recommend", started, running.ranker.recommend, body.user_id, k, body.candidate_item_ids
    )
    if ranking.items and running.components.log_impressions:
        running.impressions.log_records(_impression_records(ranking))
    _timed(state.metrics, "recommend", started)
    return _json(
        {
            "request_id": ranking.request_id,
            "user_id": ranking.user_id,
            "model_version": ranking.model_version,
            "items": [{"item_id": i, "score": s, "position": p} for p, (i, s) in enumerate(ranking.items)],
            "cold_start": ranking.cold_start,
            "degraded": bool(ranking.degraded),
            "degraded_reasons": ranking.degraded,
            "retrieval": ranking.retrieval,
            "policy": ranking.policy,
        }
    )


@router.post("/v1/score", response_model=ScoreResponse)
async def score(request: Request, body: ScoreRequest, state: State, running: Started) -> Response:
    """Scores of given (user, item) pairs with the current model; nothing is logged."""
    started = time.perf_counter()
    max_pairs = state.settings.serving.max_pairs
    if len(body.pairs) > max_pairs:
        raise _limit_error(["pairs"], f"at most {max_pairs} pairs (got {len(body.pairs)})")
    users = [p.user_id for p in body.pairs]
    items = [p.item_id for p in body.pairs]
    scored = await _in_time(request, state, "score", started, running.ranker.score_pairs, users, items)
    _timed(state.metrics, "score", started)
    return _json(
        {
            "request_id": uuid.uuid4().hex,
            "model_version": scored.model_version,
            "scores": [
                {"user_id": u, "item_id": i, "score": s} for u, i, s in zip(users, items, scored.scores.tolist())
            ],
            "degraded": bool(scored.degraded),
            "degraded_reasons": scored.degraded,
        }
    )


async def _in_time(
    request: Request, state: State, endpoint: str, started: float, fn: Callable[..., T], *args: object
) -> T:
    """``fn(*args)`` off the event loop, or 504 once the request's deadline has passed (counted per endpoint)."""
    deadline_s = state.settings.serving.request_deadline_s
    submitted = time.perf_counter()

    def timed(*fn_args: object) -> T:
        # from the hand-off to the thread pool until a thread runs it: pool queueing and the interpreter lock
        state.metrics.stage_latency.labels("thread_wait", "wall").observe(time.perf_counter() - submitted)
        return fn(*fn_args)

    try:
        return await run_with_deadline(
            getattr(request.state, "slot", None), deadline_s, timed, *args, limiter=state.ranking_threads
        )
    except DeadlineExpired as exc:
        state.metrics.deadline_expired.labels(endpoint).inc()
        _timed(state.metrics, endpoint, started, 504)
        raise HTTPException(504, str(exc)) from None


def _json(body: object) -> Response:
    """The answer serialised by orjson as it is: FastAPI would validate the model again and serialise it slowly.

    The dict carries exactly the fields of the route's response model (RecommendResponse, ScoreResponse),
    which the OpenAPI document states; tests/serving/test_api.py checks answers against it (schemathesis).
    """
    return Response(orjson.dumps(body), media_type="application/json")


def _limit_error(field_loc: list[str], message: str) -> HTTPException:
    # the shape of every 422 (serving.schemas.ValidationProblem); the schema states the same limit
    return HTTPException(422, detail=[{"type": "too_large", "loc": ["body", *field_loc], "msg": message}])


def _timed(metrics: Metrics, endpoint: str, started: float, status: int = 200) -> None:
    metrics.request_latency.labels(endpoint, str(status)).observe(time.perf_counter() - started)


def _impression_records(ranking: Ranking) -> list[tuple[bytes, bytes]]:
    """The served list as contract ``impression`` records (key = user id), serialised without a model round trip.

    Every field is already valid by construction (ids validated by the request schema,
    features from the spec's encoders); test_serving_integration parses them back with
    ``parse_event`` to keep this honest.
    """
    now = time.time()
    key = ranking.user_id.encode()
    out = []
    for position, (item_id, _) in enumerate(ranking.items):
        event = impression_event(
            event_id=f"{ranking.request_id}-{position}",
            timestamp=now,
            request_id=ranking.request_id,
            user_id=ranking.user_id,
            item_id=item_id,
            position=position,
            model_version=ranking.model_version,
            features=ranking.features[item_id],
            propensity=ranking.propensities[position],
            policy=ranking.policy,
        )
        out.append((key, orjson.dumps(event)))
    return out
