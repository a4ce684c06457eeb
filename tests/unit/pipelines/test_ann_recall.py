"""pipelines.embedding_checks.ann_recall: the live index against exact search over its vectors."""

from __future__ import annotations

import numpy as np

from infra.config import EmbeddingCheckConfig, IndexConfig
from models.index import CandidateIndex, build_index
from pipelines.embedding_checks import ann_recall


def _index(
    config: IndexConfig, items: int = 3_000, dim: int = 16
) -> tuple[CandidateIndex, np.random.Generator]:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(items, dim)).astype(np.float32)
    return build_index(np.arange(items, dtype=np.int64), vectors, config, 0), rng


def test_a_healthy_hnsw_passes_on_at_most_the_configured_queries() -> None:
    index, rng = _index(IndexConfig(kind="hnsw"))
    queries = rng.normal(size=(300, 16)).astype(np.float32)
    settings = EmbeddingCheckConfig(ann_queries=120, ann_min_recall=0.9)
    verdict = ann_recall(index, queries, 50, settings, seed=0)
    assert verdict.judged and not verdict.drifted
    assert verdict.statistic is not None and verdict.statistic >= 0.9
    assert verdict.details == {"k": 50, "queries": 120}


def test_a_starved_ivf_fails_and_k_is_capped_at_the_index_size() -> None:
    index, rng = _index(IndexConfig(kind="ivf", ivf_nlist=64, ivf_nprobe=1, refine_factor=1))
    queries = rng.normal(size=(80, 16)).astype(np.float32)
    verdict = ann_recall(index, queries, 50, EmbeddingCheckConfig(ann_min_recall=0.9), seed=0)
    assert verdict.judged and verdict.drifted and verdict.statistic < 0.9
    small, _ = _index(IndexConfig(kind="hnsw"), items=30)
    assert ann_recall(small, queries, 50, EmbeddingCheckConfig(), seed=0).details["k"] == 30
