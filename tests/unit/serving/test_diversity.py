"""MMR ordering and intra-list similarity on hand-made vectors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.diversity import intra_list_similarity, mmr_order, unit_rows

# Two identical vectors (positions 0 and 1) and one orthogonal (2), relevance falling.
TWINS = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
TWIN_RELEVANCE = np.array([0.9, 0.8, 0.5])


def test_lambda_one_is_the_stable_ranking() -> None:
    rng = np.random.default_rng(0)
    relevance = rng.integers(0, 5, size=40).astype(np.float64)  # many ties
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    expected = np.argsort(-relevance, kind="stable")
    assert mmr_order(relevance, vectors, 40, 1.0).tolist() == expected.tolist()
    assert mmr_order(relevance, vectors, 7, 1.0).tolist() == expected[:7].tolist()


def test_orthogonal_item_beats_a_more_relevant_twin() -> None:
    # Scaled relevance [1, 0.75, 0]. Slot 2 at lam 0.5: twin 0.5*0.75 - 0.5*1 = -0.125,
    # orthogonal 0.5*0 - 0.5*0 = 0, so the orthogonal item goes second.
    assert mmr_order(TWIN_RELEVANCE, TWINS, 3, 0.5).tolist() == [0, 2, 1]
    # At lam 0.9 relevance wins: twin 0.9*0.75 - 0.1 = 0.575 > orthogonal 0.
    assert mmr_order(TWIN_RELEVANCE, TWINS, 3, 0.9).tolist() == [0, 1, 2]


def test_lambda_zero_starts_with_the_most_relevant_then_spreads() -> None:
    relevance = np.array([0.1, 0.9, 0.5, 0.3])
    vectors = np.array([[1, 0], [1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    # First: most relevant (1). Then max cosine to {1}: [1, 1, 0, -1] -> 3 (opposite).
    # Then max over {1, 3}: 0 -> 1, 2 -> 0: item 2; item 0 last.
    assert mmr_order(relevance, vectors, 4, 0.0).tolist() == [1, 3, 2, 0]


def test_ties_keep_input_order_and_constant_relevance_is_safe() -> None:
    vectors = np.eye(4, dtype=np.float32)
    assert mmr_order(np.full(4, 0.3), vectors, 4, 0.7).tolist() == [0, 1, 2, 3]


def test_zero_vectors_are_similar_to_nothing() -> None:
    relevance = np.array([0.9, 0.8, 0.1])
    vectors = np.array([[1, 0], [1, 0], [0, 0]], dtype=np.float32)
    # The zero vector has cosine 0 with item 0, like an orthogonal one.
    assert mmr_order(relevance, vectors, 3, 0.5).tolist() == [0, 2, 1]
    assert np.isfinite(unit_rows(vectors)).all()


def test_sizes_and_empty() -> None:
    assert mmr_order(TWIN_RELEVANCE, TWINS, 10, 0.5).shape == (3,)
    assert mmr_order(TWIN_RELEVANCE, TWINS, 0, 0.5).shape == (0,)
    empty = mmr_order(np.empty(0), np.empty((0, 4), np.float32), 5, 0.5)
    assert empty.shape == (0,) and empty.dtype == np.int64


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="lam"):
        mmr_order(TWIN_RELEVANCE, TWINS, 3, 1.5)
    with pytest.raises(ValueError, match="vectors"):
        mmr_order(TWIN_RELEVANCE, TWINS[:2], 3, 0.5)


def test_intra_list_similarity_by_hand() -> None:
    # Pairs: (0,1) = 1, (0,2) = 0, (1,2) = 0 -> mean 1/3.
    assert intra_list_similarity(TWINS) == pytest.approx(1 / 3)
    assert intra_list_similarity(TWINS[:1]) == 0.0
    assert intra_list_similarity(np.array([[2, 0], [-3, 0]], dtype=np.float32)) == pytest.approx(
        -1.0
    )


def test_lower_lambda_gives_a_less_similar_list() -> None:
    # Clustered vectors whose relevance favours one cluster: MMR should spread the top 10.
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 16))
    cluster = rng.integers(0, 5, size=200)
    vectors = (centres[cluster] + 0.3 * rng.normal(size=(200, 16))).astype(np.float32)
    relevance = rng.random(200) + (cluster == 0)
    ils = [
        intra_list_similarity(vectors[mmr_order(relevance, vectors, 10, lam)])
        for lam in (1.0, 0.7, 0.3)
    ]
    assert ils[0] > ils[1] > ils[2]


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(0, 25),
    d=st.integers(1, 6),
    k=st.integers(0, 30),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_positions_are_distinct_and_sized(m: int, d: int, k: int, lam: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    relevance = rng.random(m).round(1)
    vectors = rng.integers(-1, 2, size=(m, d)).astype(np.float32)  # zeros and duplicates
    order = mmr_order(relevance, vectors, k, lam)
    assert order.dtype == np.int64 and order.shape == (min(k, m),)
    assert len(set(order.tolist())) == order.shape[0]
    assert all(0 <= p < m for p in order.tolist())
    if order.shape[0]:
        assert order[0] == int(np.argmax(relevance))
