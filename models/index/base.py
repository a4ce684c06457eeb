"""The candidate-index interface shared by the exact oracle and the Faiss indexes.

An index holds item embeddings, ``(N, D)`` float32, scored against queries by
inner product (the two-tower's embeddings are L2-normalised, so this is the
cosine). Items carry int64 external ids, any distinct non-negative values (an
item vocabulary's ids, not necessarily ``0..N-1``); ``-1`` is the padding id.

Inside, every index keeps its items at positions ``0..N-1`` in insertion order
(``_ids[p]`` is the external id at position ``p``); subclasses search in
positions and this class turns them into ids, validates every input and
applies exclusions, so the contract below holds for every kind:

* ``search(queries, k, exclude)`` returns ``(scores, ids)``, each ``(B, k)``,
  best first; when fewer than ``k`` items are eligible the tail is padded with
  score ``-inf`` and id ``-1``.
* ``exclude`` drops given item ids per query (the user's seen items) and still
  returns ``k`` results when the catalogue has them: an approximate index
  searches ``k`` plus (the number of that query's excluded ids present, rounded
  up to a power of two) and filters, so one heavy user does not widen every
  query of the batch.
* Bad input (wrong shape or width, non-float vectors, NaN or inf, ``k <= 0``,
  duplicate or negative ids) raises ``ValueError`` naming the problem.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

PAD_ID = -1
MANIFEST = "manifest.json"
IDS_FILE = "ids.npy"
# Bumped when the on-disk layout changes; load refuses other versions.
FORMAT_VERSION = 1


class CsrLike(Protocol):
    """Anything with CSR arrays, row ``r``'s ids at ``indices[indptr[r]:indptr[r+1]]``.

    :class:`models.metrics.UserItems` and a SciPy CSR matrix both qualify.
    """

    indptr: np.ndarray
    indices: np.ndarray


# Per query, item ids to drop: one collection per query row (None or empty: none),
# a CSR object, or a plain ``(indptr, indices)`` tuple (a tuple is always read as CSR).
Exclude = CsrLike | tuple[np.ndarray, np.ndarray] | Sequence[Iterable[int] | np.ndarray | None]


@dataclass(frozen=True)
class Excluded:
    """Exclusions resolved to index positions: row ``r`` drops ``positions[indptr[r]:indptr[r+1]]``.

    ``indptr`` ``(B + 1,)`` int64; ``positions`` int64, sorted and distinct per row,
    only positions that exist in the index (unknown ids are ignored).
    """

    indptr: np.ndarray
    positions: np.ndarray

    def counts(self) -> np.ndarray:
        """``(B,)`` excluded positions per row."""
        return np.diff(self.indptr)

    def rows(self) -> np.ndarray:
        """``(nnz,)`` the row of each excluded position."""
        return np.repeat(np.arange(self.indptr.size - 1, dtype=np.int64), self.counts())

    def take(self, rows: np.ndarray) -> Excluded:
        """The exclusions of ``rows`` (a subset of query rows, in that order)."""
        counts = self.counts()[rows]
        indptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        if indptr[-1] == 0:
            return Excluded(indptr, np.zeros(0, dtype=np.int64))
        starts = self.indptr[rows]
        # Gather each row's slice without a Python loop: offset inside the row + its start.
        within = np.arange(indptr[-1], dtype=np.int64) - np.repeat(indptr[:-1], counts)
        return Excluded(indptr, self.positions[np.repeat(starts, counts) + within])


# --------------------------------------------------------------------------- validation


def check_vectors(vectors: Any, name: str, dim: int | None = None) -> np.ndarray:
    """``vectors`` as a C-contiguous ``(n, D)`` float32 array, or ``ValueError`` saying why.

    Float16/32/64 are accepted (cast to float32); integers, booleans and objects
    are not (an id array passed as vectors is a bug, not data).
    """
    array = np.asarray(vectors)
    if array.ndim != 2:
        hint = " (one query: pass queries[None])" if array.ndim == 1 else ""
        raise ValueError(f"{name} must be 2-d (n, D), got shape {array.shape}{hint}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be a float array, got dtype {array.dtype}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name} have width {array.shape[1]} but the index has dim {dim}")
    if array.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column, got shape {array.shape}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise ValueError(f"{name} contain NaN or inf (first in row {bad})")
    return array


def check_ids(ids: Any, n: int) -> np.ndarray:
    """``ids`` as ``(n,)`` int64, distinct and non-negative, or ``ValueError`` saying why."""
    array = np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"ids must be 1-d, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {array.dtype}")
    if array.size != n:
        raise ValueError(f"got {array.size} ids for {n} vectors")
    array = np.ascontiguousarray(array, dtype=np.int64)
    if array.size and array.min() < 0:
        raise ValueError(f"ids must be >= 0 (-1 is the padding id), got {array.min()}")
    if np.unique(array).size != array.size:
        values, counts = np.unique(array, return_counts=True)
        raise ValueError(f"ids must be distinct; repeated: {values[counts > 1][:5].tolist()}")
    return array


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _exclusion_csr(exclude: Exclude, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """``exclude`` in any accepted form as ``(indptr (B + 1,), ids)`` int64 arrays."""
    if isinstance(exclude, tuple) or hasattr(exclude, "indptr"):
        indptr, ids = exclude if isinstance(exclude, tuple) else (exclude.indptr, exclude.indices)  # type: ignore[union-attr]
        indptr = np.asarray(indptr, dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64)
        if indptr.ndim != 1 or indptr.size != n_queries + 1:
            raise ValueError(
                f"exclude CSR indptr must have {n_queries + 1} entries (queries + 1), "
                f"got shape {indptr.shape}"
            )
        if indptr[0] != 0 or indptr[-1] != ids.size or np.any(np.diff(indptr) < 0):
            raise ValueError("exclude CSR indptr must rise from 0 to len(indices)")
        return indptr, ids
    rows = list(exclude)
    if len(rows) != n_queries:
        raise ValueError(f"exclude has {len(rows)} rows for {n_queries} queries")
    parts = [np.zeros(0, np.int64) if r is None else np.fromiter(r, np.int64) for r in rows]
    indptr = np.zeros(n_queries + 1, dtype=np.int64)
    np.cumsum([p.size for p in parts], out=indptr[1:])
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return indptr, ids


# --------------------------------------------------------------------------- interface


class CandidateIndex(ABC):
    """Top-k inner-product search over item embeddings, keyed by external int64 ids."""

    kind: ClassVar[str]

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self._dim = int(dim)
        self._ids = np.zeros(0, dtype=np.int64)
        # Sorted copy of the ids and its positions, for id -> position lookups.
        self._sorted_ids = self._ids
        self._sorted_pos = self._ids

    # ----------------------------------------------------------------- public

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ids(self) -> np.ndarray:
        """``(N,)`` int64 external ids in position order (read-only view)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return int(self._ids.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(count={len(self)}, dim={self.dim}, {self.params()})"

    def search(
        self, queries: np.ndarray, k: int, exclude: Exclude | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` items per query: ``(scores (B, k) float32, ids (B, k) int64)``, best first.

        ``queries`` ``(B, D)`` float. ``exclude``: per query, ids never to return
        (see :data:`Exclude`). Slots without an eligible item hold ``-inf`` / ``-1``.
        """
        queries = check_vectors(queries, "queries", self.dim)
        k = check_k(k)
        excluded = None if exclude is None else self.resolve_exclude(exclude, len(queries))
        if len(queries) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        if excluded is None or excluded.positions.size == 0:
            scores, positions = self._search_positions(queries, k)
        else:
            scores, positions = self._search_excluding(queries, k, excluded)
        return self._finish(scores, positions)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Index new items (cold-start items arrive after the build): ``ids`` (n,), ``vectors`` (n, D)."""
        vectors = check_vectors(vectors, "vectors", self.dim)
        ids = check_ids(ids, len(vectors))
        if ids.size == 0:
            return
        known = self.positions_of(ids) >= 0
        if known.any():
            raise ValueError(f"ids already indexed: {ids[known][:5].tolist()}")
        self._add_vectors(vectors)
        self._set_ids(np.concatenate([self._ids, ids]))

    def positions_of(self, ids: np.ndarray) -> np.ndarray:
        """``(n,)`` int64 position of each id, ``-1`` for ids not in the index."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._sorted_ids.size == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        at = np.searchsorted(self._sorted_ids, ids).clip(max=self._sorted_ids.size - 1)
        return np.where(self._sorted_ids[at] == ids, self._sorted_pos[at], -1)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """``(n, D)`` float32 stored vectors of ``ids`` (n,); zero rows for ids not indexed."""
        positions = self.positions_of(np.asarray(ids, dtype=np.int64).reshape(-1))
        out = np.zeros((positions.size, self.dim), dtype=np.float32)
        known = positions >= 0
        if known.any():
            out[known] = self._vectors_at(positions[known])
        return out

    def resolve_exclude(self, exclude: Exclude, n_queries: int) -> Excluded:
        """``exclude`` as sorted, distinct positions per query; ids not indexed are dropped."""
        indptr, ids = _exclusion_csr(exclude, n_queries)
        rows = np.repeat(np.arange(n_queries, dtype=np.int64), np.diff(indptr))
        positions = self.positions_of(ids)
        keep = positions >= 0
        rows, positions = rows[keep], positions[keep]
        # Sort by (row, position) and drop repeats so counts are exact.
        order = np.lexsort((positions, rows))
        rows, positions = rows[order], positions[order]
        if rows.size:
            fresh = np.ones(rows.size, dtype=bool)
            fresh[1:] = (rows[1:] != rows[:-1]) | (positions[1:] != positions[:-1])
            rows, positions = rows[fresh], positions[fresh]
        out = np.zeros(n_queries + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n_queries), out=out[1:])
        return Excluded(out, positions)

    def save(self, folder: Path) -> None:
        """Write the index into ``folder`` (created): its data files, then ``manifest.json``.

        The manifest is written last, so a folder with one holds a complete index;
        callers that publish atomically save into a staging folder and rename it.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / IDS_FILE, self._ids)
        self._save_data(folder)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "count": len(self),
            "params": self.params(),
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> CandidateIndex:
        """An index saved by :meth:`save` of this kind (:func:`models.index.load_index` picks the kind)."""
        manifest = read_manifest(folder)
        if manifest["kind"] != cls.kind:
            raise ValueError(f"{folder} holds a {manifest['kind']!r} index, not {cls.kind!r}")
        ids = np.load(Path(folder) / IDS_FILE)
        index = cls._load_data(Path(folder), manifest)
        index._set_ids(check_ids(ids, ids.size))
        if len(index) != manifest["count"] or index._stored_count() != len(index):
            raise ValueError(
                f"{folder}: manifest says {manifest['count']} items, ids.npy has {len(index)}, "
                f"the data has {index._stored_count()}"
            )
        return index

    # ----------------------------------------------------------------- for subclasses

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The build and search parameters, as written into the manifest."""

    @abstractmethod
    def _search_positions(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` of validated ``queries`` (B, D): ``(scores (B, k), positions (B, k))``.

        Missing results are position ``-1`` (their score is ignored).
        """

    @abstractmethod
    def _add_vectors(self, vectors: np.ndarray) -> None:
        """Append validated ``vectors`` (n, D) at positions ``len(self)..len(self)+n-1``."""

    @abstractmethod
    def _vectors_at(self, positions: np.ndarray) -> np.ndarray:
        """``(n, D)`` float32 vectors stored at valid ``positions`` (n,)."""

    @abstractmethod
    def _stored_count(self) -> int:
        """Vectors held by the underlying structure (checked against the ids on load)."""

    @abstractmethod
    def _save_data(self, folder: Path) -> None: ...

    @classmethod
    @abstractmethod
    def _load_data(cls, folder: Path, manifest: dict[str, Any]) -> CandidateIndex:
        """The index without its ids (``load`` sets them)."""

    def _search_excluding(
        self, queries: np.ndarray, k: int, excluded: Excluded
    ) -> tuple[np.ndarray, np.ndarray]:
        """Over-fetch and filter: rows grouped by their excluded count rounded up to 2^j."""
        counts = excluded.counts()
        extra = np.where(
            counts > 0, 1 << np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64), 0
        )
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        positions = np.full((len(queries), k), PAD_ID, dtype=np.int64)
        for tier in np.unique(extra):
            rows = np.flatnonzero(extra == tier)
            fetch = int(min(k + tier, max(len(self), 1)))
            s, p = self._search_positions(queries[rows], fetch)
            sub = excluded.take(rows)
            # Pack (row, position) into one int64 key so one isin tests every pair.
            n = max(len(self), 1)
            keys = np.arange(rows.size, dtype=np.int64)[:, None] * n + p
            dropped = np.isin(keys, sub.rows() * n + sub.positions) | (p < 0)
            # Stable sort on the drop flag keeps the kept results in score order.
            order = np.argsort(dropped, axis=1, kind="stable")[:, :k]
            s = np.take_along_axis(s, order, axis=1)
            p = np.where(
                np.take_along_axis(dropped, order, axis=1),
                PAD_ID,
                np.take_along_axis(p, order, axis=1),
            )
            width = p.shape[1]
            scores[rows, :width] = s
            positions[rows, :width] = p
        return scores, positions

    def _set_ids(self, ids: np.ndarray) -> None:
        self._ids = ids
        self._sorted_pos = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._sorted_pos]

    def _finish(self, scores: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        missing = positions < 0
        ids = (
            np.where(missing, PAD_ID, self._ids[np.where(missing, 0, positions)])
            if len(self)
            else np.full_like(positions, PAD_ID)
        )
        scores = np.where(missing, -np.inf, scores).astype(np.float32, copy=False)
        return scores, ids.astype(np.int64, copy=False)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a saved index, checked for the fields every kind needs."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{folder} holds no saved index ({MANIFEST} missing)")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    for key in ("kind", "dim", "count", "params"):
        if key not in manifest:
            raise ValueError(f"{path} lacks {key!r}")
    return manifest
