"""Brute-force search: every item scored, the test oracle of the approximate indexes.

Items are stored sorted by id, so position order is id order and ties in score
go to the smaller id, whatever the chunking (a test derives results by hand).
Scores are one float32 matmul per block of ``(queries, items)``, sized so the
block's score matrix stays under :data:`SCORE_BLOCK_BYTES`; each block keeps
its top ``k`` with ``argpartition`` and the running top ``k`` is merged block
by block, so 1,000 queries against 10M items never hold a 40 GB matrix.
Exclusions are applied exactly, by setting the excluded items' scores to
``-inf`` inside each block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from models.index.base import PAD_ID, CandidateIndex, Excluded, check_ids, check_vectors

# 64 MiB of float32 scores per block: big enough that BLAS runs at full speed,
# small enough for a laptop next to Ray and the trainer.
SCORE_BLOCK_BYTES = 1 << 26
# Queries per block; a smaller query block lets the item block grow instead.
QUERY_BLOCK = 1024
VECTORS_FILE = "vectors.npy"


class ExactIndex(CandidateIndex):
    """Exact top-k by inner product over ``vectors`` (N, D) float32 keyed by ``ids`` (N,).

    ``vectors`` that are already float32, C-contiguous and in id order are kept
    without a copy (1M x 64 is 256 MB): do not modify them afterwards.
    """

    kind = "exact"

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = check_vectors(vectors, "vectors")
        ids = check_ids(ids, len(vectors))
        super().__init__(vectors.shape[1])
        order = np.argsort(ids, kind="stable")
        self._vectors = vectors[order] if not _is_sorted(ids) else vectors
        self._set_ids(ids[order])

    @property
    def vectors(self) -> np.ndarray:
        """``(N, D)`` float32 item vectors in position (= id) order, read-only."""
        view = self._vectors.view()
        view.flags.writeable = False
        return view

    def params(self) -> dict[str, Any]:
        return {}

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        super().add(ids, vectors)
        # Keep id order = position order, which the tie rule relies on.
        if not _is_sorted(self._ids):
            order = np.argsort(self._ids, kind="stable")
            self._vectors = self._vectors[order]
            self._set_ids(self._ids[order])

    # ----------------------------------------------------------------- search

    def _search_positions(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._search_masked(queries, k, None)

    def _search_excluding(
        self, queries: np.ndarray, k: int, excluded: Excluded
    ) -> tuple[np.ndarray, np.ndarray]:
        return self._search_masked(queries, k, excluded)

    def _search_masked(
        self, queries: np.ndarray, k: int, excluded: Excluded | None
    ) -> tuple[np.ndarray, np.ndarray]:
        n_queries, n = len(queries), len(self)
        scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        positions = np.full((n_queries, k), PAD_ID, dtype=np.int64)
        for q0 in range(0, n_queries, QUERY_BLOCK):
            q1 = min(q0 + QUERY_BLOCK, n_queries)
            sub = None if excluded is None else excluded.take(np.arange(q0, q1))
            best_s = np.full((q1 - q0, 0), -np.inf, dtype=np.float32)
            best_p = np.zeros((q1 - q0, 0), dtype=np.int64)
            step = max(k, SCORE_BLOCK_BYTES // (4 * (q1 - q0)))
            for i0 in range(0, n, step):
                i1 = min(i0 + step, n)
                block = _scores(queries[q0:q1], self._vectors[i0:i1])
                if sub is not None:
                    _mask(block, sub, i0, i1)
                s, p = top_k(block, k)
                best_s, best_p = _merge(best_s, best_p, s, p + i0, k)
            width = best_p.shape[1]
            # A masked (excluded) item only fills a slot when nothing else is left: pad it.
            dropped = np.isneginf(best_s)
            scores[q0:q1, :width] = best_s
            positions[q0:q1, :width] = np.where(dropped, PAD_ID, best_p)
        return scores, positions

    # ----------------------------------------------------------------- storage

    def _add_vectors(self, vectors: np.ndarray) -> None:
        self._vectors = np.concatenate([self._vectors, vectors])

    def _vectors_at(self, positions: np.ndarray) -> np.ndarray:
        return self._vectors[positions]

    def _stored_count(self) -> int:
        return len(self._vectors)

    def _save_data(self, folder: Path) -> None:
        np.save(folder / VECTORS_FILE, self._vectors)

    @classmethod
    def _load_data(cls, folder: Path, manifest: dict[str, Any]) -> ExactIndex:
        vectors = check_vectors(np.load(folder / VECTORS_FILE), "saved vectors", manifest["dim"])
        index = cls.__new__(cls)
        CandidateIndex.__init__(index, manifest["dim"])
        index._vectors = vectors
        return index


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``min(k, n)`` per row of ``scores`` (B, n): ``(values, columns)``, best first.

    Ties go to the smaller column, also across the k-th place: ``argpartition``
    picks an arbitrary subset of equal values there, so rows with a tie at the
    boundary take the tied columns in column order instead.
    """
    n_rows, n = scores.shape
    if k >= n:
        cols = np.broadcast_to(np.arange(n, dtype=np.int64), (n_rows, n))
    else:
        cols = np.argpartition(scores, n - k, axis=1)[:, n - k :]
        kth = np.take_along_axis(scores, cols, axis=1).min(axis=1, keepdims=True)
        tied = scores == kth
        rows = np.flatnonzero(tied.sum(axis=1) > 1)
        if rows.size:
            above = scores[rows] > kth[rows]
            need = k - above.sum(axis=1, keepdims=True)
            take = above | (tied[rows] & (np.cumsum(tied[rows], axis=1) <= need))
            cols = cols.copy()
            cols[rows] = np.nonzero(take)[1].reshape(rows.size, k)
    values = np.take_along_axis(scores, cols, axis=1)
    # Sort by score descending, then column ascending (lexsort: last key is primary).
    order = np.lexsort((cols, -values), axis=1)
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(cols, order, axis=1)


def _scores(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``(B, n)`` inner products of ``queries`` (B, D) with ``vectors`` (n, D).

    One query goes through a matrix-vector product: a multi-threaded BLAS GEMM of
    one row waits for its second thread, which on a busy 2-core machine cost
    8 ms against 0.4 ms at 50k items (measured; memory-bound either way at 1M).
    """
    if len(queries) == 1:
        return (vectors @ queries[0])[None, :]
    return queries @ vectors.T


def _merge(
    s0: np.ndarray, p0: np.ndarray, s1: np.ndarray, p1: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of two sorted candidate lists (B, *), ties by smaller position."""
    if s0.shape[1] == 0:
        return s1, p1
    s, p = np.concatenate([s0, s1], axis=1), np.concatenate([p0, p1], axis=1)
    order = np.lexsort((p, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(p, order, axis=1)


def _mask(block: np.ndarray, excluded: Excluded, i0: int, i1: int) -> None:
    """Set the excluded items of positions ``[i0, i1)`` to ``-inf`` in ``block`` (B, i1 - i0)."""
    rows, positions = excluded.rows(), excluded.positions
    inside = (positions >= i0) & (positions < i1)
    block[rows[inside], positions[inside] - i0] = -np.inf


def _is_sorted(ids: np.ndarray) -> bool:
    return bool(ids.size < 2 or np.all(ids[1:] > ids[:-1]))
