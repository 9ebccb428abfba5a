"""Request and response models of the recommendation API (the OpenAPI schema comes from these)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from feature_repo.contract import EXPLOIT, Policy


def _encodable(value: str) -> str:
    # JSON can smuggle lone surrogates into a str; ids are hashed and logged as UTF-8, so refuse them here
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("id is not valid Unicode (lone surrogate)") from None
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
    k: Annotated[int, Field(ge=1, le=10_000, description="how many items to return")] = 10
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
    detail: str
    request_id: str | None = None
