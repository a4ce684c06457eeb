"""The candidate index: exact search for small catalogues, Faiss above, one interface.

:func:`build_index` picks the kind from :class:`infra.config.IndexConfig`
(``kind``, or for ``auto`` the catalogue size: exact up to ``exact_max_items``,
HNSW below ``ivf_min_items``, IVF-PQ with exact re-ranking from there) through
an explicit mapping. :func:`build_index_with_report` also measures the built
index's recall@K against exact search on sampled queries, the number to log
beside the model (an approximate index that silently lost recall looks like a
worse model). :func:`load_index` reads any kind back from its folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from infra.config import IndexConfig
from models.index.base import CandidateIndex, Exclude, check_k, check_vectors, read_manifest
from models.index.exact import ExactIndex
from models.index.faiss_index import HnswIndex, IvfIndex
from models.index.synthetic import EmbeddingMixture, clustered_embeddings

__all__ = [
    "CandidateIndex",
    "EmbeddingMixture",
    "ExactIndex",
    "Exclude",
    "HnswIndex",
    "IndexReport",
    "IvfIndex",
    "build_index",
    "build_index_with_report",
    "choose_kind",
    "clustered_embeddings",
    "load_index",
    "measure_recall",
    "recall_queries",
]

IndexKind = Literal["exact", "hnsw", "ivf"]
Builder = Callable[[np.ndarray, np.ndarray, IndexConfig, int], CandidateIndex]

_BUILDERS: dict[str, Builder] = {
    "exact": lambda ids, vectors, config, seed: ExactIndex(ids, vectors),
    "hnsw": lambda ids, vectors, config, seed: HnswIndex(
        ids,
        vectors,
        m=config.hnsw_m,
        ef_construction=config.hnsw_ef_construction,
        ef_search=config.hnsw_ef_search,
    ),
    "ivf": lambda ids, vectors, config, seed: IvfIndex(
        ids,
        vectors,
        nlist=config.ivf_nlist,
        nprobe=config.ivf_nprobe,
        refine_factor=config.refine_factor,
        seed=seed,
    ),
}
_CLASSES: dict[str, type[CandidateIndex]] = {
    "exact": ExactIndex,
    "hnsw": HnswIndex,
    "ivf": IvfIndex,
}
# Query noise of the self-check: an item's own vector finds itself first, which
# flatters the index; a perturbed copy lands between items as a user would.
RECALL_QUERY_NOISE = 0.5


@dataclass(frozen=True)
class IndexReport:
    """What a build produced: kind, size, build seconds and recall@k against exact search."""

    kind: str
    count: int
    dim: int
    build_s: float
    recall_at_k: float
    k: int
    n_queries: int
    params: dict[str, Any] = field(default_factory=dict)

    def metrics(self, prefix: str = "index_") -> dict[str, float]:
        """The numbers as a flat metric dict (MLflow-ready)."""
        return {
            f"{prefix}count": float(self.count),
            f"{prefix}build_s": self.build_s,
            f"{prefix}recall_at_{self.k}": self.recall_at_k,
        }


def choose_kind(n_items: int, config: IndexConfig) -> IndexKind:
    """The index kind for ``n_items``: ``config.kind``, or by size when it is ``auto``."""
    if config.kind != "auto":
        return config.kind
    if n_items <= config.exact_max_items:
        return "exact"
    if n_items < config.ivf_min_items:
        return "hnsw"
    return "ivf"


def build_index(
    ids: np.ndarray, vectors: np.ndarray, config: IndexConfig, seed: int = 0
) -> CandidateIndex:
    """An index of ``vectors`` (N, D) float32 keyed by ``ids`` (N,) int64, of the configured kind."""
    return _BUILDERS[choose_kind(len(vectors), config)](ids, vectors, config, seed)


def load_index(folder: Path) -> CandidateIndex:
    """The index saved in ``folder`` by :meth:`CandidateIndex.save`, whatever its kind."""
    kind = read_manifest(folder)["kind"]
    if kind not in _CLASSES:
        raise ValueError(f"{folder}: unknown index kind {kind!r} (known: {sorted(_CLASSES)})")
    return _CLASSES[kind].load(folder)


def measure_recall(
    index: CandidateIndex, oracle: CandidateIndex, queries: np.ndarray, k: int
) -> float:
    """Mean recall@k of ``index`` against ``oracle`` (exact search) over ``queries`` (B, D).

    Per query, the share of the oracle's top ``k`` ids that ``index`` also
    returns in its top ``k`` (a catalogue smaller than ``k`` counts what exists).
    Two items tied in score at the k-th place can make an exact index score
    below 1; with float embeddings such ties practically never happen.
    """
    k = check_k(k)
    queries = check_vectors(queries, "queries", index.dim)
    _, truth = oracle.search(queries, k)
    _, found = index.search(queries, k)
    rows = np.repeat(np.arange(len(queries)), k)
    valid = truth.ravel() >= 0
    if not valid.any():
        return 1.0
    # Packed (query, id code) pairs: one isin over the batch instead of a loop of set
    # intersections; ids are coded 0..C-1 first so the packing cannot overflow.
    codes = np.unique(np.concatenate([truth.ravel(), found.ravel()]), return_inverse=True)[1]
    width = int(codes.max()) + 1
    truth_keys = rows[valid] * width + codes[: truth.size][valid]
    found_keys = rows * width + codes[truth.size :]
    per_query_truth = np.bincount(rows[valid], minlength=len(queries))
    hits = np.bincount(rows[valid][np.isin(truth_keys, found_keys)], minlength=len(queries))
    judged = per_query_truth > 0
    return float(np.mean(hits[judged] / per_query_truth[judged]))


def recall_queries(
    vectors: np.ndarray, n: int, seed: int = 0, noise: float = RECALL_QUERY_NOISE
) -> np.ndarray:
    """``(n, D)`` unit queries: sampled rows of ``vectors`` (N, D) plus Gaussian noise.

    The noise has total norm about ``noise`` (per-dimension std ``noise / sqrt(D)``).
    """
    vectors = check_vectors(vectors, "vectors")
    if len(vectors) == 0:
        raise ValueError("cannot sample queries from an empty catalogue")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(vectors), n)
    dim = vectors.shape[1]
    scale = float(noise / np.sqrt(dim))
    out = vectors[rows] + scale * rng.standard_normal((n, dim), dtype=np.float32)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def build_index_with_report(
    ids: np.ndarray,
    vectors: np.ndarray,
    config: IndexConfig,
    queries: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[CandidateIndex, IndexReport]:
    """:func:`build_index`, timed, and its recall@``config.recall_k`` against exact search.

    ``queries`` (B, D): the queries to check with (e.g. user embeddings), at most
    ``config.recall_sample`` of them sampled; None samples item vectors plus
    noise (:func:`recall_queries`). An exact index is its own oracle (recall 1).
    """
    started = time.perf_counter()
    index = build_index(ids, vectors, config, seed)
    build_s = time.perf_counter() - started
    k = min(config.recall_k, max(len(index), 1))
    if index.kind == "exact" or len(index) == 0:
        recall, n_queries = 1.0, 0
    else:
        if queries is None:
            sample = recall_queries(vectors, config.recall_sample, seed)
        else:
            sample = check_vectors(queries, "queries", index.dim)
            if len(sample) > config.recall_sample:
                rng = np.random.default_rng(seed)
                sample = sample[
                    np.sort(rng.choice(len(sample), config.recall_sample, replace=False))
                ]
        recall = measure_recall(index, ExactIndex(ids, vectors), sample, k)
        n_queries = len(sample)
    report = IndexReport(
        kind=index.kind,
        count=len(index),
        dim=index.dim,
        build_s=build_s,
        recall_at_k=recall,
        k=k,
        n_queries=n_queries,
        params=index.params(),
    )
    return index, report
