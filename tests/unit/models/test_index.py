"""Candidate index: the exact oracle by hand, Faiss kinds against it, the shared contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import models.index.exact as exact_module
from infra.config import IndexConfig
from models.index import (
    CandidateIndex,
    EmbeddingMixture,
    ExactIndex,
    HnswIndex,
    IvfIndex,
    build_index,
    build_index_with_report,
    choose_kind,
    load_index,
    measure_recall,
    recall_queries,
)
from models.metrics import UserItems

# Four items in 2-d with ids that are neither 0..N-1 nor sorted.
#   id 30: (1, 0)    id 10: (0, 1)    id 20: (1, 0)    id 40: (0.6, 0.8)
# Query (1, 0) scores 30 -> 1, 10 -> 0, 20 -> 1, 40 -> 0.6: ranking 20, 30 (tie, smaller
# id first), 40, 10. Query (0, 1) scores 0, 1, 0, 0.8: ranking 10, 40, 20, 30.
HAND_IDS = np.array([30, 10, 20, 40])
HAND_VECTORS = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], dtype=np.float32)
HAND_QUERIES = np.array([[1, 0], [0, 1]], dtype=np.float32)

N_ITEMS, DIM = 20_000, 32


def brute_force(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Top-k ids per query by sorting every score: (score desc, id asc)."""
    scores = queries @ vectors.T
    order = np.lexsort((np.broadcast_to(ids, scores.shape), -scores), axis=1)
    return ids[order[:, :k]]


