"""A/B and off-policy statistics with numbers derivable by hand, and interval coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.abtest_stats import (
    bootstrap_lift,
    lift_estimate,
    normal_quantile,
    off_policy,
    ratio_estimate,
    two_sided_p,
)


def test_normal_quantile_and_p_value() -> None:
    assert normal_quantile(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert two_sided_p(1.959964) == pytest.approx(0.05, abs=1e-6)
    assert two_sided_p(0.0) == 1.0


def test_ratio_delta_method_by_hand() -> None:
    # Users (clicks, impressions): (1, 2), (3, 2). R = 4 / 4 = 1; residuals c - R n = -1, +1;
    # Var = m / (m - 1) * sum(res^2) / (sum n)^2 = 2 * 2 / 16 = 0.25, se = 0.5.
    est = ratio_estimate([1.0, 3.0], [2.0, 2.0])
    assert est.value == 1.0
    assert est.se == pytest.approx(0.5)
    assert est.ci_low == pytest.approx(1.0 - 1.959964 * 0.5, abs=1e-5)
    assert est.n_users == 2


def test_lift_adds_independent_variances() -> None:
    # Arm A: R = 1, se 0.5 (above); arm B: (2, 2), (4, 2): R = 1.5, residuals -1, +1, se 0.5.
    lift = lift_estimate([1.0, 3.0], [2.0, 2.0], [2.0, 4.0], [2.0, 2.0])
    assert lift.lift == pytest.approx(0.5)
    assert lift.se == pytest.approx(math.sqrt(0.5))
    assert lift.p_value == pytest.approx(two_sided_p(0.5 / math.sqrt(0.5)))
    assert lift.relative == pytest.approx(0.5)
    # se of B / A: sqrt(se_B^2 / A^2 + B^2 se_A^2 / A^4) = sqrt(0.25 + 2.25 * 0.25).
    half = lift.relative_ci_high - lift.relative
    assert half == pytest.approx(1.959964 * math.sqrt(0.25 + 2.25 * 0.25), abs=1e-5)


def test_ips_and_snips_on_a_three_row_log() -> None:
    # Slots: clicks 1, 0, 1; target pi 1, 1, 0; logging mu 0.5, 0.25, 0.1 -> w = 2, 4, 0.
    # IPS = (2*1 + 4*0 + 0*1) / 3 = 2/3; SNIPS = 2 / (2 + 4 + 0) = 1/3.
    est = off_policy([0, 1, 2], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.5, 0.25, 0.1])
    assert est.ips.value == pytest.approx(2.0 / 3.0)
    assert est.snips.value == pytest.approx(1.0 / 3.0)
    assert est.mean_weight == pytest.approx(2.0)
    assert est.max_weight == 4.0
    assert est.matched_slots == 2
    assert est.effective_slots == pytest.approx(36.0 / 20.0)  # (2 + 4)^2 / (4 + 16)


def test_snips_is_invariant_to_propensity_scale_ips_is_not() -> None:
    rng = np.random.default_rng(0)
    clicks = (rng.random(50) < 0.3).astype(float)
    pi = (rng.random(50) < 0.5).astype(float)
    mu = rng.uniform(0.1, 0.9, 50)
    users = rng.integers(0, 10, 50)
    base, scaled = off_policy(users, clicks, pi, mu), off_policy(users, clicks, pi, 2.0 * mu)
    assert scaled.snips.value == pytest.approx(base.snips.value)
    assert scaled.ips.value == pytest.approx(base.ips.value / 2.0)
    # Every click 1: SNIPS is exactly 1 whatever the weights (it normalises by them).
    ones = off_policy(users, np.ones(50), pi, mu)
    assert ones.snips.value == pytest.approx(1.0)


def test_ips_is_unbiased_for_a_known_logging_policy() -> None:
    # One slot, two items: the logger shows item 0 w.p. 0.8, item 1 w.p. 0.2; true click
    # probabilities 0.1 and 0.5. Target always shows item 1: its CTR is 0.5.
    rng = np.random.default_rng(1)
    n = 200_000
    shown = (rng.random(n) < 0.2).astype(int)
    clicks = (rng.random(n) < np.where(shown == 1, 0.5, 0.1)).astype(float)
    est = off_policy(np.arange(n), clicks, (shown == 1) * 1.0, np.where(shown == 1, 0.2, 0.8))
    assert est.ips.ci_low < 0.5 < est.ips.ci_high
    assert est.snips.value == pytest.approx(0.5, abs=0.01)


def test_off_policy_rejects_zero_propensity() -> None:
    with pytest.raises(ValueError, match="propensities"):
        off_policy([0], [1.0], [1.0], [0.0])


def _clustered_arm(
    rng: np.random.Generator, users: int, ctr: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-user sums of a clustered log: heavy-tailed requests, a per-user CTR around ``ctr``."""
    impressions = rng.geometric(0.2, users).astype(float) * 5
    per_user = rng.beta(2.0, 2.0 * (1 - ctr) / ctr, users)  # mean ctr, user-to-user spread
    return rng.binomial(impressions.astype(int), per_user).astype(float), impressions


def test_lift_interval_covers_the_truth_about_95_percent() -> None:
    # Known case: arm CTRs 0.10 and 0.12 (the beta means), so the true lift is 0.02; the
    # ratio of sums estimates the impression-weighted CTR, which is the beta mean too
    # (impressions independent of the user's CTR). 400 experiments of 400 users per arm.
    rng = np.random.default_rng(2)
    covered = []
    for _ in range(400):
        ca, na = _clustered_arm(rng, 400, 0.10)
        cb, nb = _clustered_arm(rng, 400, 0.12)
        est = lift_estimate(ca, na, cb, nb)
        covered.append(est.ci_low <= 0.02 <= est.ci_high)
    # Binomial(400, 0.95) sd ~ 1.1 points: [0.92, 0.98] is ~ +-2.7 sd.
    assert 0.92 <= np.mean(covered) <= 0.98


def test_naive_impression_level_interval_would_undercover() -> None:
    # The point of clustering: the same log treated as independent impressions is too narrow.
    rng = np.random.default_rng(3)
    ca, na = _clustered_arm(rng, 400, 0.10)
    cb, nb = _clustered_arm(rng, 400, 0.12)
    clustered = lift_estimate(ca, na, cb, nb)
    pa, pb = ca.sum() / na.sum(), cb.sum() / nb.sum()
    naive_se = math.sqrt(pa * (1 - pa) / na.sum() + pb * (1 - pb) / nb.sum())
    assert clustered.se > 1.5 * naive_se


def test_bootstrap_agrees_with_the_delta_method() -> None:
    rng = np.random.default_rng(4)
    ca, na = _clustered_arm(rng, 2000, 0.10)
    cb, nb = _clustered_arm(rng, 2000, 0.12)
    delta = lift_estimate(ca, na, cb, nb)
    boot = bootstrap_lift(ca, na, cb, nb, np.random.default_rng(5), resamples=1000)
    assert boot.samples.shape == (1000,)
    width = delta.ci_high - delta.ci_low
    assert boot.ci_low == pytest.approx(delta.ci_low, abs=0.1 * width)
    assert boot.ci_high == pytest.approx(delta.ci_high, abs=0.1 * width)
