"""Operations: liveness (/healthz), readiness (/readyz), Prometheus metrics (/metrics) and /v1/ping."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.metrics import Metrics
from serving.schemas import Health, Readiness
from serving.state import Running, State

router = APIRouter(tags=["operations"])

_NOT_STARTED = Readiness(
    ready=False,
    model_version=None,
    scorer=None,
    parameter_version=None,
    replicas_healthy=[],
    replica_in_use=None,
    not_ready_reasons=["starting"],
    feature_store=False,
    impressions_buffered=0,
    impressions_dropped=0,
)


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(state: State) -> JSONResponse:
    """Readiness: a model is loaded and at least one parameter replica answers at the version serving needs."""
    running = state.running
    if running is None:
        return JSONResponse(_NOT_STARTED.model_dump(), 503)
    comps = running.components
    scorer = comps.model.current
    reader = comps.rows.reader if comps.rows is not None else None
    healthy = reader.healthy() if reader is not None else []
    behind = reader.behind() if reader is not None else []
    _refresh_gauges(state.metrics, running)
    reasons = []
    if scorer is None:
        reasons.append("model: none loaded" + (f" ({comps.model.last_error})" if comps.model.last_error else ""))
    if reader is None:
        reasons.append("parameter_service: no reader configured")
    elif not any(healthy):
        if any(behind):
            reasons.append(
                f"stale_rows: no replica holds parameter version >= {reader.floor} "
                f"(behind: {[i for i, b in enumerate(behind) if b]}; the others do not answer)"
            )
        else:
            reasons.append("parameter_service: no replica answers")
    ready = not reasons
    body = Readiness(
        ready=ready,
        model_version=scorer.version if scorer else None,
        scorer=scorer.name if scorer else None,
        parameter_version=comps.rows.version if comps.rows is not None else None,
        replicas_healthy=healthy,
        replica_in_use=reader.current if reader is not None else None,
        feature_store=comps.features is not None and comps.features.healthy(),
        impressions_buffered=running.impressions.buffered,
        impressions_dropped=running.impressions.dropped,
        replicas_behind=behind,
        parameter_version_needed=reader.floor if reader is not None else None,
        not_ready_reasons=reasons,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
)
async def prometheus(state: State) -> Response:
    """Prometheus metrics: latency histograms, cache hit rate, replica in use, model version, impressions."""
    if state.running is not None:
        _refresh_gauges(state.metrics, state.running)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/ping", response_model=Health)
async def ping() -> Health:
    """A trivial endpoint (the baseline of the serving benchmark: framework overhead only)."""
    return Health(status="ok")


def _refresh_gauges(metrics: Metrics, running: Running) -> None:
    """The gauges read at scrape time (replicas, parameter version, impression buffer, retrieval size)."""
    rows = running.components.rows
    if rows is not None:
        reader = rows.reader
        metrics.replica_in_use.set(reader.current if reader.current is not None else -1)
        for i, ok in enumerate(reader.healthy()):
            metrics.replica_healthy.labels(str(i)).set(1 if ok else 0)
        metrics.failovers.set(getattr(reader, "failovers", 0))
        if rows.version is not None:
            metrics.parameter_version.set(rows.version)
    metrics.impressions_buffered.set(running.impressions.buffered)
    metrics.retrieval_items.set(len(running.index))
