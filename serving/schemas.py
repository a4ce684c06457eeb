"""Request and response of ``/v1/recommendations``: typed, unknown fields rejected.

Pydantic models, so the coming FastAPI ingress validates bodies with them
(malformed input -> 422 with a JSON detail) and publishes them in its OpenAPI
schema; the in-process :class:`serving.recommender.Recommender` takes and
returns the same objects. Bounds that depend on config (``k <= serving.max_k``)
are checked by the recommender, which knows the config.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# Ids are int64 after encoding (features.schemas): anything outside is malformed input.
INT64_MAX = 2**63 - 1
EntityId = Annotated[int, Field(ge=0, le=INT64_MAX)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Filters(_Strict):
    """Business rules on the answer's items, by the items table's ``category``.

    ``category_in``: only items of these categories (None: any); ``category_out``:
    never items of these. An item without a category fails any ``category_in``.
    """

    category_in: tuple[str, ...] | None = None
    category_out: tuple[str, ...] = ()


class RecommendationRequest(_Strict):
    """One user's request for ``k`` items, minus ``exclude_item_ids`` and what ``filters`` drop."""

    user_id: EntityId
    k: int = Field(default=10, ge=1)
    exclude_item_ids: tuple[EntityId, ...] = ()
    filters: Filters = Filters()


class ScoredItem(_Strict):
    """One recommended item.

    ``score``: the reranker's calibrated click probability (reranked answers),
    the retrieval score (answers in retrieval order), or the item's popularity
    count (fallback answers); ``retrieval_score``: the index's inner product of
    user and item vectors (None in a fallback answer); ``propensity``: the
    probability that the serving policy put this item in this slot given the
    slots above it (1.0 without exploration; see :mod:`serving.exploration`).
    Log it with the impression (``POST /v1/events``) so the policy can be
    evaluated off-line (IPS/SNIPS).
    """

    item_id: int
    score: float
    retrieval_score: float | None = None
    propensity: float = 1.0


class RecommendationResponse(_Strict):
    """The answer: items best first, and how it was produced.

    ``fallback``: popularity instead of personalisation (unknown user);
    ``reranked``: ordered by the reranker (False: retrieval order, the deadline
    was hit before the rerank; also False in a fallback answer); ``degraded``:
    an online-store read failed and defaults were used; ``model_versions``:
    the published version of each model that answered; ``timings_ms``: per
    stage (``features``, ``retrieval``, ``rerank``, ``total``).
    """

    request_id: str
    user_id: int
    items: tuple[ScoredItem, ...]
    fallback: bool
    reranked: bool
    degraded: bool
    model_versions: dict[str, str]
    timings_ms: dict[str, float]
    # Candidates retrieval returned for this answer (0 in a fallback answer).
    candidates: int = 0


class SimilarItemsResponse(_Strict):
    """Items nearest to ``item_id`` by the two-tower's item vectors (inner product), best first."""

    item_id: int
    items: tuple[ScoredItem, ...]
    model_versions: dict[str, str]
