"""Two-stage evaluation: retrieve top-N, rerank the N, judge each order at K.

The serving path is retrieval → rerank; this module measures what the second
stage adds. Per held-out request (one user at one time):

1. :func:`retrieve` — the two-tower's user vector against a candidate index:
   the top ``N`` items (``Candidates``, retrieval order = score order).
2. :func:`candidate_frame` — every candidate featurised as of the request time
   by the offline store's own read (:func:`features.training_frame.build_training_frame`,
   point in time: only events strictly before the request), so the reranker
   sees exactly the columns it was trained on, plus ``retrieval_score`` (the
   first stage's score of the candidate, for a reranker that reads it).
3. :func:`rerank_scores` — the reranker's click logits of the candidates.
4. :func:`two_stage_report` — each order (retrieval, reranked, oracle, any other
   scorer) judged at ``K`` against the request's clicks and against graded
   ground truth, with paired bootstrap CIs of every order minus the baseline.

**Position.** The training frame has a ``position`` context feature (the slot
the item was shown in); a candidate has no slot yet. Every candidate gets
position 0, the top slot: the logged click is ``P(examine | p) * P(relevant)``,
so at one fixed position the model's ranking is its ranking of relevance; the
top slot is where the reranker's choice lands and the position it has seen
most clicks at (the usual "position as a training feature, a constant at
serving" debiasing). A ``label`` of 0.0 is a placeholder the encoder needs; it
is never read.

**Metrics** (per request, then averaged; ``K`` cut-off, order ``o``):

==================================== ===========================================
``{o}_ndcg@K``, ``{o}_recall@K``     against the request's clicked items ``R``
                                     (binary, RecBole's definitions as in
                                     :mod:`models.metrics`: ``IDCG`` over
                                     ``min(|R|, K)`` hits, recall over ``|R|``,
                                     so a click outside the N counts against)
``{o}_true_ndcg@K``                  graded: gain = true relevance of each item;
                                     ``DCG = sum_{j<=K} g_j / log2(j + 1)``
                                     over the ideal order of the *same* N
                                     candidates (the oracle scores 1)
``{o}_global_true_ndcg@K``           the same DCG over the ideal top K of the
                                     whole live catalogue (when given): what
                                     retrieval lost shows here
``{o}_relevance@K``                  mean true relevance of the top K
``{o}_exposed@K``                    share of the top K the logging policy
                                     showed the user (when given): clicks can
                                     only land there (see :func:`exposed_first`)
``{o}_spearman``                     rank correlation of the order's scores
                                     with true relevance within the N
``candidate_recall@N``               share of ``R`` among the N candidates: the
                                     ceiling of any reranker's recall
==================================== ===========================================

Gains are linear (relevance is a probability, not an integer grade, so the
``2^g - 1`` form has no meaning here). Ties in an order's scores keep the
retrieval order (stable sort). ``{o}_minus_{baseline}_{metric}`` holds the
mean per-request difference, ``…_ci95`` its percentile bootstrap CI over
requests (paired: both orders from the same resamples).

The metric part (:func:`two_stage_report` and below) is numpy only; serving
may not import ``pipelines``, so a serving-side check would move it to
``models.metrics`` unchanged.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from features.aggregates import CtrPrior
from features.feature_spec import FeatureSpec
from features.training_frame import build_training_frame
from infra.config import FeaturesConfig
from models.index.base import CandidateIndex, Exclude
from models.metrics import RankingReport, UserItems
from models.moe import Reranker
from models.two_tower import TwoTowerModel
from pipelines.retrieval.loop import user_vectors
from serving.encoding import RETRIEVAL_SCORE, SCORING_POSITION, encode_examples
from serving.scoring import predict

# Column that carries each candidate's place in its request through the featurisation.
_SLOT = "_slot"


@dataclass(frozen=True)
class Candidates:
    """Retrieved candidates: ``user_ids`` (B,) int64, ``items`` and ``scores`` (B, N).

    ``items`` int64 ids in retrieval order (best first), ``scores`` float32 the
    retrieval scores (descending per row).
    """

    user_ids: np.ndarray
    items: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        if self.items.ndim != 2 or self.items.shape != self.scores.shape:
            raise ValueError(
                f"items and scores must both be (B, N), got {self.items.shape}, {self.scores.shape}"
            )
        if self.user_ids.shape != self.items.shape[:1]:
            raise ValueError(
                f"user_ids must be ({self.items.shape[0]},), got {self.user_ids.shape}"
            )

    @property
    def n(self) -> int:
        return int(self.items.shape[1])


# --------------------------------------------------------------------------- stages


@torch.no_grad()
def retrieve(
    model: TwoTowerModel,
    history: torch.Tensor,
    user_ids: np.ndarray,
    index: CandidateIndex,
    n: int,
    exclude: Exclude | None = None,
) -> Candidates:
    """Top ``n`` of ``index`` for each user (B,); ``history`` (U, L) the users' item rows.

    ``history`` holds every user's recent positives as item embedding rows (as
    :func:`pipelines.retrieval.data.recent_history`), up to the request time.
    Raises when a user has fewer than ``n`` eligible items (an N that the
    catalogue cannot fill would make orders incomparable).
    """
    model.eval()
    users = np.asarray(user_ids, dtype=np.int64)
    queries = user_vectors(model, users, history).float().cpu().numpy()
    scores, items = index.search(queries, n, exclude)
    if (items < 0).any():
        raise ValueError(f"fewer than {n} eligible items for some users: lower N")
    return Candidates(users, items, scores)


def candidate_frame(
    candidates: Candidates,
    request_ts: pl.Series,
    events: pl.LazyFrame,
    users: pl.DataFrame,
    items: pl.DataFrame,
    config: FeaturesConfig,
    prior: CtrPrior,
) -> pl.DataFrame:
    """(B * N) rows, request-major in retrieval order, with every feature as of the request.

    ``request_ts`` (B,) the time of each request (``Datetime('us', 'UTC')``);
    ``events`` the log (anything at or after a request's time is ignored for
    it; only the requests' users' and the candidates' events are read); ``prior``
    the training build's smoothing prior. Columns: those of
    :func:`build_training_frame`, ``position`` = :data:`SCORING_POSITION`,
    ``label`` = 0.0 (placeholder), ``request_id`` = the request's row in
    ``candidates``, and :data:`RETRIEVAL_SCORE` (Float64) = each candidate's
    retrieval score (``candidates.scores``): a reranker whose spec lists it as
    a numeric feature reads the first stage's opinion; one whose spec does not
    ignores the column.
    """
    b, n = candidates.items.shape
    if request_ts.len() != b:
        raise ValueError(f"request_ts has {request_ts.len()} values for {b} requests")
    rows = pl.DataFrame(
        {
            "user_id": np.repeat(candidates.user_ids, n),
            "item_id": candidates.items.ravel(),
            "ts": request_ts.cast(pl.Datetime("us", "UTC")).gather(np.repeat(np.arange(b), n)),
            "request_id": np.repeat(np.arange(b, dtype=np.int64), n),
            "position": np.full(b * n, SCORING_POSITION, dtype=np.int64),
            "label": np.zeros(b * n),
        }
    )
    # The user side needs only the requests' users' events and the item side only the
    # candidates' (build_training_frame's sides are per entity): the rest of the log
    # is never read, however long it is.
    user_ids = pl.Series(np.unique(candidates.user_ids)).implode()
    item_ids = pl.Series(np.unique(candidates.items)).implode()
    mine = pl.col("user_id").is_in(user_ids) | pl.col("item_id").is_in(item_ids)
    frame = build_training_frame(rows, events.filter(mine), users, items, config, prior)
    # The frame comes back in canonical (ts, user, request, position, item) order;
    # (request_id, item_id) is unique per candidate, so it finds each row's slot
    # (and its retrieval score: not a column the training frame passes through).
    slots = rows.select(
        "request_id", "item_id", pl.int_range(pl.len(), dtype=pl.Int64).mod(n).alias(_SLOT)
    ).with_columns(
        pl.Series(RETRIEVAL_SCORE, candidates.scores.ravel(), dtype=pl.Float64),
    )
    return (
        frame.join(slots, on=["request_id", "item_id"], how="left")
        .sort("request_id", _SLOT)
        .drop(_SLOT)
    )


def rerank_scores(
    model: Reranker, frame: pl.DataFrame, spec: FeatureSpec, shape: tuple[int, int]
) -> np.ndarray:
    """(B, N) click logits of :func:`candidate_frame`'s rows, encoded by the model's ``spec``."""
    if frame.height != shape[0] * shape[1]:
        raise ValueError(f"{frame.height} candidate rows, expected {shape[0]} x {shape[1]}")
    return predict(model, encode_examples(frame, spec)).reshape(shape)


def first_requests(
    events: pl.DataFrame, day_start: dt.datetime, day_end: dt.datetime
) -> pl.DataFrame:
    """``user_id, ts`` of each user's first impression in ``[day_start, day_end)``, by user id."""
    return (
        events.filter(
            (pl.col("event_type") == "impression")
            & (pl.col("ts") >= day_start)
            & (pl.col("ts") < day_end)
        )
        .group_by("user_id")
        .agg(pl.col("ts").min())
        .sort("user_id")
    )


# --------------------------------------------------------------------------- metrics


def order_of(scores: np.ndarray) -> np.ndarray:
    """(B, N) column indices that sort each row of ``scores`` (B, N) best first; ties stable."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")


def dcg_at_k(gains: np.ndarray, k: int) -> np.ndarray:
    """(B,) ``sum_{j<=k} g_j / log2(j + 1)`` of ``gains`` (B, M) in rank order (M may be < k)."""
    top = np.asarray(gains, dtype=np.float64)[:, :k]
    return top @ (1.0 / np.log2(np.arange(2, top.shape[1] + 2)))


def ndcg_at_k(ranked: np.ndarray, ideal: np.ndarray, k: int) -> np.ndarray:
    """(B,) DCG@k of ``ranked`` (B, N) gains over DCG@k of ``ideal`` (B, M) gains sorted best first.

    ``ideal`` is sorted here (descending per row), so any arrangement of the
    ideal gains will do; a row whose ideal DCG is 0 scores 0.
    """
    best = -np.sort(-np.asarray(ideal, dtype=np.float64), axis=1)
    denominator = dcg_at_k(best, k)
    numerator = dcg_at_k(ranked, k)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _rank_rows(values: np.ndarray) -> np.ndarray:
    """(B, N) 0-based ranks of each row's values (ties by position: fine for floats)."""
    ranks = np.empty(values.shape, dtype=np.float64)
    order = np.argsort(values, axis=1, kind="stable")
    np.put_along_axis(ranks, order, np.arange(values.shape[1], dtype=np.float64)[None, :], axis=1)
    return ranks


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B,) Spearman correlation of each row of ``a`` with the same row of ``b`` (B, N)."""
    ra, rb = _rank_rows(np.asarray(a, np.float64)), _rank_rows(np.asarray(b, np.float64))
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denominator = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    numerator = (ra * rb).sum(axis=1)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


@dataclass(frozen=True)
class TwoStageReport:
    """Means, per-request values and bootstrap CIs of every order (keys: module doc).

    ``per_request`` arrays are (B,) aligned with the candidates' rows;
    ``intervals`` maps a key of ``metrics`` to its 95% CI (means and paired
    differences alike).
    """

    metrics: dict[str, float]
    per_request: dict[str, np.ndarray] = field(repr=False)
    intervals: dict[str, tuple[float, float]]
    n_requests: int
    n_candidates: int
    k: int


def two_stage_report(
    items: np.ndarray,
    orders: Mapping[str, np.ndarray],
    relevance: np.ndarray,
    clicked: UserItems,
    k: int = 10,
    global_ideal: np.ndarray | None = None,
    exposed: np.ndarray | None = None,
    baseline: str = "retrieval",
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> TwoStageReport:
    """Judge every order of the same candidates at ``k`` (module doc for the keys).

    ``items`` (B, N) the candidate ids of each request; ``orders`` name →
    scores (B, N) aligned with ``items`` (higher first; e.g. ``retrieval`` the
    retrieval scores, ``reranked`` the reranker's logits, ``oracle`` the true
    relevance); ``relevance`` (B, N) the graded gain of each candidate;
    ``clicked`` row ``b`` = the items request ``b`` went on to click (B rows,
    none empty); ``global_ideal`` (B, M >= k) the best true gains over the
    whole eligible catalogue, any order; ``exposed`` (B, N) bool the
    candidates the logging policy showed the user in the judged period.
    Differences are ``order - baseline`` per request.
    """
    items = np.asarray(items, dtype=np.int64)
    relevance = np.asarray(relevance, dtype=np.float64)
    b, n = items.shape
    if relevance.shape != (b, n):
        raise ValueError(f"relevance must be {(b, n)}, got {relevance.shape}")
    if clicked.n_users != b:
        raise ValueError(f"clicked has {clicked.n_users} rows for {b} requests")
    n_clicked = clicked.lengths()
    if (n_clicked == 0).any():
        raise ValueError("every request needs at least one clicked item")
    if baseline not in orders:
        raise ValueError(f"baseline {baseline!r} is not among the orders {sorted(orders)}")
    if k < 1 or k > n:
        raise ValueError(f"k must lie in 1..{n}, got {k}")
    if global_ideal is not None and (global_ideal.shape[0] != b or global_ideal.shape[1] < k):
        raise ValueError(f"global_ideal must be ({b}, >= {k}), got {global_ideal.shape}")
    if exposed is not None and exposed.shape != (b, n):
        raise ValueError(f"exposed must be {(b, n)}, got {exposed.shape}")
    hits = membership(items, clicked)
    click_ideal = (np.arange(k)[None, :] < n_clicked[:, None]).astype(np.float64)
    per_request: dict[str, np.ndarray] = {f"candidate_recall@{n}": hits.sum(axis=1) / n_clicked}
    for name, scores in orders.items():
        scores = np.asarray(scores)
        if scores.shape != (b, n):
            raise ValueError(f"order {name!r} has scores {scores.shape}, expected {(b, n)}")
        order = order_of(scores)
        ranked_hits = np.take_along_axis(hits, order, axis=1).astype(np.float64)
        ranked_gains = np.take_along_axis(relevance, order, axis=1)
        per_request[f"{name}_ndcg@{k}"] = ndcg_at_k(ranked_hits, click_ideal, k)
        per_request[f"{name}_recall@{k}"] = ranked_hits[:, :k].sum(axis=1) / n_clicked
        per_request[f"{name}_true_ndcg@{k}"] = ndcg_at_k(ranked_gains, relevance, k)
        if global_ideal is not None:
            per_request[f"{name}_global_true_ndcg@{k}"] = ndcg_at_k(ranked_gains, global_ideal, k)
        per_request[f"{name}_relevance@{k}"] = ranked_gains[:, :k].mean(axis=1)
        if exposed is not None:
            ranked_exposed = np.take_along_axis(exposed, order, axis=1)
            per_request[f"{name}_exposed@{k}"] = ranked_exposed[:, :k].mean(axis=1)
        per_request[f"{name}_spearman"] = spearman_rows(scores, relevance)
    for name in orders:
        if name == baseline:
            continue
        for key in [key for key in per_request if key.startswith(f"{baseline}_")]:
            metric = key.removeprefix(f"{baseline}_")
            per_request[f"{name}_minus_{baseline}_{metric}"] = (
                per_request[f"{name}_{metric}"] - per_request[key]
            )
    metrics = {key: float(values.mean()) for key, values in per_request.items()}
    # Every key from the same resamples of the requests: a difference's CI is paired.
    intervals = RankingReport(metrics, b, per_request).confidence_intervals(level, n_boot, seed)
    return TwoStageReport(
        metrics=metrics,
        per_request=per_request,
        intervals=intervals,
        n_requests=b,
        n_candidates=n,
        k=k,
    )


def membership(items: np.ndarray, sets: UserItems) -> np.ndarray:
    """(B, N) bool: ``items[b, j]`` is one of row ``b``'s items in ``sets`` (B rows)."""
    items = np.asarray(items, dtype=np.int64)
    b = items.shape[0]
    if sets.n_users != b:
        raise ValueError(f"sets has {sets.n_users} rows for {b} requests")
    width = int(max(items.max(initial=0), sets.indices.max(initial=0))) + 1
    row, item = sets.rows(np.arange(b, dtype=np.int64))
    return np.isin(np.arange(b, dtype=np.int64)[:, None] * width + items, row * width + item)


def exposed_first(orders: Mapping[str, np.ndarray], exposed: np.ndarray) -> dict[str, np.ndarray]:
    """Every order's scores (B, N) with the candidates outside ``exposed`` (B, N) bool at -inf.

    Clicks exist only where the logging policy showed an item, so a click-judged
    metric also rewards guessing what the policy shows. Ranked this way, each
    order is judged on the candidates the user was shown only (their relative
    order is the order's own): what is left is how well it orders exposed items.
    """
    return {
        name: np.where(exposed, np.asarray(scores, dtype=np.float64), -np.inf)
        for name, scores in orders.items()
    }
