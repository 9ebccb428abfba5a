"""Request and response models of the recommendation API (the OpenAPI schema comes from these)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from feature_repo.contract import EXPLOIT, Policy


def _encodable(value: str) -> str:
    # JSON can smuggle lone surrogates into a str; ids are hashed and logged as UTF-8, so refuse them here
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("id is not valid Unicode (lone surrogate)") from None
    return value


def _whole_number(value: object) -> object:
    # JSON Schema's "integer" includes 10.0 (a number with no fraction): take it as 10, as the schema promises;
    # strings stay refused ("3" is not a k)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# the same bounds as the event contract, so every id we accept can be logged as an impression
Id = Annotated[
    str, Field(min_length=1, max_length=256, description="an opaque id, 1-256 characters"), AfterValidator(_encodable)
]


class _Strict(BaseModel):
    # strict: "3" is not a k; forbid: a misspelt field is an error, not silently ignored
    model_config = ConfigDict(strict=True, extra="forbid")


class RecommendRequest(_Strict):
    user_id: Id
    k: Annotated[
        int, Field(ge=1, le=10_000, description="how many items to return"), BeforeValidator(_whole_number)
    ] = 10
    candidate_item_ids: Annotated[list[Id], Field(max_length=100_000)] | None = Field(
        None, description="items to rank; omitted: the retrieval stage supplies popular and recent items"
    )


class ScoredItem(BaseModel):
    item_id: str
    score: float
    position: int


class RecommendResponse(BaseModel):
    request_id: str
    user_id: str
    model_version: str
    items: list[ScoredItem]
    cold_start: bool = Field(False, description="the user has no profile in the feature store")
    degraded: bool = Field(False, description="a dependency failed; the answer is a fallback")
    degraded_reasons: list[str] = Field(default_factory=list)
    retrieval: bool = Field(False, description="candidates came from the retrieval stage")
    policy: Policy = Field(
        EXPLOIT, description="exploit: the greedy top k; explore: a uniformly random list (exploration share)"
    )


class Pair(_Strict):
    user_id: Id
    item_id: Id


class ScoreRequest(_Strict):
    pairs: Annotated[list[Pair], Field(min_length=1, max_length=100_000)]


class PairScore(BaseModel):
    user_id: str
    item_id: str
    score: float


class ScoreResponse(BaseModel):
    request_id: str
    model_version: str
    scores: list[PairScore]
    degraded: bool = False
    degraded_reasons: list[str] = Field(default_factory=list)


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    model_version: str | None
    scorer: str | None
    parameter_version: int | None
    replicas_healthy: list[bool]
    replica_in_use: int | None
    feature_store: bool
    impressions_buffered: int
    impressions_dropped: int
    replicas_behind: list[bool] = Field(
        default_factory=list, description="per replica: skipped, it holds an older version than serving needs"
    )
    parameter_version_needed: int | None = Field(
        None, description="the lowest parameter version serving reads (newest served, champion's rows)"
    )
    not_ready_reasons: list[str] = Field(default_factory=list, description="why not ready (empty when ready)")


class ReloadResponse(BaseModel):
    changed: bool
    model_version: str
    previous_version: str | None


class Problem(BaseModel):
    """Every error answer but 422: what went wrong (and, for a 500, the reference of the trace in our log)."""

    detail: str
    request_id: str | None = None


class FieldError(BaseModel):
    type: str = Field(description="pydantic's error type, or too_large for a limit of the settings")
    loc: list[str | int] = Field(description='where: ["body", "k"], ["query", "force"], ...')
    msg: str


class ValidationProblem(BaseModel):
    """A 422: every field the request got wrong."""

    detail: list[FieldError]


# the error answers, declared where they can happen (tests/serving/test_api.py keeps the declarations honest)
ANY_REQUEST_ERRORS: dict[int | str, dict[str, Any]] = {
    408: {"model": Problem, "description": "the request's body was not received in time (connection closed)"},
    413: {"model": Problem, "description": "the request's body is over RECSYS_SERVING_MAX_BODY_BYTES"},
    500: {"model": Problem, "description": "an unexpected error; `request_id` names its trace in the server log"},
}
INVALID_REQUEST: dict[int | str, dict[str, Any]] = {
    422: {"model": ValidationProblem, "description": "a parameter or body field is invalid or over a limit"}
}
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "the body cannot be read (not UTF-8)"},
    **INVALID_REQUEST,
}
STARTING_UP: dict[int | str, dict[str, Any]] = {503: {"model": Problem, "description": "still starting up"}}
