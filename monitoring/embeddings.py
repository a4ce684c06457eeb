"""Embedding drift and ANN health: checks on vectors, not columns.

**Embedding drift** (:func:`embedding_drift`): can a classifier tell the
window's vectors from the reference's? A logistic regression (scikit-learn,
seeded) learns reference-vs-window on half of a balanced sample and is scored
by ROC AUC on the other half; the statistic is ``AUC - 0.5`` (0: the two are
indistinguishable). This is Evidently's default embedding drift method
("model"), here on numpy arrays so the vectors never become DataFrame
columns. Threshold: ``margin`` times the largest leave-one-day-out statistic
of the reference days (the same day-to-day noise the column tests use), and
at least ``floor`` (0.05: AUC 0.55, Evidently's default).

**ANN health** (:func:`ann_health`): recall@k of the live index against exact
search over the index's own vectors, for a sample of the window's queries
(the users' vectors): a drift of the query distribution away from what an
approximate index was tuned on shows as a recall drop. The pipeline runs the
searches; monitoring compares ids (it never imports models).

**The reference** (:class:`EmbeddingReference`): the user and item vectors of
a sample of the reference profile's rows and the day-to-day noise of each,
saved in the profile folder beside ``reference.json``::

    folder/embeddings.npz    user (u, d), item (i, d) float32
    folder/embeddings.json   rows, dim, noise per side, the model that made them;
                             written last (a folder without it has no embeddings)
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from infra.storage import StoragePath
from monitoring.verdict import Verdict, above, not_judged

EMBEDDING_DATA = "embeddings.npz"
EMBEDDING_META = "embeddings.json"
SIDES = ("user", "item")

EMBEDDING_TEST = "classifier_auc"
RECALL_TEST = "recall_vs_exact"


def classifier_distance(
    reference: np.ndarray, current: np.ndarray, seed: int, max_rows: int = 5_000
) -> float:
    """``AUC - 0.5`` of a logistic regression telling ``current`` (m, d) from
    ``reference`` (n, d), on a held-out half of at most ``max_rows`` rows a side."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    size = min(len(reference), len(current), max_rows)
    ref = reference[rng.choice(len(reference), size, replace=False)]
    cur = current[rng.choice(len(current), size, replace=False)]
    x = np.concatenate([ref, cur]).astype(np.float64)
    y = np.concatenate([np.zeros(size), np.ones(size)])
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    half = len(x) // 2
    model = LogisticRegression(max_iter=500)
    model.fit(x[:half], y[:half])
    auc = roc_auc_score(y[half:], model.predict_proba(x[half:])[:, 1])
    # Below 0.5 is noise (the classifier found nothing), not a mirrored drift.
    return max(0.0, float(auc) - 0.5)


def day_noise(vectors: np.ndarray, days: np.ndarray, seed: int, min_days: int = 3) -> float | None:
    """The largest :func:`classifier_distance` of one day's vectors against the other days';
    None with fewer than ``min_days`` days."""
    distinct = np.unique(days)
    if len(distinct) < min_days:
        return None
    return max(
        classifier_distance(vectors[days != day], vectors[days == day], seed + i)
        for i, day in enumerate(distinct)
    )


def embedding_drift(
    name: str,
    reference: np.ndarray,
    current: np.ndarray,
    noise: float | None,
    seed: int,
    margin: float = 2.0,
    floor: float = 0.05,
    min_rows: int = 200,
) -> Verdict:
    """Drift of ``current``'s vectors (m, d) against ``reference``'s (n, d); see the module
    docstring."""
    if min(len(reference), len(current)) < min_rows:
        return not_judged(
            name,
            EMBEDDING_TEST,
            f"{len(reference)} reference and {len(current)} window vectors (needs {min_rows})",
        )
    statistic = classifier_distance(reference, current, seed)
    return above(
        name,
        EMBEDDING_TEST,
        statistic,
        () if noise is None else (noise,),
        margin,
        floor,
        note=f"a classifier tells the window from the reference at AUC {0.5 + statistic:.3f}",
        details={"auc": 0.5 + statistic, "rows": [len(reference), len(current)]},
    )


