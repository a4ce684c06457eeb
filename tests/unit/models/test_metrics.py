"""Retrieval metrics: hand-derived numbers, invariants and the bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.metrics import (
    RankingReport,
    UserItems,
    bootstrap_ci,
    full_ranking_metrics,
    sampled_ranking_metrics,
)

# Three users, five items.
#   user 0: train {0}, test {1, 3}; scores [9, 5, 8, 7, 1]. Item 0 scores highest but is a
#           training item, so the ranking is 2, 3, 1, 4: hits at ranks 2 and 3.
#   user 1: train {},  test {4};    scores [1, 2, 3, 4, 5]: ranking 4, 3, 2, 1, 0, hit at rank 1.
#   user 2: train {2}, test {}: not evaluated.
# K=2: user 0 recall 1/2, precision 1/2, hit 1, mrr 1/2,
#          ndcg (1/log2 3) / (1 + 1/log2 3) = 0.386853;
#      user 1 recall 1, precision 1/2, hit 1, mrr 1, ndcg 1.
# K=3: user 0 recall 1, precision 2/3, hit 1, mrr 1/2,
#          ndcg (1/log2 3 + 1/log2 4) / (1 + 1/log2 3) = 0.693426;
#      user 1 recall 1, precision 1/3, hit 1, mrr 1, ndcg 1.
# coverage@2: {2, 3} | {4, 3} = 3 of 5; coverage@3: {2, 3, 1} | {4, 3, 2} = 4 of 5.
TRAIN = UserItems.from_pairs(np.array([0, 2]), np.array([0, 2]), n_users=3)
TEST = UserItems.from_pairs(np.array([0, 0, 1]), np.array([3, 1, 4]), n_users=3)
SCORES = np.array([[9, 5, 8, 7, 1], [1, 2, 3, 4, 5], [0, 0, 0, 0, 0]], dtype=np.float32)
NDCG2_U0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
NDCG3_U0 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))


def _score_rows(users: np.ndarray) -> np.ndarray:
    return SCORES[users]


def test_user_items_from_pairs_dedupes_and_sorts() -> None:
    ui = UserItems.from_pairs(np.array([1, 1, 0, 1]), np.array([5, 2, 7, 5]), n_users=3)
    assert ui.indptr.tolist() == [0, 1, 3, 3]
    assert ui.items_of(1).tolist() == [2, 5]
    assert ui.lengths().tolist() == [1, 2, 0]
    assert ui.n_users == 3
    with pytest.raises(ValueError, match="user indices"):
        UserItems.from_pairs(np.array([3]), np.array([0]), n_users=3)


def test_hand_computed_example() -> None:
    report = full_ranking_metrics(_score_rows, TRAIN, TEST, n_items=5, ks=(2, 3))
    m = report.metrics
    assert report.n_users == 2
    assert report.users.tolist() == [0, 1]
    expected = {
        "recall@2": 0.75,
        "precision@2": 0.5,
        "hit@2": 1.0,
        "mrr@2": 0.75,
        "ndcg@2": (NDCG2_U0 + 1) / 2,
        "recall@3": 1.0,
        "precision@3": 0.5,
        "hit@3": 1.0,
        "mrr@3": 0.75,
        "ndcg@3": (NDCG3_U0 + 1) / 2,
        "coverage@2": 0.6,
        "coverage@3": 0.8,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key
    assert report.per_user["recall@2"].tolist() == [0.5, 1.0]
    assert report.per_user["ndcg@3"] == pytest.approx([NDCG3_U0, 1.0])


def test_popularity_metrics_by_hand() -> None:
    # pop = [50, 30, 10, 6, 4] (100 in all). head_fraction 0.6: item 0 holds 50, items 0-1
    # hold 80 >= 60, so the head is {0, 1}.
    # arp@2: user 0 top {2, 3} -> (10 + 6) / 2 = 8; user 1 {4, 3} -> 5; mean 6.5.
    # test popularity: user 0 {1, 3} -> 18; user 1 {4} -> 4; mean 11 -> arp_ratio@2 = 6.5 / 11.
    # head_share@3: user 0 {2, 3, 1} -> 1/3; user 1 {4, 3, 2} -> 0; mean 1/6.
    pop = np.array([50, 30, 10, 6, 4])
    report = full_ranking_metrics(
        _score_rows, TRAIN, TEST, 5, ks=(2, 3), item_popularity=pop, head_fraction=0.6
    )
    assert report.metrics["arp@2"] == pytest.approx(6.5)
    assert report.metrics["arp_ratio@2"] == pytest.approx(6.5 / 11)
    assert report.metrics["head_share@2"] == 0.0
    assert report.metrics["head_share@3"] == pytest.approx(1 / 6)


def test_default_popularity_counts_training_users() -> None:
    # No item_popularity: pop = [1, 0, 1, 0, 0] from the two training pairs.
    # arp@2: user 0 top {2, 3} -> 1/2, user 1 {4, 3} -> 0.
    report = full_ranking_metrics(_score_rows, TRAIN, TEST, 5, ks=(2,))
    assert report.per_user["arp@2"].tolist() == [0.5, 0.0]


def test_training_items_never_count() -> None:
    # User 0 has item 1 both in train and test; it scores highest but is masked, so it is
    # never a hit, yet it counts in |R(u)| (RecBole's pos_len): recall@1 = 1/2 from item 3.
    train = UserItems.from_pairs(np.array([0]), np.array([1]), n_users=1)
    test = UserItems.from_pairs(np.array([0, 0]), np.array([1, 3]), n_users=1)

    def scores(users: np.ndarray) -> np.ndarray:
        return np.array([[0.0, 10.0, 1.0, 5.0]])

    report = full_ranking_metrics(scores, train, test, 4, ks=(1, 4))
    assert report.metrics["recall@1"] == 0.5
    assert report.metrics["mrr@1"] == 1.0
    # K=4 > the 3 items left: the masked slot is no recommendation (coverage 3 of 4).
    assert report.metrics["coverage@4"] == 0.75
    assert report.metrics["recall@4"] == 0.5


def test_perfect_scorer_scores_one() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items = 50, 200
    users = np.repeat(np.arange(n_users), 8)
    # Distinct items per user, so no test item is also a (masked) training item.
    items = np.concatenate([rng.choice(n_items, 8, replace=False) for _ in range(n_users)])
    train = UserItems.from_pairs(users[::2], items[::2], n_users)
    test = UserItems.from_pairs(users[1::2], items[1::2], n_users)
    truth = np.zeros((n_users, n_items), dtype=np.float32)
    truth[users[1::2], items[1::2]] = 1.0
    report = full_ranking_metrics(lambda u: torch.from_numpy(truth[u]), train, test, n_items)
    for k in (10, 20):
        for name in ("recall", "ndcg", "mrr", "hit"):
            assert report.metrics[f"{name}@{k}"] == pytest.approx(1.0), (name, k)


def test_random_scorer_recall_is_k_over_n_items() -> None:
    rng = np.random.default_rng(1)
    n_users, n_items, k = 2_000, 1_000, 50
    users = np.repeat(np.arange(n_users), 5)
    test = UserItems.from_pairs(users, rng.integers(0, n_items, users.size), n_users)
    train = UserItems.from_pairs(np.zeros(0), np.zeros(0), n_users)
    score_rng = np.random.default_rng(2)
    report = full_ranking_metrics(
        lambda u: score_rng.random((u.size, n_items)), train, test, n_items, ks=(k,)
    )
    assert report.metrics[f"recall@{k}"] == pytest.approx(k / n_items, abs=0.01)
    # Each of the K slots hits one of the user's |R(u)| test items with probability |R(u)| / I.
    expected_precision = float(np.mean(test.lengths()) / n_items)
    assert report.metrics[f"precision@{k}"] == pytest.approx(expected_precision, abs=0.002)


def test_batching_gives_identical_results() -> None:
    rng = np.random.default_rng(3)
    n_users, n_items = 300, 400
    users = np.repeat(np.arange(n_users), 6)
    items = rng.integers(0, n_items, users.size)
    train = UserItems.from_pairs(users[:900], items[:900], n_users)
    test = UserItems.from_pairs(users[900:], items[900:], n_users)
    scores = rng.standard_normal((n_users, n_items)).astype(np.float32)
    before = scores.copy()
    one = full_ranking_metrics(lambda u: scores[u], train, test, n_items, batch_users=10_000)
    small = full_ranking_metrics(lambda u: scores[u], train, test, n_items, batch_users=7)
    # A memory budget of 3 rows of scores (and their masked copy) forces batches of 3.
    tight = full_ranking_metrics(
        lambda u: scores[u], train, test, n_items, max_batch_bytes=3 * 8 * n_items
    )
    np.testing.assert_array_equal(scores, before)  # the caller's scores stay intact
    for other in (small, tight):
        assert other.metrics == one.metrics
        for key, values in one.per_user.items():
            np.testing.assert_array_equal(other.per_user[key], values)


def test_score_shape_and_nan_are_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        full_ranking_metrics(lambda u: np.zeros((u.size, 4)), TRAIN, TEST, 5, ks=(2,))
    with pytest.raises(ValueError, match="NaN"):
        full_ranking_metrics(lambda u: np.full((u.size, 5), np.nan), TRAIN, TEST, 5, ks=(2,))


def test_confidence_interval_contains_the_mean() -> None:
    rng = np.random.default_rng(4)
    per_user = {"recall@10": rng.random(500), "hit@10": (rng.random(500) < 0.3).astype(float)}
    report = RankingReport(
        metrics={k: float(v.mean()) for k, v in per_user.items()}, n_users=500, per_user=per_user
    )
    intervals = report.confidence_intervals(level=0.9, n_boot=400, seed=5)
    for key, (lo, hi) in intervals.items():
        assert lo < report.metrics[key] < hi
    # The public helper resamples the same way: same seed, same interval.
    assert bootstrap_ci(per_user["recall@10"], 0.9, 400, 5) == pytest.approx(intervals["recall@10"])
    # A wider level gives a wider interval.
    lo95, hi95 = bootstrap_ci(per_user["recall@10"], 0.99, 400, 5)
    assert lo95 <= intervals["recall@10"][0] and hi95 >= intervals["recall@10"][1]
    assert all(math.isnan(x) for x in bootstrap_ci(np.zeros(0)))


def _sampled_case() -> tuple[UserItems, UserItems, int]:
    rng = np.random.default_rng(6)
    n_users, n_items = 40, 300
    users = np.repeat(np.arange(n_users), 10)
    items = rng.integers(0, n_items, users.size)
    train = UserItems.from_pairs(users[::2], items[::2], n_users)
    test = UserItems.from_pairs(users[1::2], items[1::2], n_users)
    return train, test, n_items


def test_sampled_metrics_are_prefixed_and_bounded() -> None:
    train, test, n_items = _sampled_case()
    seen_pairs = set(zip(*np.nonzero(_dense(train, n_items) | _dense(test, n_items)), strict=True))
    test_dense = _dense(test, n_items)

    def perfect(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        # Negatives are never among the user's train or test items.
        for u, row in zip(users, items[:, 1:], strict=True):
            assert not any((u, i) in seen_pairs for i in row)
        return test_dense[users[:, None], items].astype(np.float32)

    report = sampled_ranking_metrics(perfect, train, test, n_items, n_negatives=50, ks=(1, 10))
    assert report.metrics
    assert all(key.startswith("sampled_") for key in report.metrics)
    assert set(report.intervals) == set(report.per_user)
    assert report.metrics["sampled_recall@1"] == 1.0
    assert report.metrics["sampled_ndcg@10"] == 1.0
    assert report.metrics["sampled_precision@10"] == pytest.approx(0.1)

    # Ties count against the test item: a constant scorer earns nothing.
    constant = sampled_ranking_metrics(
        lambda u, i: np.zeros(i.shape), train, test, n_items, n_negatives=50, n_boot=0
    )
    assert constant.metrics["sampled_hit@10"] == 0.0
    assert constant.intervals == {}


def test_sampled_rank_by_hand() -> None:
    # One user, one test item (item 0), 4 negatives drawn from items 2..9 (item 1 is train).
    # Scores: the test item gets 0.5, a negative item i gets i / 10, so rank = #{neg >= 0.5}
    # = #{neg item >= 5}; mrr@5 = 1 / (rank + 1), hit@1 = [rank == 0].
    train = UserItems.from_pairs(np.array([0]), np.array([1]), n_users=1)
    test = UserItems.from_pairs(np.array([0]), np.array([0]), n_users=1)
    drawn: list[np.ndarray] = []

    def score(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        drawn.append(items[0, 1:].copy())
        return np.where(items == 0, 0.5, items / 10)

    report = sampled_ranking_metrics(score, train, test, 10, n_negatives=4, ks=(1, 5), n_boot=0)
    negatives = drawn[0]
    assert set(negatives.tolist()).isdisjoint({0, 1})
    rank = int((negatives >= 5).sum())
    assert report.metrics["sampled_mrr@5"] == pytest.approx(1 / (rank + 1))
    assert report.metrics["sampled_hit@1"] == float(rank == 0)
    assert report.metrics["sampled_ndcg@5"] == pytest.approx(1 / math.log2(rank + 2))


def test_sampled_is_deterministic_for_a_seed() -> None:
    train, test, n_items = _sampled_case()
    rng_scores = np.random.default_rng(7).standard_normal((40, n_items))

    def score(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return rng_scores[users[:, None], items]

    a = sampled_ranking_metrics(score, train, test, n_items, seed=3, n_boot=50)
    b = sampled_ranking_metrics(score, train, test, n_items, seed=3, n_boot=50, batch_pairs=7)
    assert a.metrics == b.metrics
    assert a.intervals == b.intervals


def _dense(ui: UserItems, n_items: int) -> np.ndarray:
    out = np.zeros((ui.n_users, n_items), dtype=bool)
    for u in range(ui.n_users):
        out[u, ui.items_of(u)] = True
    return out


def test_matches_a_per_user_loop_of_recboles_formulas() -> None:
    # Users with more test items than K exercise IDCG's min(|R(u)|, K).
    rng = np.random.default_rng(8)
    n_users, n_items, ks = 60, 80, (5, 30)
    users = np.repeat(np.arange(n_users), 40)
    items = rng.integers(0, n_items, users.size)
    train = UserItems.from_pairs(users[::3], items[::3], n_users)
    test = UserItems.from_pairs(users[1::3], items[1::3], n_users)
    scores = rng.standard_normal((n_users, n_items))
    report = full_ranking_metrics(lambda u: scores[u], train, test, n_items, ks=ks)
    for row, u in enumerate(report.users):
        s = scores[u].copy()
        s[train.items_of(u)] = -np.inf
        ranking = np.argsort(-s, kind="stable")
        truth = set(test.items_of(u).tolist())
        for k in ks:
            rel = [int(i) in truth for i in ranking[:k]]
            dcg = sum(1 / math.log2(j + 2) for j, r in enumerate(rel) if r)
            idcg = sum(1 / math.log2(j + 2) for j in range(min(len(truth), k)))
            first = next((j for j, r in enumerate(rel) if r), None)
            assert report.per_user[f"recall@{k}"][row] == pytest.approx(sum(rel) / len(truth))
            assert report.per_user[f"ndcg@{k}"][row] == pytest.approx(dcg / idcg)
            assert report.per_user[f"mrr@{k}"][row] == pytest.approx(
                0.0 if first is None else 1 / (first + 1)
            )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_give_the_cpu_numbers() -> None:
    rng = np.random.default_rng(9)
    n_users, n_items = 100, 500
    users = np.repeat(np.arange(n_users), 6)
    items = rng.integers(0, n_items, users.size)
    train = UserItems.from_pairs(users[::2], items[::2], n_users)
    test = UserItems.from_pairs(users[1::2], items[1::2], n_users)
    scores = torch.from_numpy(rng.standard_normal((n_users, n_items)).astype(np.float32))
    on_gpu = scores.cuda()
    cpu = full_ranking_metrics(lambda u: scores[u], train, test, n_items)
    gpu = full_ranking_metrics(lambda u: on_gpu[torch.from_numpy(u).cuda()], train, test, n_items)
    assert gpu.metrics == pytest.approx(cpu.metrics)
