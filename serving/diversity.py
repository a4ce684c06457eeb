"""Maximal marginal relevance (MMR) over reranked candidates, and a list-diversity measure.

:func:`mmr_order` is the greedy re-ordering of :class:`infra.config.DiversityConfig`
(Carbonell and Goldstein, 1998): each slot takes the candidate maximising
``lam * relevance - (1 - lam) * max cosine(candidate, items already chosen)``,
on min-max scaled relevance and the two-tower item vectors.
:func:`intra_list_similarity` reports how alike a shown list is.
"""

from __future__ import annotations

import numpy as np


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` (M, D) scaled to unit L2 norm as float32; all-zero rows stay zero
    (their cosine with anything is then 0)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be (M, D), got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0).astype(np.float32)


def mmr_order(relevance: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> np.ndarray:
    """Greedy MMR: (min(k, M),) int64 candidate positions, first slot first.

    ``relevance`` (M,) float (the calibrated click probability; min-max scaled to
    [0, 1] inside, a constant relevance scales to 0). ``vectors`` (M, D) float32 item
    vectors (cosine on L2-normalised rows; zero rows are similar to nothing).
    ``lam`` in [0, 1]: 1 is the plain ranking, exactly
    ``np.argsort(-relevance, kind="stable")[:k]``; 0 ranks by dissimilarity alone.

    The first slot takes the most relevant candidate (nothing is chosen yet to be
    similar to). Equal MMR scores go to the more relevant candidate, then to the
    earlier position. Cost O(k * M * D): one matrix-vector product per slot
    updates a running max-similarity array.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    relevance = np.asarray(relevance, dtype=np.float64)
    if relevance.ndim != 1:
        raise ValueError(f"relevance must be (M,), got shape {relevance.shape}")
    m = relevance.shape[0]
    unit = unit_rows(vectors) if m else np.empty((0, 0), np.float32)
    if unit.shape[0] != m:
        raise ValueError(f"{m} relevances but {unit.shape[0]} vectors")
    n = max(0, min(k, m))
    order = np.empty(n, np.int64)
    if n == 0:
        return order
    if lam == 1.0:
        return np.argsort(-relevance, kind="stable")[:n].astype(np.int64)
    span = relevance.max() - relevance.min()
    scaled = (relevance - relevance.min()) / span if span > 0 else np.zeros(m)
    chosen = np.zeros(m, bool)
    # The first slot: the most relevant (first of equals); nothing is chosen to resemble yet.
    pick = int(relevance.argmax())
    max_sim = np.full(m, -np.inf)
    for slot in range(n):
        if slot:
            score = lam * scaled - (1.0 - lam) * max_sim
            score[chosen] = -np.inf
            tied = score == score.max()
            # Among equal scores, the most relevant (raw, so scaling cannot merge values),
            # then the earliest position: argmax returns the first maximum.
            pick = int(np.where(tied, relevance, -np.inf).argmax())
        order[slot] = pick
        chosen[pick] = True
        max_sim = np.maximum(max_sim, unit @ unit[pick])
    return order


def intra_list_similarity(vectors: np.ndarray) -> float:
    """Mean cosine similarity over the distinct pairs of a list's ``vectors`` (n, D);
    0.0 for fewer than two items. Lower is a more diverse list."""
    unit = unit_rows(vectors).astype(np.float64)
    n = unit.shape[0]
    if n < 2:
        return 0.0
    gram = unit @ unit.T
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)))