def ann_health(found: np.ndarray, exact: np.ndarray, min_recall: float) -> Verdict:
    """Recall@k of the live index: ``found`` (B, k) ids it returned for B sampled
    queries, ``exact`` (B, k) the ids exact search over the index's own vectors
    returned (``-1``: an empty slot); drifted below ``min_recall``.

    The pipeline runs both searches (:mod:`models.index`); monitoring sees ids only.
    """
    name = "ann_recall"
    if found.shape != exact.shape:
        raise ValueError(f"found {found.shape} and exact {exact.shape} differ in shape")
    valid = exact >= 0
    if found.size == 0 or not valid.any():
        return not_judged(name, RECALL_TEST, "no queries or an empty index")
    hits = np.array(
        [np.isin(e[e >= 0], f).sum() for f, e in zip(found, exact, strict=True)], dtype=float
    )
    per_query = valid.sum(axis=1)
    judged = per_query > 0
    recall = float(np.mean(hits[judged] / per_query[judged]))
    k = int(found.shape[1])
    return Verdict(
        name,
        RECALL_TEST,
        recall,
        min_recall,
        recall < min_recall,
        True,
        note=f"recall@{k} {recall:.3f} against exact search",
        details={"k": k, "queries": int(judged.sum())},
    )


@dataclass(frozen=True)
class EmbeddingReference:
    """``vectors`` ``{"user": (u, d), "item": (i, d)}`` float32 of the reference period's
    active users and shown items; ``noise`` ``{side: statistic or None}``
    (:func:`day_noise`); ``model`` ``{step: version}`` of the two-tower that made them."""

    vectors: dict[str, np.ndarray]
    noise: dict[str, float | None]
    model: dict[str, str]

    def __post_init__(self) -> None:
        if set(self.vectors) != set(SIDES):
            raise ValueError(
                f"embedding reference needs {SIDES} vectors, got {sorted(self.vectors)}"
            )
        shapes = {side: v.shape for side, v in self.vectors.items()}
        if (
            any(len(shape) != 2 for shape in shapes.values())
            or len({shape[1] for shape in shapes.values()}) != 1
        ):
            raise ValueError(f"user and item vectors must be (n, d) of one d, got {shapes}")

    @property
    def rows(self) -> dict[str, int]:
        return {side: int(v.shape[0]) for side, v in self.vectors.items()}

    @property
    def dim(self) -> int:
        return int(self.vectors["user"].shape[1])

    def save(self, folder: StoragePath) -> None:
        """``embeddings.npz`` then ``embeddings.json``, each atomically."""
        buffer = io.BytesIO()
        np.savez(buffer, **{side: self.vectors[side].astype(np.float32) for side in SIDES})
        folder.join(EMBEDDING_DATA).write_bytes_atomic(buffer.getvalue())
        meta: dict[str, Any] = {
            "rows": self.rows,
            "dim": self.dim,
            "noise": self.noise,
            "model": self.model,
        }
        folder.join(EMBEDDING_META).write_text_atomic(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: StoragePath) -> EmbeddingReference | None:
        """The reference saved in ``folder``; None when none was saved."""
        meta_path = folder.join(EMBEDDING_META)
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        with np.load(io.BytesIO(folder.join(EMBEDDING_DATA).read_bytes())) as data:
            vectors = {side: np.asarray(data[side]) for side in SIDES}
        reference = cls(vectors, dict(meta["noise"]), dict(meta["model"]))
        if reference.rows != meta["rows"] or reference.dim != meta["dim"]:
            raise ValueError(
                f"{folder.join(EMBEDDING_DATA).uri} holds {reference.rows} x {reference.dim} "
                f"vectors, {EMBEDDING_META} says {meta['rows']} x {meta['dim']}"
            )
        return reference
