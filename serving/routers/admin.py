"""Admin: /admin/reload, behind a bearer token (RECSYS_SERVING_ADMIN_TOKEN; without one the endpoints are off)."""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException
from starlette.concurrency import run_in_threadpool

from serving.model import NoChampion
from serving.schemas import INVALID_REQUEST, Problem, ReloadResponse
from serving.state import Started, State

log = logging.getLogger(__name__)


async def require_admin(
    state: State,
    authorization: Annotated[str | None, Header(description="Bearer <serving admin token>")] = None,
) -> None:
    """403 while no admin token is configured; 401 unless the request carries it as a bearer token."""
    token = state.settings.serving.admin_token
    if not token:
        raise HTTPException(403, "admin endpoints are disabled (RECSYS_SERVING_ADMIN_TOKEN is not set)")
    scheme, _, given = (authorization or "").partition(" ")
    # constant-time comparison: the answer's timing must not tell how much of a guess was right
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "a valid admin bearer token is required", headers={"WWW-Authenticate": "Bearer"})


router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin)])


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    responses={
        **INVALID_REQUEST,
        401: {"model": Problem, "description": "no valid admin bearer token"},
        403: {"model": Problem, "description": "admin endpoints are disabled (no RECSYS_SERVING_ADMIN_TOKEN)"},
        503: {"model": Problem, "description": "still starting up, no champion, or the new version failed to load"},
    },
)
async def reload(running: Started, force: bool = False) -> ReloadResponse:
    """Load the model the alias points at now (swapped atomically; requests in flight finish on the old one)."""
    model = running.components.model
    try:
        changed, previous = await run_in_threadpool(model.reload, force)
    except NoChampion as exc:
        raise HTTPException(503, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a broken model version must not take the server down
        log.exception("reload failed")
        raise HTTPException(503, f"reload failed: {type(exc).__name__}: {str(exc)[:200]}") from None
    current = model.current
    if current is None:  # reload either loads a scorer or raises; kept for the type checker's sake
        raise HTTPException(503, "no model loaded")
    return ReloadResponse(changed=changed, model_version=current.version, previous_version=previous)
