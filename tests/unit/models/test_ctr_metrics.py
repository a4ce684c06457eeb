"""CTR metrics: AUC (ties, missing classes), GAUC, logloss, ECE and the report."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest

from models.ctr_metrics import (
    auc,
    ctr_report,
    expected_calibration_error,
    gauc,
    logloss,
)

HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None


def _pair_count_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Brute force: share of (positive, negative) pairs ordered right, ties one half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auc_of_perfect_inverted_and_constant_scores() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert auc(labels, scores) == 1.0
    assert auc(labels, -scores) == 0.0
    assert auc(labels, np.full(6, 0.5)) == 0.5


def test_auc_counts_ties_as_one_half() -> None:
    # Pairs (pos, neg): (0.5, 0.5) tie -> 0.5, (0.5, 0.1) -> 1, (0.9, 0.5) -> 1, (0.9, 0.1) -> 1.
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.5, 0.5, 0.9, 0.1])
    assert auc(labels, scores) == pytest.approx(3.5 / 4)


def test_auc_matches_pair_count_and_sklearn_on_tied_random_scores() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    scores = rng.integers(0, 20, 400) / 20.0 + 0.05 * labels  # many ties, some signal
    expected = _pair_count_auc(labels, scores)
    assert auc(labels, scores) == pytest.approx(expected, abs=1e-12)
    if HAS_SKLEARN:
        from sklearn.metrics import roc_auc_score

        assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_of_random_scores_is_near_one_half() -> None:
    rng = np.random.default_rng(1)
    value = auc(rng.integers(0, 2, 20_000), rng.random(20_000))
    assert abs(value - 0.5) < 0.02


def test_auc_is_nan_with_one_class_and_rejects_bad_labels() -> None:
    assert np.isnan(auc(np.ones(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="labels must be 0/1"):
        auc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="scores must have shape"):
        auc(np.array([0, 1]), np.array([0.1]))
    with pytest.raises(ValueError, match="scores must be finite"):
        auc(np.array([0, 1]), np.array([0.1, np.nan]))


def test_gauc_is_the_impression_weighted_mean_and_skips_single_class_users() -> None:
    users = np.array([7, 7, 7, 7, 3, 3, 3, 9, 9])
    labels = np.array([1, 0, 0, 1, 0, 1, 0, 1, 1])
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.5, 0.6, 0.7, 0.3, 0.4])
    # user 7: positives {0.9, 0.2}, negatives {0.8, 0.1}: 3 of 4 pairs -> 0.75, 4 rows.
    # user 3: positive 0.6 vs negatives {0.5, 0.7}: 1 of 2 -> 0.5, 3 rows.
    # user 9: positives only -> skipped.
    result = gauc(users, labels, scores)
    assert result.value == pytest.approx((0.75 * 4 + 0.5 * 3) / 7)
    assert result.impression_share == pytest.approx(7 / 9)
    assert result.n_users == 2


def test_gauc_with_one_user_is_auc_and_with_no_usable_user_is_nan() -> None:
    rng = np.random.default_rng(2)
    labels, scores = rng.integers(0, 2, 300), rng.random(300)
    assert gauc(np.zeros(300), labels, scores).value == pytest.approx(auc(labels, scores))
    empty = gauc(np.arange(4), np.array([0, 1, 0, 1]), np.arange(4.0))
    assert np.isnan(empty.value) and empty.impression_share == 0.0 and empty.n_users == 0


def test_gauc_over_many_users_matches_a_loop_and_is_fast() -> None:
    rng = np.random.default_rng(3)
    n = 1_000_000
    users = rng.integers(0, 50_000, n)
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.random(n) + 0.3 * labels, 2)  # ties inside users
    start = time.perf_counter()
    result = gauc(users, labels, scores)
    assert time.perf_counter() - start < 5.0  # one lexsort; a per-user loop takes minutes
    # A loop over a few users checks the vectorised ranks.
    subset = np.isin(users, np.arange(40))
    u, y, s = users[subset], labels[subset], scores[subset]
    values, weights = [], []
    for user in np.unique(u):
        rows = u == user
        if 0 < y[rows].sum() < rows.sum():
            values.append(_pair_count_auc(y[rows], s[rows]))
            weights.append(rows.sum())
    assert gauc(u, y, s).value == pytest.approx(np.average(values, weights=weights), abs=1e-12)
    assert 0.5 < result.value < 1.0 and result.impression_share > 0.99


def test_logloss_by_hand_and_clipping() -> None:
    labels = np.array([1, 0])
    assert logloss(labels, np.array([0.8, 0.4])) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
    assert logloss(np.array([1]), np.array([0.0]), eps=1e-7) == pytest.approx(-np.log(1e-7))
    with pytest.raises(ValueError, match="probabilities must lie in"):
        logloss(labels, np.array([1.2, 0.1]))


def test_ece_is_near_zero_when_calibrated_and_large_when_over_confident() -> None:
    rng = np.random.default_rng(4)
    p = rng.random(200_000)
    labels = (rng.random(p.size) < p).astype(np.int64)
    for strategy in ("uniform", "quantile"):
        ece, table = expected_calibration_error(labels, p, n_bins=15, strategy=strategy)
        assert ece < 0.01
        assert table.count.sum() == p.size
        filled = table.count > 0
        np.testing.assert_allclose(
            table.mean_prediction[filled], table.observed_rate[filled], atol=0.02
        )
    # Push every prediction towards 0 or 1: the labels still follow p.
    over = np.clip(np.where(p > 0.5, p + 0.3, p - 0.3), 0.0, 1.0)
    ece_over, _ = expected_calibration_error(labels, over)
    assert ece_over > 0.2


def test_ece_by_hand_with_an_empty_bin() -> None:
    # Two uniform bins: [0, .5) holds 0.2, 0.4 (mean .3, rate .5); [.5, 1] holds 1.0 (rate 1).
    ece, table = expected_calibration_error(
        np.array([1, 0, 1]), np.array([0.2, 0.4, 1.0]), n_bins=2
    )
    assert ece == pytest.approx((2 * 0.2 + 1 * 0.0) / 3)
    np.testing.assert_array_equal(table.count, [2, 1])
    _, table4 = expected_calibration_error(np.array([1, 0]), np.array([0.1, 0.9]), n_bins=4)
    assert table4.count.tolist() == [1, 0, 0, 1] and np.isnan(table4.observed_rate[1])
    with pytest.raises(ValueError, match="strategy must be one of"):
        expected_calibration_error(np.array([1]), np.array([0.5]), strategy="width")  # type: ignore[arg-type]


def test_ctr_report_keys_and_values() -> None:
    labels = np.array([0, 1, 0, 1])
    p = np.array([0.2, 0.7, 0.4, 0.6])
    report = ctr_report(labels, p, users=np.array([1, 1, 2, 2]))
    assert set(report) == {"auc", "gauc", "logloss", "ece", "n", "positive_rate"}
    assert report["auc"] == 1.0 and report["gauc"] == 1.0
    assert report["n"] == 4 and report["positive_rate"] == 0.5
    assert report["logloss"] == pytest.approx(logloss(labels, p))
    assert np.isnan(ctr_report(labels, p)["gauc"])
