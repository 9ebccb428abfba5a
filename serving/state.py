"""The app's typed state, and the dependencies that hand it to the routers.

``create_app`` puts one ``ServingState`` on ``app.state.serving``; the lifespan sets its
``running`` once start-up is done (until then the ranking and admin endpoints answer 503
and /readyz says not ready). Routers take what they need through
``Depends`` (``get_state``, ``get_running``), so a test can swap either with
``app.dependency_overrides``. Both are ``async``: FastAPI runs a plain ``def`` dependency in the
thread pool, which cost every ranking request two thread hand-offs for two attribute reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, HTTPException, Request

from core.settings import Settings
from serving.components import Components
from serving.impressions import ImpressionLogger
from serving.metrics import Metrics
from serving.ranker import Ranker
from serving.retrieval import PopularityIndex


@dataclass
class Running:
    """What start-up built; the parts live from the end of start-up to shut-down."""

    components: Components
    ranker: Ranker
    impressions: ImpressionLogger
    index: PopularityIndex


@dataclass
class ServingState:
    """One app's settings and metrics (from ``create_app``) and, once started, what it serves with."""

    settings: Settings
    metrics: Metrics
    running: Running | None = None
    ranking_threads: anyio.CapacityLimiter | None = None  # made in the lifespan (a limiter belongs to one loop)


async def get_state(request: Request) -> ServingState:
    state: ServingState = request.app.state.serving
    return state


State = Annotated[ServingState, Depends(get_state)]


async def get_running(state: State) -> Running:
    """The started parts, or 503 while the app is still starting up."""
    if state.running is None:
        raise HTTPException(503, "starting up")
    return state.running


Started = Annotated[Running, Depends(get_running)]
