"""The FastAPI app: /v1/recommend, /v1/score, health, readiness, metrics, admin reload.

``create_app(settings)`` builds everything at start-up (Feast and MLflow imports included,
so no request pays for them); tests pass ready-made ``Components`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import orjson
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from core.settings import Settings
from serving.features import FeatureSource
from serving.impressions import ImpressionLogger
from serving.metrics import Metrics
from serving.model import ModelHandle, NoChampion
from serving.params import RowFetcher
from serving.ranker import Ranker, Ranking
from serving.retrieval import PopularityIndex, follow_events
from serving.schemas import (
    Health,
    PairScore,
    Problem,
    Readiness,
    RecommendRequest,
    RecommendResponse,
    ReloadResponse,
    ScoredItem,
    ScoreRequest,
    ScoreResponse,
)

log = logging.getLogger(__name__)


@dataclass
class Components:
    """Everything the app serves with; ``build_components`` makes the production set."""

    model: ModelHandle
    rows: RowFetcher | None
    features: FeatureSource | None
    index: PopularityIndex | None = None
    follow_stream: bool = True  # feed ``index`` from the events topic
    log_impressions: bool = True
    close: list[Callable[[], None]] = field(default_factory=list)


class BodyLimit:
    """Reject request bodies over ``limit`` bytes with 413, before any parsing (chunked bodies too)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _too_large(send, self.limit)
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _too_large(send, self.limit)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _too_large(send, limit: int) -> None:
    body = f'{{"detail":"request body exceeds {limit} bytes"}}'.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _limit_error(field_loc: list, message: str, value: object) -> HTTPException:
    return HTTPException(
        422, detail=[{"type": "too_large", "loc": ["body", *field_loc], "msg": message, "input": value}]
    )


