"""The FastAPI app: /v1/recommend, /v1/score, health, readiness, metrics, admin reload.

``create_app(settings)`` builds everything at start-up (Feast and MLflow imports included,
so no request pays for them); tests pass ready-made ``Components`` instead. The app itself
is only assembly: typed state on ``app.state.serving`` (``serving.state``), the lifespan
(``serving.lifecycle``), the routers of ``serving.routers``, the error handlers, the
body middleware (size limit, read deadline) and load shedding (``serving.shedding``); the OpenAPI
document states the settings' limits (``serving.openapi``) and /docs, /redoc work offline.
"""

from __future__ import annotations

import logging
import uuid
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from core.settings import Settings
from serving.components import Components
from serving.lifecycle import Builder, lifespan
from serving.metrics import Metrics
from serving.middleware import BodyLimit
from serving.openapi import state_limits
from serving.routers import admin, health, recommend
from serving.schemas import ANY_REQUEST_ERRORS
from serving.shedding import Gate, LoadShed
from serving.state import ServingState
from serving.wiring import build_components

log = logging.getLogger(__name__)


def create_app(settings: Settings, components: Components | None = None, builder: Builder | None = None) -> FastAPI:
    state = ServingState(settings=settings, metrics=Metrics())

    def run(app: FastAPI) -> AbstractAsyncContextManager[None]:
        return lifespan(state, components, builder or build_components)

    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from the app (a package's files), not from a CDN
    app = FastAPIOffline(
        title="recsys serving",
        version="1",
        lifespan=run,
        description="Ranks items for users with the champion model, parameters from the nearest "
        "replica and features from the online store; logs every served list.",
        responses=ANY_REQUEST_ERRORS,
        exception_handlers={Exception: _internal, RequestValidationError: _invalid},
        swagger_ui_parameters={"validatorUrl": None},  # no online validator badge: nothing leaves the machine
    )
    app.state.serving = state
    app.include_router(recommend.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    state_limits(app, settings.serving)
    app.add_middleware(BodyLimit, limit=settings.serving.max_body_bytes, read_timeout_s=settings.serving.body_timeout_s)
    # added last, so outermost: a shed request costs no body read and no parsing
    app.add_middleware(
        LoadShed,
        gate=Gate(settings.serving.max_in_flight),
        metrics=state.metrics,
        retry_after_s=settings.serving.shed_retry_after_s,
    )
    return app


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    # the trace goes to our log, never to the client
    ref = uuid.uuid4().hex
    log.exception("internal error %s on %s", ref, request.url.path)
    return JSONResponse({"detail": "internal error", "request_id": ref}, status_code=500)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)
