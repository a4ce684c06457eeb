"""Approximate indexes on Faiss: HNSW graphs and inverted lists with exact re-ranking.

Faiss holds the vectors at positions ``0..N-1`` (its own sequential labels);
:class:`models.index.base.CandidateIndex` maps them to the external ids, so no
``IndexIDMap`` is needed and exclusions can be tested as packed integers.

* :class:`HnswIndex`: ``IndexHNSWFlat`` (inner product). Full-precision vectors
  and a graph of degree ``2 * m`` at the bottom layer; search visits about
  ``max(ef_search, k)`` nodes. The fastest single-query search at 1M items, at
  the cost of build time (minutes on 2 cores) and ``~8 * m`` bytes per item
  for the graph.
* :class:`IvfIndex`: ``IndexIVFScalarQuantizer`` (8 bits per dimension)
  wrapped in ``IndexRefineFlat``: ``nprobe`` of ``nlist`` lists are scanned on
  the 1-byte codes (a quarter of the memory traffic of floats), and the best
  ``refine_factor * k`` are re-scored exactly against the stored float
  vectors, so the returned scores are exact. No graph to build: it trains
  (k-means of the lists) and adds in about half HNSW's time at 1M items and
  scales linearly, the choice for very large catalogues. 8-bit PQ codes were
  measured too: same recall after refinement, slower batch search, and PQ
  training took a minute even on 20k items; 4-bit fast-scan PQ lost recall.

Batches run on Faiss's OpenMP pool (Faiss parallelises over queries); a single
query runs on the calling thread alone (see ``_search_positions``), so serving
needs no thread setting.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from models.index.base import PAD_ID, CandidateIndex, check_ids, check_vectors

FAISS_FILE = "index.faiss"
# Faiss k-means warns below 39 training points per list. The k-means of the lists
# is most of an IVF build, and 40 per list gave the same recall as 64 at 1M items.
MIN_POINTS_PER_LIST = 39
TRAIN_POINTS_PER_LIST = 40
# Vectors added per faiss call: bounds the temporary copies on a 10M-item add.
ADD_CHUNK = 1 << 18


class _FaissIndex(CandidateIndex):
    """The parts both Faiss kinds share: search, add, save and load of ``self._index``."""

    _index: Any

    def _search_positions(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self) == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full(
                (len(queries), k), PAD_ID, np.int64
            )
        if len(queries) > 1:
            return self._index.search(queries, k)
        # One query: Faiss would still open an OpenMP team, whose wake-up on a busy
        # machine cost 20% at p50 and 40% at p99 (HNSW, 100k items, 2 cores). The
        # thread count is a per-thread OpenMP setting, so concurrent callers are unaffected.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self._index.search(queries, k)
        finally:
            faiss.omp_set_num_threads(threads)

    def _add_vectors(self, vectors: np.ndarray) -> None:
        for start in range(0, len(vectors), ADD_CHUNK):
            self._index.add(vectors[start : start + ADD_CHUNK])

    def _vectors_at(self, positions: np.ndarray) -> np.ndarray:
        # Both kinds keep the float vectors (HNSW's flat storage, IVF's refine index): exact.
        return self._index.reconstruct_batch(positions)

    def _stored_count(self) -> int:
        return int(self._index.ntotal)

    def _save_data(self, folder: Path) -> None:
        faiss.write_index(self._index, str(folder / FAISS_FILE))


class HnswIndex(_FaissIndex):
    """HNSW graph over ``vectors`` (N, D) keyed by ``ids`` (N,).

    ``m``: neighbours per node (``2 * m`` on the bottom layer); ``ef_construction``:
    candidate list while inserting; ``ef_search``: candidate list while searching,
    the recall / latency knob, settable after build (Faiss sizes the list to
    ``max(ef_search, k)`` but stops after ``ef_search`` steps: keep it ``>= k``).
    """

    kind = "hnsw"

    def __init__(
        self,
        ids: np.ndarray,
        vectors: np.ndarray,
        m: int = 16,
        ef_construction: int = 100,
        ef_search: int = 128,
    ) -> None:
        vectors = check_vectors(vectors, "vectors")
        ids = check_ids(ids, len(vectors))
        if m < 2 or ef_construction < 1 or ef_search < 1:
            raise ValueError(f"need m >= 2, ef >= 1; got m={m}, {ef_construction=}, {ef_search=}")
        super().__init__(vectors.shape[1])
        self._index = faiss.IndexHNSWFlat(self.dim, int(m), faiss.METRIC_INNER_PRODUCT)
        self._index.hnsw.efConstruction = int(ef_construction)
        self._index.hnsw.efSearch = int(ef_search)
        self._add_vectors(vectors)
        self._set_ids(ids)

    @property
    def ef_search(self) -> int:
        return int(self._index.hnsw.efSearch)

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"ef_search must be >= 1, got {value}")
        self._index.hnsw.efSearch = int(value)

    def params(self) -> dict[str, Any]:
        hnsw = self._index.hnsw
        return {
            # The bottom layer holds 2 * M neighbours; M is what the constructor took.
            "m": int(hnsw.nb_neighbors(1)),
            "ef_construction": int(hnsw.efConstruction),
            "ef_search": int(hnsw.efSearch),
        }

    @classmethod
    def _load_data(cls, folder: Path, manifest: dict[str, Any]) -> HnswIndex:
        index = cls.__new__(cls)
        CandidateIndex.__init__(index, manifest["dim"])
        index._index = _read(folder, manifest, faiss.IndexHNSWFlat)
        index.ef_search = int(manifest["params"]["ef_search"])
        return index


class IvfIndex(_FaissIndex):
    """Inverted lists of 8-bit codes over ``vectors`` (N, D), re-ranked exactly; keyed by ``ids``.

    ``nlist`` lists (None: ``4 * sqrt(N)``, capped so each list trains on >= 39
    points), ``nprobe`` lists scanned per query, ``refine_factor * k`` candidates
    re-scored with the float vectors. Training uses a seeded sample of at most
    ``64 * nlist`` vectors; items added later go to the trained lists (retrain,
    i.e. rebuild, when the catalogue has drifted far from the training sample).
    """

    kind = "ivf"

    def __init__(
        self,
        ids: np.ndarray,
        vectors: np.ndarray,
        nlist: int | None = None,
        nprobe: int = 32,
        refine_factor: int = 4,
        seed: int = 0,
    ) -> None:
        vectors = check_vectors(vectors, "vectors")
        ids = check_ids(ids, len(vectors))
        n, dim = vectors.shape
        lists = default_nlist(n) if nlist is None else int(nlist)
        if n < lists * MIN_POINTS_PER_LIST or n == 0:
            raise ValueError(
                f"IVF with {lists} lists needs >= {lists * MIN_POINTS_PER_LIST} items to train, "
                f"got {n} (use the exact or hnsw kind)"
            )
        if nprobe < 1 or refine_factor < 1:
            raise ValueError(
                f"need nprobe >= 1 and refine_factor >= 1; got {nprobe}, {refine_factor}"
            )
        super().__init__(dim)
        quantizer = faiss.IndexFlatIP(dim)
        base = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, lists, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        base.cp.seed = seed
        base.train(_training_sample(vectors, lists * TRAIN_POINTS_PER_LIST, seed))
        self._index = faiss.IndexRefineFlat(base)
        self.nprobe = nprobe
        self.refine_factor = refine_factor
        self._add_vectors(vectors)
        self._set_ids(ids)

    @property
    def nprobe(self) -> int:
        return int(faiss.extract_index_ivf(self._index).nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"nprobe must be >= 1, got {value}")
        faiss.extract_index_ivf(self._index).nprobe = int(value)

    @property
    def refine_factor(self) -> int:
        return round(self._index.k_factor)

    @refine_factor.setter
    def refine_factor(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"refine_factor must be >= 1, got {value}")
        self._index.k_factor = float(value)

    def params(self) -> dict[str, Any]:
        ivf = faiss.extract_index_ivf(self._index)
        return {
            "nlist": int(ivf.nlist),
            "nprobe": self.nprobe,
            "refine_factor": self.refine_factor,
            "codec": "sq8",
        }

    @classmethod
    def _load_data(cls, folder: Path, manifest: dict[str, Any]) -> IvfIndex:
        index = cls.__new__(cls)
        CandidateIndex.__init__(index, manifest["dim"])
        index._index = _read(folder, manifest, faiss.IndexRefineFlat)
        index.nprobe = int(manifest["params"]["nprobe"])
        index.refine_factor = int(manifest["params"]["refine_factor"])
        return index


def default_nlist(n: int) -> int:
    """``4 * sqrt(n)`` lists, at most ``n / 39`` so k-means has enough points per list."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def _training_sample(vectors: np.ndarray, size: int, seed: int) -> np.ndarray:
    """At most ``size`` rows of ``vectors`` (n, D), a seeded sample without replacement."""
    if len(vectors) <= size:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))
    return vectors[rows]


def _read(folder: Path, manifest: dict[str, Any], expected: type) -> Any:
    # read_index returns the concrete class (and owns it; a downcast copy would not).
    index = faiss.read_index(str(folder / FAISS_FILE))
    if not isinstance(index, expected) or index.d != manifest["dim"]:
        raise ValueError(
            f"{folder / FAISS_FILE}: expected a {expected.__name__} of dim {manifest['dim']}, "
            f"got {type(index).__name__} of dim {index.d}"
        )
    return index
