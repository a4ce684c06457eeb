"""The retrieval score as a reranker input: the two-tower's dot product per example row.

At serving time every candidate arrives with the score Faiss gave it; the
reranker can only learn to use that signal if its training rows carry the
same number. :func:`with_retrieval_score` computes it for an example table
from the trained two-tower: the user tower reads the row's ``user_id`` and its
point-in-time ``user_history`` (the features' recent positives, most recent
last), the item tower the row's ``item_id``; the score is their inner product
(the index's metric). Rows whose ids the model never saw get a null score
(the spec's normalisation then fills the training mean).

**Leakage.** The score is only honest when the two-tower never trained on the
rows the reranker is judged on. A per-user *random* retrieval split trains on
80% of every period's clicks, test period included, so a clicked test
impression would carry an in-sample score: :func:`retrieval_score_problem`
refuses that configuration, and a temporal split with the reranker's own
ratios is required. The reranker's training rows still get in-sample scores
(the two-tower trained on their clicks), which makes it trust the score more
than serving will justify; the step's test metrics, measured on out-of-sample
rows, show what that costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from features.feature_spec import Entity, Feature, FeatureKind, FeatureSpec, Normalization
from infra.config import RayrecConfig
from models.two_tower import PAD, TwoTowerModel
from serving.encoding import RETRIEVAL_SCORE, tail_matrix


def retrieval_score_problem(config: RayrecConfig) -> str | None:
    """Why ``models.ranker.retrieval_score`` cannot be honest under ``config`` (None: it can)."""
    split, ranker = config.models.split, config.models.ranker
    if split.kind != "temporal":
        return (
            f"models.split.kind is {split.kind!r}: the two-tower then trains on clicks of the "
            "reranker's test period; use 'temporal'"
        )
    if tuple(split.ratios) != tuple(ranker.split_ratios) or ranker.split != "temporal":
        return (
            "the reranker must split by time with models.split.ratios "
            f"{tuple(split.ratios)}, got {ranker.split} {tuple(ranker.split_ratios)}"
        )
    return None


@dataclass(frozen=True)
class RowVectors:
    """The two-tower's vectors of example rows: ``user`` and ``item`` (M, D) float32 for the
    rows ``known`` (N,) bool marks (ids the model saw), in row order."""

    user: np.ndarray
    item: np.ndarray
    known: np.ndarray


@torch.no_grad()
def row_vectors(
    model: TwoTowerModel, frame: pl.DataFrame, history_length: int, chunk: int = 65_536
) -> RowVectors:
    """The user vector (id + point-in-time history) and item vector of each row of ``frame``.

    ``frame`` needs ``user_id``, ``item_id`` and ``user_history`` (``list[i64]``,
    may be null). Rows with ids at or past the model's ``n_users`` / ``n_items``
    (entities newer than the model) are left out (``known`` False); history ids
    past ``n_items`` are dropped.
    """
    model.eval()
    n_users, n_items = model.config.n_users, model.config.n_items
    users = frame.get_column("user_id").fill_null(-1).to_numpy().astype(np.int64)
    items = frame.get_column("item_id").fill_null(-1).to_numpy().astype(np.int64)
    # Item embedding rows (id + 1); ids the model never saw pool as padding.
    history = tail_matrix(
        frame.get_column("user_history"),
        history_length,
        lambda ids: ids.to_numpy().astype(np.int64) + 1,
    )
    history[history > n_items] = PAD
    known = (users >= 0) & (users < n_users) & (items >= 0) & (items < n_items)
    index = np.flatnonzero(known)
    dim = model.config.embedding_dim
    user_out = np.zeros((index.size, dim), np.float32)
    item_out = np.zeros((index.size, dim), np.float32)
    for start in range(0, index.size, chunk):
        rows = index[start : start + chunk]
        at = slice(start, start + rows.size)
        user_out[at] = model.user_tower(
            torch.from_numpy(users[rows]), torch.from_numpy(history[rows])
        ).numpy()
        item_out[at] = model.item_tower(torch.from_numpy(items[rows])).numpy()
    return RowVectors(user_out, item_out, known)


def retrieval_scores(model: TwoTowerModel, frame: pl.DataFrame, history_length: int) -> np.ndarray:
    """(N,) float64 inner products of each row's user and item vectors (:func:`row_vectors`);
    NaN for unknown ids."""
    vectors = row_vectors(model, frame, history_length)
    scores = np.full(frame.height, np.nan)
    # float32 products, as the index (Faiss inner product) computes them.
    scores[vectors.known] = (vectors.user * vectors.item).sum(axis=1, dtype=np.float32)
    return scores


def with_retrieval_score(
    frame: pl.DataFrame, model: TwoTowerModel, history_length: int
) -> pl.DataFrame:
    """``frame`` plus a Float64 ``retrieval_score`` column (null for unknown ids)."""
    scores = retrieval_scores(model, frame, history_length)
    return frame.with_columns(pl.Series(RETRIEVAL_SCORE, scores, dtype=pl.Float64).fill_nan(None))


def with_retrieval_feature(spec: FeatureSpec, train: pl.DataFrame | pl.LazyFrame) -> FeatureSpec:
    """``spec`` plus the ``retrieval_score`` feature, standardised by ``train``'s scores
    (a lazy frame is aggregated by a streaming pass, never held whole)."""
    score = pl.col(RETRIEVAL_SCORE).drop_nulls()
    stats = (
        train.lazy()
        .select(score.len().alias("n"), score.mean().alias("mean"), score.std().alias("std"))
        .collect(engine="streaming")
        .row(0, named=True)
    )
    mean = float(stats["mean"] or 0.0) if stats["n"] else 0.0
    std = float(stats["std"] or 0.0) if stats["n"] > 1 else 0.0
    feature = Feature(
        name=RETRIEVAL_SCORE,
        kind=FeatureKind.NUMERIC,
        entity=Entity.CONTEXT,
        dtype="float64",
        normalization=Normalization.STANDARD if std > 0 else Normalization.NONE,
        mean=mean if std > 0 else None,
        std=std if std > 0 else None,
        description="two-tower inner product of the row's user (id + history) and item",
    )
    kept = tuple(f for f in spec.features if f.name != RETRIEVAL_SCORE)
    return spec.model_copy(update={"features": (*kept, feature)})
