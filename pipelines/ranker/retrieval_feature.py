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


@torch.no_grad()
def retrieval_scores(
    model: TwoTowerModel, frame: pl.DataFrame, history_length: int, chunk: int = 65_536
) -> np.ndarray:
    """(N,) float64 inner products of each row's user and item vectors; NaN for unknown ids.

    ``frame`` needs ``user_id``, ``item_id`` and ``user_history`` (``list[i64]``,
    may be null). Ids at or past the model's ``n_users`` / ``n_items`` (entities
    newer than the model) get NaN; history ids past ``n_items`` are dropped.
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
    scores = np.full(frame.height, np.nan)
    index = np.flatnonzero(known)
    for start in range(0, index.size, chunk):
        rows = index[start : start + chunk]
        user_vectors = model.user_tower(
            torch.from_numpy(users[rows]), torch.from_numpy(history[rows])
        )
        item_vectors = model.item_tower(torch.from_numpy(items[rows]))
        scores[rows] = (user_vectors * item_vectors).sum(dim=1).double().numpy()
    return scores


def with_retrieval_score(
    frame: pl.DataFrame, model: TwoTowerModel, history_length: int
) -> pl.DataFrame:
    """``frame`` plus a Float64 ``retrieval_score`` column (null for unknown ids)."""
    scores = retrieval_scores(model, frame, history_length)
    return frame.with_columns(pl.Series(RETRIEVAL_SCORE, scores, dtype=pl.Float64).fill_nan(None))


def with_retrieval_feature(spec: FeatureSpec, train: pl.DataFrame) -> FeatureSpec:
    """``spec`` plus the ``retrieval_score`` feature, standardised by ``train``'s scores."""
    scores = train.get_column(RETRIEVAL_SCORE).drop_nulls()
    mean = float(scores.mean() or 0.0) if scores.len() else 0.0
    std = float(scores.std() or 0.0) if scores.len() > 1 else 0.0
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
