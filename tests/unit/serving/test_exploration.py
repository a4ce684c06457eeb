"""Exploration policies: hand-derived propensities, frequencies and slate invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.config import ExplorationConfig
from serving.exploration import Explorer, Slate

# Six candidates; the ranking is deliberately not position order (as after MMR).
LOGITS = np.array([0.5, 2.0, -1.0, 1.0, 0.0, 3.0])
RANKED = np.array([5, 1, 3, 0, 4, 2], dtype=np.int64)


def explorer(**kwargs: object) -> Explorer:
    return Explorer(ExplorationConfig(seed=7, **kwargs))


def assert_valid(slate: Slate, ranked: np.ndarray, k: int) -> None:
    n = min(k, len(ranked))
    assert slate.order.dtype == np.int64 and slate.propensities.dtype == np.float64
    assert slate.order.shape == slate.propensities.shape == (n,)
    assert len(set(slate.order.tolist())) == n
    assert set(slate.order.tolist()) <= set(ranked.tolist())
    assert np.all(slate.propensities > 0) and np.all(slate.propensities <= 1)


def test_none_is_the_ranking_with_propensity_one() -> None:
    slate = explorer(kind="none").choose(LOGITS, RANKED, 3)
    assert slate.order.tolist() == [5, 1, 3]
    assert slate.propensities.tolist() == [1.0, 1.0, 1.0]


def test_epsilon_zero_is_the_ranking_with_propensity_one() -> None:
    chooser = explorer(kind="epsilon", epsilon=0.0)
    for _ in range(20):
        slate = chooser.choose(LOGITS, RANKED, 4)
        assert slate.order.tolist() == [5, 1, 3, 0]
        assert slate.propensities.tolist() == [1.0] * 4


def test_epsilon_one_is_uniform_over_the_pool() -> None:
    # pool 4, k 3: slot propensities 1/4, 1/3, 1/2 whatever is drawn, only pool items shown.
    chooser = explorer(kind="epsilon", epsilon=1.0, pool=4)
    firsts = []
    for _ in range(4000):
        slate = chooser.choose(LOGITS, RANKED, 3)
        assert set(slate.order.tolist()) <= {5, 1, 3, 0}
        assert np.allclose(slate.propensities, [1 / 4, 1 / 3, 1 / 2])
        firsts.append(int(slate.order[0]))
    counts = np.bincount(firsts, minlength=6)[[5, 1, 3, 0]] / len(firsts)
    assert np.allclose(counts, 0.25, atol=0.03)


def test_epsilon_propensity_counts_the_greedy_and_the_random_path() -> None:
    # eps 0.2, pool 3 (k 2 < pool): the best remaining gets 0.8 + 0.2/m, any other 0.2/m.
    chooser = explorer(kind="epsilon", epsilon=0.2, pool=3)
    seen = set()
    for _ in range(500):
        slate = chooser.choose(LOGITS, RANKED, 2)
        first, second = slate.order.tolist()
        assert slate.propensities[0] == pytest.approx(0.8 + 0.2 / 3 if first == 5 else 0.2 / 3)
        best_left = 5 if first != 5 else 1
        assert slate.propensities[1] == pytest.approx(
            0.8 + 0.2 / 2 if second == best_left else 0.2 / 2
        )
        seen.add((first, second))
    assert len(seen) == 6  # every ordered pair of the pool of 3 shows up


def test_epsilon_first_slot_frequency_matches_its_propensity() -> None:
    chooser = explorer(kind="epsilon", epsilon=0.3, pool=3)
    firsts = np.array([chooser.choose(LOGITS, RANKED, 1).order[0] for _ in range(20_000)])
    assert np.mean(firsts == 5) == pytest.approx(0.7 + 0.1, abs=0.01)
    assert np.mean(firsts == 1) == pytest.approx(0.1, abs=0.01)


def test_pool_is_at_least_k() -> None:
    # pool 1 < k 3: the pool widens to the first 3, epsilon 1 gives 1/3, 1/2, 1.
    slate = explorer(kind="epsilon", epsilon=1.0, pool=1).choose(LOGITS, RANKED, 3)
    assert set(slate.order.tolist()) == {5, 1, 3}
    assert np.allclose(slate.propensities, [1 / 3, 1 / 2, 1.0])


def test_softmax_two_candidates_by_hand() -> None:
    # softmax([0, ln 3]) = [0.25, 0.75]; the second slot is then certain.
    logits = np.array([0.0, math.log(3.0)])
    ranked = np.array([1, 0], dtype=np.int64)
    chooser = explorer(kind="softmax", temperature=1.0)
    firsts = []
    for _ in range(20_000):
        slate = chooser.choose(logits, ranked, 2)
        expected = 0.75 if slate.order[0] == 1 else 0.25
        assert slate.propensities[0] == pytest.approx(expected)
        assert slate.propensities[1] == pytest.approx(1.0)
        firsts.append(int(slate.order[0]))
    assert np.mean(np.array(firsts) == 1) == pytest.approx(0.75, abs=0.01)


def test_softmax_temperature_scales_the_logits() -> None:
    # logits [0, 2 ln 3] at temperature 2 are [0, ln 3]: the same 0.75 / 0.25.
    logits = np.array([0.0, 2 * math.log(3.0)])
    slate = explorer(kind="softmax", temperature=2.0).choose(logits, np.array([1, 0]), 1)
    assert slate.propensities[0] == pytest.approx(0.75 if slate.order[0] == 1 else 0.25)


def test_softmax_propensities_by_hand_over_three() -> None:
    # Logits ln[1, 2, 5]: each slot's propensity is the weight over the weights still left.
    weights = np.array([1.0, 2.0, 5.0])
    chooser = explorer(kind="softmax")
    for _ in range(200):
        slate = chooser.choose(np.log(weights), np.array([2, 1, 0]), 3)
        left = weights.sum()
        for position, propensity in zip(slate.order, slate.propensities, strict=True):
            assert propensity == pytest.approx(weights[position] / left)
            left -= weights[position]


def test_softmax_is_stable_on_huge_logits_and_ties() -> None:
    logits = np.array([1000.0, 1000.0, -1000.0])
    slate = explorer(kind="softmax").choose(logits, np.array([0, 1, 2]), 3)
    assert set(slate.order[:2].tolist()) == {0, 1}
    assert np.allclose(slate.propensities, [0.5, 1.0, 1.0])


def test_softmax_only_samples_the_pool() -> None:
    chooser = explorer(kind="softmax", pool=2)
    for _ in range(200):
        slate = chooser.choose(LOGITS, RANKED, 2)
        assert set(slate.order.tolist()) == {5, 1}


def test_softmax_rejects_non_finite_logits() -> None:
    with pytest.raises(ValueError, match="finite"):
        explorer(kind="softmax").choose(np.array([0.0, np.inf]), np.array([0, 1]), 2)


@pytest.mark.parametrize("kind", ["epsilon", "softmax"])
def test_product_of_propensities_is_the_slate_frequency(kind: str) -> None:
    # Pool of 3, k 2: six ordered slates; each one's share of 20k draws is the product of
    # its slot propensities (which are conditional on the slots above).
    chooser = explorer(kind=kind, epsilon=0.4, pool=3)
    counts: dict[tuple[int, ...], int] = {}
    probability: dict[tuple[int, ...], float] = {}
    for _ in range(20_000):
        slate = chooser.choose(LOGITS, RANKED, 2)
        key = tuple(slate.order.tolist())
        counts[key] = counts.get(key, 0) + 1
        probability[key] = float(np.prod(slate.propensities))
    assert len(counts) == 6
    assert sum(probability.values()) == pytest.approx(1.0)
    for key, count in counts.items():
        assert count / 20_000 == pytest.approx(probability[key], abs=0.01)


@pytest.mark.parametrize("kind", ["none", "epsilon", "softmax"])
def test_k_beyond_the_candidates_and_empty_input(kind: str) -> None:
    chooser = explorer(kind=kind, epsilon=0.5)
    slate = chooser.choose(LOGITS, RANKED, 10)
    assert_valid(slate, RANKED, 10)
    assert sorted(slate.order.tolist()) == list(range(6))
    assert slate.propensities[-1] == pytest.approx(1.0)  # the last one left is certain
    empty = chooser.choose(np.empty(0), np.empty(0, np.int64), 5)
    assert empty.order.shape == empty.propensities.shape == (0,)
    assert len(chooser.choose(LOGITS, RANKED, 0)) == 0


def test_ranked_positions_must_index_the_logits() -> None:
    with pytest.raises(ValueError, match="positions"):
        explorer().choose(LOGITS, np.array([0, 6]), 2)


def test_same_seed_same_slates() -> None:
    config = ExplorationConfig(kind="softmax", seed=3)
    a, b = Explorer(config), Explorer(config)
    for _ in range(5):
        assert (
            a.choose(LOGITS, RANKED, 4).order.tolist() == b.choose(LOGITS, RANKED, 4).order.tolist()
        )


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["none", "epsilon", "softmax"]),
    m=st.integers(0, 30),
    k=st.integers(0, 40),
    pool=st.integers(1, 40),
    epsilon=st.floats(0.0, 1.0),
    temperature=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**16),
)
def test_slates_are_distinct_and_sized(
    kind: str, m: int, k: int, pool: int, epsilon: float, temperature: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 5, size=m).round(1)  # rounding makes ties
    ranked = rng.permutation(m).astype(np.int64)
    config = ExplorationConfig(
        kind=kind, epsilon=epsilon, temperature=temperature, pool=pool, seed=seed
    )
    assert_valid(Explorer(config).choose(logits, ranked, k), ranked, k)