def create_app(
    settings: Settings,
    components: Components | None = None,
    builder: Callable[[Settings, Metrics], Components] | None = None,
) -> FastAPI:
    metrics = Metrics()
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        comps = components
        if comps is None:
            from serving.wiring import build_components

            comps = await run_in_threadpool(builder or build_components, settings, metrics)

        def on_swap(scorer, swapped: bool) -> None:
            metrics.model.info({"version": scorer.version, "scorer": scorer.name})
            if swapped:
                metrics.model_reloads.inc()

        comps.model.on_swap = on_swap
        if comps.model.current is None:
            try:
                await run_in_threadpool(comps.model.reload)
            except NoChampion as exc:
                log.warning("%s", exc)
            except Exception as exc:  # noqa: BLE001 - start anyway; /readyz says why not ready
                comps.model.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("initial model load failed: %s", comps.model.last_error)
        else:
            on_swap(comps.model.current, False)
        if comps.rows is not None:
            comps.rows.on_lookup = metrics.row_lookup
            comps.rows.start()
        index = comps.index if comps.index is not None else PopularityIndex(settings.serving.retrieval_half_life_s)
        ranker = Ranker(comps.model, comps.rows, comps.features, index, metrics, settings.serving.retrieval_candidates)
        impressions = ImpressionLogger(
            settings.kafka.bootstrap,
            settings.kafka.topic_events,
            settings.serving.impression_buffer,
            on_sent=metrics.impressions_sent.inc,
            on_dropped=metrics.impressions_dropped.inc,
        )
        if comps.log_impressions:
            impressions.start()
        stop = asyncio.Event()
        tasks = []
        if comps.follow_stream:
            tasks.append(
                asyncio.create_task(
                    follow_events(
                        index,
                        settings.kafka.bootstrap,
                        settings.kafka.topic_events,
                        settings.serving.retrieval_lookback,
                        stop,
                    )
                )
            )
        if settings.serving.reload_poll_s > 0:
            tasks.append(asyncio.create_task(_poll_model(comps.model, settings.serving.reload_poll_s, stop)))
        state.update(components=comps, ranker=ranker, impressions=impressions, index=index)
        try:
            yield
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if comps.log_impressions:
                await impressions.close()
            if comps.rows is not None:
                await run_in_threadpool(comps.rows.close)
            for closer in comps.close:
                closer()

    app = FastAPI(
        title="recsys serving",
        version="1",
        lifespan=lifespan,
        description="Ranks items for users with the champion model, parameters from the nearest "
        "replica and features from the online store; logs every served list.",
        responses={422: {"description": "invalid request"}, 413: {"model": Problem}},
    )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # the trace goes to our log, never to the client
        ref = uuid.uuid4().hex
        log.exception("internal error %s on %s", ref, request.url.path)
        return JSONResponse({"detail": "internal error", "request_id": ref}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    def ranker() -> Ranker:
        if "ranker" not in state:
            raise HTTPException(503, "starting up")
        return state["ranker"]

    def timed(endpoint: str, started: float, status: int = 200) -> None:
        metrics.request_latency.labels(endpoint, str(status)).observe(time.perf_counter() - started)

    @app.post("/v1/recommend", response_model=RecommendResponse, tags=["ranking"], responses={413: {"model": Problem}})
    async def recommend(body: RecommendRequest, r: Ranker = Depends(ranker)) -> RecommendResponse:
        """Rank the candidates (or the retrieval stage's items) for a user; the top k are logged as impressions."""
        started = time.perf_counter()
        if body.k > settings.serving.max_k:
            raise _limit_error(["k"], f"k must be at most {settings.serving.max_k}", body.k)
        if body.candidate_item_ids is not None and len(body.candidate_item_ids) > settings.serving.max_candidates:
            raise _limit_error(
                ["candidate_item_ids"],
                f"at most {settings.serving.max_candidates} candidates",
                len(body.candidate_item_ids),
            )
        ranking = await run_in_threadpool(r.recommend, body.user_id, body.k, body.candidate_item_ids)
        if ranking.items and state["components"].log_impressions:
            state["impressions"].log_records(_impression_records(ranking))
        timed("recommend", started)
        return RecommendResponse(
            request_id=ranking.request_id,
            user_id=ranking.user_id,
            model_version=ranking.model_version,
            items=[ScoredItem(item_id=i, score=s, position=p) for p, (i, s) in enumerate(ranking.items)],
            cold_start=ranking.cold_start,
            degraded=bool(ranking.degraded),
            degraded_reasons=ranking.degraded,
            retrieval=ranking.retrieval,
        )

    @app.post("/v1/score", response_model=ScoreResponse, tags=["ranking"], responses={413: {"model": Problem}})
    async def score(body: ScoreRequest, r: Ranker = Depends(ranker)) -> ScoreResponse:
        """Scores of given (user, item) pairs with the current model; nothing is logged."""
        started = time.perf_counter()
        if len(body.pairs) > settings.serving.max_pairs:
            raise _limit_error(["pairs"], f"at most {settings.serving.max_pairs} pairs", len(body.pairs))
        users = [p.user_id for p in body.pairs]
        items = [p.item_id for p in body.pairs]
        scored = await run_in_threadpool(r.score_pairs, users, items)
        timed("score", started)
        return ScoreResponse(
            request_id=uuid.uuid4().hex,
            model_version=scored.model_version,
            scores=[PairScore(user_id=u, item_id=i, score=float(s)) for u, i, s in zip(users, items, scored.scores)],
            degraded=bool(scored.degraded),
            degraded_reasons=scored.degraded,
        )

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, tags=["operations"], responses={503: {"model": Readiness}})
    async def readyz() -> JSONResponse:
        """Readiness: a model is loaded and at least one parameter replica answers."""
        comps: Components | None = state.get("components")
        if comps is None:
            return JSONResponse(
                Readiness(
                    ready=False,
                    model_version=None,
                    scorer=None,
                    parameter_version=None,
                    replicas_healthy=[],
                    replica_in_use=None,
                    feature_store=False,
                    impressions_buffered=0,
                    impressions_dropped=0,
                ).model_dump(),
                503,
            )
        scorer = comps.model.current
        healthy = comps.rows.reader.healthy() if comps.rows is not None else []
        in_use = comps.rows.reader.current if comps.rows is not None else None
        _refresh_gauges(metrics, comps, state)
        ready = scorer is not None and any(healthy)
        body = Readiness(
            ready=ready,
            model_version=scorer.version if scorer else None,
            scorer=scorer.name if scorer else None,
            parameter_version=comps.rows.version if comps.rows is not None else None,
            replicas_healthy=healthy,
            replica_in_use=in_use,
            feature_store=comps.features is not None and comps.features.healthy(),
            impressions_buffered=state["impressions"].buffered,
            impressions_dropped=state["impressions"].dropped,
        )
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @app.get(
        "/metrics",
        tags=["operations"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
    )
    async def prometheus() -> Response:
        """Prometheus metrics: latency histograms, cache hit rate, replica in use, model version, impressions."""
        comps = state.get("components")
        if comps is not None:
            _refresh_gauges(metrics, comps, state)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/ping", tags=["operations"], response_model=Health)
    async def ping() -> Health:
        """A trivial endpoint (the baseline of the serving benchmark: framework overhead only)."""
        return Health(status="ok")

    def admin(authorization: str | None = Header(None, description="Bearer <serving admin token>")) -> None:
        token = settings.serving.admin_token
        if not token:
            raise HTTPException(403, "admin endpoints are disabled (RECSYS_SERVING_ADMIN_TOKEN is not set)")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "a valid admin bearer token is required", headers={"WWW-Authenticate": "Bearer"})

    @app.post(
        "/admin/reload",
        response_model=ReloadResponse,
        tags=["admin"],
        dependencies=[Depends(admin)],
        responses={401: {"model": Problem}, 403: {"model": Problem}, 503: {"model": Problem}},
    )
    async def reload(force: bool = False) -> ReloadResponse:
        """Load the model the alias points at now (swapped atomically; requests in flight finish on the old one)."""
        comps: Components | None = state.get("components")
        if comps is None:
            raise HTTPException(503, "starting up")
        try:
            changed, previous = await run_in_threadpool(comps.model.reload, force)
        except NoChampion as exc:
            raise HTTPException(503, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a broken model version must not take the server down
            log.exception("reload failed")
            raise HTTPException(503, f"reload failed: {type(exc).__name__}: {str(exc)[:200]}") from None
        return ReloadResponse(changed=changed, model_version=comps.model.current.version, previous_version=previous)

    app.add_middleware(BodyLimit, limit=settings.serving.max_body_bytes)
    app.state.serving = state
    app.state.metrics = metrics
    return app


def _refresh_gauges(metrics: Metrics, comps: Components, state: dict) -> None:
    if comps.rows is not None:
        reader = comps.rows.reader
        metrics.replica_in_use.set(reader.current if reader.current is not None else -1)
        for i, ok in enumerate(reader.healthy()):
            metrics.replica_healthy.labels(str(i)).set(1 if ok else 0)
        metrics.failovers.set(getattr(reader, "failovers", 0))
        if comps.rows.version is not None:
            metrics.parameter_version.set(comps.rows.version)
    metrics.impressions_buffered.set(state["impressions"].buffered)
    if state.get("index") is not None:
        metrics.retrieval_items.set(len(state["index"]))


async def _poll_model(model: ModelHandle, every_s: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=every_s)
            return
        except TimeoutError:
            pass
        try:
            await run_in_threadpool(model.reload)
        except Exception as exc:  # noqa: BLE001 - keep serving the current model
            model.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("model poll: %s", model.last_error)


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
        sparse, dense = ranking.features[item_id]
        out.append(
            (
                key,
                orjson.dumps(
                    {
                        "schema_version": 1,
                        "event_type": "impression",
                        "event_id": f"{ranking.request_id}-{position}",
                        "timestamp": now,
                        "request_id": ranking.request_id,
                        "user_id": ranking.user_id,
                        "item_id": item_id,
                        "position": position,
                        "model_version": ranking.model_version,
                        "features": {"sparse": sparse, "dense": dense},
                    }
                ),
            )
        )
    return out