@pytest.fixture(scope="module")
def catalogue() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids (N,), vectors (N, D) from a seeded mixture, queries (200, D) from the same mixture."""
    mixture = EmbeddingMixture.random(n_clusters=141, dim=DIM, spread=1.0, seed=0)
    ids = np.arange(N_ITEMS, dtype=np.int64) * 3 + 7
    return ids, mixture.sample(N_ITEMS, seed=1), mixture.sample(200, seed=2)


@pytest.fixture(scope="module")
def oracle(catalogue: tuple[np.ndarray, np.ndarray, np.ndarray]) -> ExactIndex:
    ids, vectors, _ = catalogue
    return ExactIndex(ids, vectors)


@pytest.fixture(scope="module")
def approximate(
    catalogue: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> dict[str, CandidateIndex]:
    """HNSW (small build parameters: this is a test) and IVF over the catalogue."""
    ids, vectors, _ = catalogue
    return {
        "hnsw": HnswIndex(ids, vectors, m=16, ef_construction=64, ef_search=64),
        "ivf": IvfIndex(ids, vectors, nlist=128, nprobe=16, refine_factor=4),
    }


# --------------------------------------------------------------------------- exact, by hand


def test_exact_by_hand_with_ties_by_id() -> None:
    index = ExactIndex(HAND_IDS, HAND_VECTORS)
    scores, ids = index.search(HAND_QUERIES, 3)
    assert ids.tolist() == [[20, 30, 40], [10, 40, 20]]
    assert scores == pytest.approx(np.array([[1, 1, 0.6], [1, 0.8, 0]], dtype=np.float32))
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert len(index) == 4 and index.dim == 2 and index.kind == "exact"


def test_exact_pads_when_k_exceeds_the_catalogue() -> None:
    scores, ids = ExactIndex(HAND_IDS, HAND_VECTORS).search(HAND_QUERIES[:1], 6)
    assert ids.tolist() == [[20, 30, 40, 10, -1, -1]]
    assert np.isneginf(scores[0, 4:]).all()


def test_exact_blocks_equal_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    # Few distinct values, so ties straddle the k-th place and the block boundaries.
    rng = np.random.default_rng(0)
    vectors = rng.integers(-2, 3, (1_000, 4)).astype(np.float32)
    ids = rng.permutation(5_000)[:1_000]
    queries = rng.integers(-2, 3, (7, 4)).astype(np.float32)
    expected = brute_force(ids, vectors, queries, 25)
    # 4 KiB blocks: 7 queries x 146 items per block, seven item blocks.
    monkeypatch.setattr(exact_module, "SCORE_BLOCK_BYTES", 4096)
    monkeypatch.setattr(exact_module, "QUERY_BLOCK", 3)
    _, ids_found = ExactIndex(ids, vectors).search(queries, 25)
    assert ids_found.tolist() == expected.tolist()


def test_exact_matches_brute_force_on_the_catalogue(
    catalogue: tuple[np.ndarray, np.ndarray, np.ndarray], oracle: ExactIndex
) -> None:
    ids, vectors, queries = catalogue
    _, found = oracle.search(queries[:20], 10)
    assert found.tolist() == brute_force(ids, vectors, queries[:20], 10).tolist()


# --------------------------------------------------------------------------- exclusion


def test_exclusion_by_hand_in_every_form() -> None:
    index = ExactIndex(HAND_IDS, HAND_VECTORS)
    # Query 0 drops 20 and an unknown id; query 1 drops 10 and 40.
    sets = [{20, 999}, [10, 40]]
    csr = (np.array([0, 2, 4]), np.array([20, 999, 10, 40]))
    rows = UserItems(np.array([0, 2, 4]), np.array([20, 999, 10, 40]))
    for exclude in (sets, csr, rows):
        _, ids = index.search(HAND_QUERIES, 2, exclude=exclude)
        assert ids.tolist() == [[30, 40], [20, 30]]
    # Excluding all but one item leaves one result and padding.
    scores, ids = index.search(HAND_QUERIES[:1], 2, exclude=[[10, 20, 30]])
    assert ids.tolist() == [[40, -1]]
    assert scores[0, 0] == pytest.approx(0.6) and np.isneginf(scores[0, 1])


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_exclusion_still_returns_k(
    kind: str,
    catalogue: tuple[np.ndarray, np.ndarray, np.ndarray],
    oracle: ExactIndex,
    approximate: dict[str, CandidateIndex],
) -> None:
    _, _, queries = catalogue
    # Each query drops its own exact top 40, and query 0 drops nothing: mixed tiers.
    _, top = oracle.search(queries, 40)
    exclude = [None, *top[1:]]
    _, ids = approximate[kind].search(queries, 10, exclude=exclude)
    assert (ids >= 0).all()
    assert not any(np.isin(ids[r], top[r]).any() for r in range(1, len(queries)))
    _, expected = oracle.search(queries, 10, exclude=exclude)
    overlap = np.mean([np.isin(ids[r], expected[r]).mean() for r in range(len(queries))])
    assert overlap >= 0.85


# --------------------------------------------------------------------------- approximate


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_recall_at_10_against_exact(
    kind: str,
    catalogue: tuple[np.ndarray, np.ndarray, np.ndarray],
    oracle: ExactIndex,
    approximate: dict[str, CandidateIndex],
) -> None:
    _, _, queries = catalogue
    assert measure_recall(approximate[kind], oracle, queries, 10) >= 0.9
    scores, ids = approximate[kind].search(queries, 10)
    assert ids.shape == (len(queries), 10) and (ids >= 0).all()
    # Scores are exact inner products (HNSW-Flat; IVF re-ranks), best first.
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    vectors = oracle.vectors[oracle.positions_of(ids)]
    assert scores == pytest.approx(np.einsum("bkd,bd->bk", vectors, queries), abs=1e-5)


def test_measure_recall_of_the_oracle_is_one(
    catalogue: tuple[np.ndarray, np.ndarray, np.ndarray], oracle: ExactIndex
) -> None:
    _, _, queries = catalogue
    assert measure_recall(oracle, oracle, queries[:10], 10) == 1.0


def test_measure_recall_by_hand() -> None:
    # An "index" that only knows ids 10 and 40 finds 1 of query 0's top 2 (20, 30 -> none)
    # and 2 of query 1's top 2 (10, 40): recall (0 + 1) / 2.
    partial = ExactIndex(np.array([10, 40]), HAND_VECTORS[[1, 3]])
    oracle = ExactIndex(HAND_IDS, HAND_VECTORS)
    assert measure_recall(partial, oracle, HAND_QUERIES, 2) == 0.5


def test_hnsw_ef_search_is_settable(approximate: dict[str, CandidateIndex]) -> None:
    index = approximate["hnsw"]
    assert isinstance(index, HnswIndex)
    assert index.params() == {"m": 16, "ef_construction": 64, "ef_search": 64}
    index.ef_search = 100
    assert index.params()["ef_search"] == 100
    index.ef_search = 64


# --------------------------------------------------------------------------- add, save, load


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_add_makes_a_new_item_retrievable(
    kind: str, catalogue: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    ids, vectors, _ = catalogue
    # A fresh, smaller index per kind: add mutates it.
    n = 4_000
    config = IndexConfig(kind=kind, hnsw_m=8, hnsw_ef_construction=32, ivf_nlist=32)  # type: ignore[arg-type]
    index = build_index(ids[:n], vectors[:n], config)
    new = np.zeros((1, DIM), dtype=np.float32)
    new[0, 0] = 1.0
    index.add(np.array([5]), new)
    assert len(index) == n + 1
    scores, found = index.search(new, 3)
    assert found[0, 0] == 5 and scores[0, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"already indexed: \[5\]"):
        index.add(np.array([5]), new)


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_reconstruct_gives_the_stored_vectors_by_id(
    kind: str, tmp_path: Path, catalogue: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    """What serving reads back for MMR and similar items: exact float vectors (both Faiss
    kinds keep them), also for an added item and after a reload; zeros for unknown ids."""
    ids, vectors, _ = catalogue
    n = 4_000
    config = IndexConfig(kind=kind, hnsw_m=8, hnsw_ef_construction=32, ivf_nlist=32)  # type: ignore[arg-type]
    # Ids given in descending order: positions differ from id order for the Faiss kinds.
    index = build_index(ids[:n][::-1].copy(), vectors[:n][::-1].copy(), config)
    index.add(np.array([5]), vectors[n : n + 1])
    index.save(tmp_path / kind)
    asked = np.array([5, ids[0], 6, ids[n - 1]])  # ids are 3i + 7: 6 is none of them
    expected = np.stack([vectors[n], vectors[0], np.zeros(DIM, np.float32), vectors[n - 1]])
    for loaded in (index, load_index(tmp_path / kind)):
        got = loaded.reconstruct(asked)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_save_load_round_trip(
    kind: str,
    tmp_path: Path,
    catalogue: tuple[np.ndarray, np.ndarray, np.ndarray],
    oracle: ExactIndex,
    approximate: dict[str, CandidateIndex],
) -> None:
    _, _, queries = catalogue
    index = oracle if kind == "exact" else approximate[kind]
    index.save(tmp_path / kind)
    loaded = load_index(tmp_path / kind)
    assert type(loaded) is type(index)
    assert (len(loaded), loaded.dim, loaded.params()) == (len(index), index.dim, index.params())
    for exclude in (None, [[int(index.ids[0])]] * len(queries)):
        expected = index.search(queries, 20, exclude=exclude)
        got = loaded.search(queries, 20, exclude=exclude)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])


def test_load_rejects_a_folder_without_an_index(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"manifest\.json missing"):
        load_index(tmp_path)


# --------------------------------------------------------------------------- choice of kind


def test_auto_kind_by_catalogue_size() -> None:
    config = IndexConfig(exact_max_items=100, ivf_min_items=1_000)
    assert [choose_kind(n, config) for n in (0, 100, 101, 999, 1_000)] == [
        "exact",
        "exact",
        "hnsw",
        "hnsw",
        "ivf",
    ]
    assert choose_kind(10, IndexConfig(kind="ivf")) == "ivf"
    vectors = EmbeddingMixture.random(4, 8, seed=0).sample(1_000, seed=1)
    for n, expected in ((100, ExactIndex), (500, HnswIndex), (1_000, IvfIndex)):
        assert type(build_index(np.arange(n), vectors[:n], config)) is expected


def test_build_with_report(catalogue: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids, vectors, queries = catalogue
    config = IndexConfig(
        exact_max_items=1_000, hnsw_m=8, hnsw_ef_construction=32, recall_sample=50, recall_k=10
    )
    index, report = build_index_with_report(ids[:5_000], vectors[:5_000], config, queries=queries)
    assert report.kind == "hnsw" == index.kind
    assert (report.count, report.dim, report.k, report.n_queries) == (5_000, DIM, 10, 50)
    assert 0.5 <= report.recall_at_k <= 1.0 and report.build_s > 0
    assert report.metrics()["index_recall_at_10"] == report.recall_at_k
    _, exact_report = build_index_with_report(ids[:500], vectors[:500], config)
    assert (exact_report.kind, exact_report.recall_at_k) == ("exact", 1.0)


def test_recall_queries_are_unit_and_seeded() -> None:
    vectors = EmbeddingMixture.random(4, 8, seed=0).sample(100, seed=1)
    queries = recall_queries(vectors, 30, seed=3)
    assert queries.shape == (30, 8) and queries.dtype == np.float32
    assert np.linalg.norm(queries, axis=1) == pytest.approx(np.ones(30), abs=1e-5)
    np.testing.assert_array_equal(queries, recall_queries(vectors, 30, seed=3))


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_value_error() -> None:
    index = ExactIndex(HAND_IDS, HAND_VECTORS)
    cases = [
        (lambda: index.search(np.ones((1, 3), np.float32), 2), "width 3 but the index has dim 2"),
        (lambda: index.search(np.ones((1, 2), np.int64), 2), "must be a float array"),
        (lambda: index.search(np.array([[np.nan, 0]], np.float32), 2), "NaN or inf"),
        (lambda: index.search(np.ones(2, np.float32), 2), r"pass queries\[None\]"),
        (lambda: index.search(HAND_QUERIES, 0), "k must be a positive integer"),
        (lambda: index.search(HAND_QUERIES, -1), "k must be a positive integer"),
        (lambda: index.search(HAND_QUERIES, 2.5), "k must be a positive integer"),  # type: ignore[arg-type]
        (lambda: index.search(HAND_QUERIES, 2, exclude=[[1]]), "exclude has 1 rows for 2"),
        (
            lambda: index.search(HAND_QUERIES, 2, exclude=(np.array([0, 1]), np.array([1]))),
            "indptr must have 3 entries",
        ),
        (lambda: ExactIndex(np.array([1, 1]), HAND_VECTORS[:2]), r"repeated: \[1\]"),
        (lambda: ExactIndex(np.array([-1, 2]), HAND_VECTORS[:2]), "ids must be >= 0"),
        (lambda: ExactIndex(np.array([1, 2, 3]), HAND_VECTORS[:2]), "3 ids for 2 vectors"),
        (lambda: ExactIndex(np.array([1.0, 2.0]), HAND_VECTORS[:2]), "ids must be integers"),
        (lambda: index.add(np.array([7]), np.ones((1, 2), np.float16) * np.inf), "NaN or inf"),
        (lambda: IvfIndex(HAND_IDS, HAND_VECTORS, nlist=2), "needs >= 78 items"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_float64_input_is_accepted_as_float32() -> None:
    index = ExactIndex(HAND_IDS, HAND_VECTORS.astype(np.float64))
    scores, ids = index.search(HAND_QUERIES.astype(np.float64), 1)
    assert ids.tolist() == [[20], [10]] and scores.dtype == np.float32


def test_empty_index_returns_padding() -> None:
    for index in (
        ExactIndex(np.zeros(0, np.int64), np.zeros((0, 2), np.float32)),
        HnswIndex(np.zeros(0, np.int64), np.zeros((0, 2), np.float32)),
    ):
        scores, ids = index.search(HAND_QUERIES, 2, exclude=[[1], None])
        assert ids.tolist() == [[-1, -1], [-1, -1]] and np.isneginf(scores).all()
