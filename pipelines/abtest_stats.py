"""Statistics of an A/B test and of off-policy estimates: pure numpy, no I/O.

Everything here works on **per-user sums**, because the user is the unit of
randomisation: a user-hash split sends all of one user's requests to one arm,
and a heavy user's clicks are correlated with each other, so treating
impressions as independent would make intervals too narrow.

- **CTR of an arm** is a ratio of sums, ``R = sum_u c_u / sum_u n_u`` (clicks
  ``c_u`` and impressions ``n_u`` of user ``u``). Its variance by the delta
  method over users (cluster-robust): ``Var R ~ m / (m - 1) * sum_u (c_u - R n_u)^2
  / (sum_u n_u)^2`` for ``m`` users.
- **Lift** ``B - A``: the arms hold disjoint users, so the variances add;
  normal 95% interval and a two-sided p-value from ``z = lift / se``. The
  relative lift ``B / A - 1`` by the delta method on the ratio of two
  independent ratios.
- **Bootstrap over users**: resample users with replacement within each arm
  (multinomial counts), recompute both CTRs; percentile interval. A check of
  the delta method that assumes no normality, and the distribution to plot.
- **IPS / SNIPS** of a target policy from logged slots with the logging
  policy's propensities (:func:`off_policy`): both are ratios of per-user
  sums too, so they reuse the same delta-method variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def normal_quantile(level: float) -> float:
    """Two-sided standard normal quantile: 1.96 for ``level = 0.95``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    # Inverse of erf by bisection: exact to 1e-12, no scipy needed for one number.
    target, lo, hi = level, 0.0, 10.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if math.erf(mid / math.sqrt(2.0)) < target else (lo, mid)
    return 0.5 * (lo + hi)


def two_sided_p(z: float) -> float:
    """P(|Z| >= |z|) for a standard normal ``Z``."""
    return math.erfc(abs(z) / math.sqrt(2.0))


@dataclass(frozen=True)
class RatioEstimate:
    """A ratio of per-user sums, its delta-method standard error and normal interval."""

    value: float
    se: float
    ci_low: float
    ci_high: float
    n_users: int


def ratio_estimate(
    numerator: npt.ArrayLike, denominator: npt.ArrayLike, level: float = 0.95
) -> RatioEstimate:
    """``sum(numerator) / sum(denominator)`` over users (U,), with a cluster-robust interval.

    ``numerator`` (U,) e.g. clicks per user, ``denominator`` (U,) e.g. impressions
    per user; users with a zero denominator still count as clusters. Needs two
    users or more for a variance (one user gives ``se = nan``).
    """
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"need two (U,) arrays, got shapes {num.shape} and {den.shape}")
    total = den.sum()
    if total <= 0:
        raise ValueError("the denominator sums to zero: no impressions")
    value = float(num.sum() / total)
    m = num.size
    if m < 2:
        se = float("nan")
    else:
        residual = num - value * den
        se = float(math.sqrt(m / (m - 1) * float(np.sum(residual**2)) / total**2))
    half = normal_quantile(level) * se
    return RatioEstimate(value, se, value - half, value + half, m)


@dataclass(frozen=True)
class LiftEstimate:
    """B minus A from per-user sums of each arm (delta method; arms independent)."""

    ctr_a: RatioEstimate
    ctr_b: RatioEstimate
    lift: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    relative: float
    relative_ci_low: float
    relative_ci_high: float


def lift_estimate(
    clicks_a: npt.ArrayLike,
    impressions_a: npt.ArrayLike,
    clicks_b: npt.ArrayLike,
    impressions_b: npt.ArrayLike,
    level: float = 0.95,
) -> LiftEstimate:
    """Absolute and relative lift of B over A with ``level`` intervals and a two-sided p-value.

    Inputs are per-user (U_a,) and (U_b,) sums of clicks and impressions of each arm.
    """
    a = ratio_estimate(clicks_a, impressions_a, level)
    b = ratio_estimate(clicks_b, impressions_b, level)
    lift = b.value - a.value
    se = math.sqrt(a.se**2 + b.se**2)
    z = normal_quantile(level)
    p = two_sided_p(lift / se) if se > 0 else (0.0 if lift != 0 else 1.0)
    relative = b.value / a.value - 1.0
    # Var(B / A) ~ se_B^2 / A^2 + B^2 se_A^2 / A^4 (first-order, independent arms).
    rel_se = math.sqrt(b.se**2 / a.value**2 + b.value**2 * a.se**2 / a.value**4)
    return LiftEstimate(
        ctr_a=a,
        ctr_b=b,
        lift=lift,
        se=se,
        ci_low=lift - z * se,
        ci_high=lift + z * se,
        p_value=p,
        relative=relative,
        relative_ci_low=relative - z * rel_se,
        relative_ci_high=relative + z * rel_se,
    )


@dataclass(frozen=True)
class BootstrapLift:
    """Bootstrap over users: ``samples`` (R,) of B - A, ``relative`` (R,) of B / A - 1."""

    samples: FloatArray
    relative: FloatArray
    ci_low: float
    ci_high: float
    relative_ci_low: float
    relative_ci_high: float


def _resampled_ratios(
    num: FloatArray, den: FloatArray, resamples: int, rng: np.random.Generator
) -> FloatArray:
    """(R,) ratios of sums after resampling the users (U,) with replacement.

    Multinomial counts ``W`` (R, U) instead of index draws: ``W @ num`` is one
    matrix product, done in chunks so ``W`` stays small.
    """
    u = num.size
    out = np.empty(resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // max(u, 1))
    for lo in range(0, resamples, chunk):
        n = min(chunk, resamples - lo)
        weights = rng.multinomial(u, np.full(u, 1.0 / u), size=n).astype(np.float64)
        out[lo : lo + n] = (weights @ num) / np.maximum(weights @ den, 1e-300)
    return out


def bootstrap_lift(
    clicks_a: npt.ArrayLike,
    impressions_a: npt.ArrayLike,
    clicks_b: npt.ArrayLike,
    impressions_b: npt.ArrayLike,
    rng: np.random.Generator,
    resamples: int = 1000,
    level: float = 0.95,
) -> BootstrapLift:
    """Percentile intervals of B - A and B / A - 1, users resampled within each arm."""
    arms = []
    for clicks, impressions in ((clicks_a, impressions_a), (clicks_b, impressions_b)):
        num = np.asarray(clicks, dtype=np.float64)
        den = np.asarray(impressions, dtype=np.float64)
        arms.append(_resampled_ratios(num, den, resamples, rng))
    ratio_a, ratio_b = arms
    diff = ratio_b - ratio_a
    relative = ratio_b / ratio_a - 1.0
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(diff, [tail, 100.0 - tail])
    rel_low, rel_high = np.percentile(relative, [tail, 100.0 - tail])
    return BootstrapLift(diff, relative, float(low), float(high), float(rel_low), float(rel_high))


@dataclass(frozen=True)
class OffPolicyEstimate:
    """IPS and SNIPS of a target policy's CTR from one logged policy's slots.

    ``coverage``: share of the target's slots (item, position) on the logged
    requests that the logging policy could have shown (propensity > 0); the
    estimators are unbiased only at 1.0. ``effective_slots``: Kish's
    ``(sum w)^2 / sum w^2``, how many logged slots the weights are worth.
    """

    ips: RatioEstimate
    snips: RatioEstimate
    mean_weight: float
    max_weight: float
    effective_slots: float
    matched_slots: int
    logged_slots: int
    coverage: float


def off_policy(
    user_index: npt.ArrayLike,
    clicks: npt.ArrayLike,
    target_probability: npt.ArrayLike,
    logging_propensity: npt.ArrayLike,
    coverage: float = 1.0,
    level: float = 0.95,
) -> OffPolicyEstimate:
    """Item-position IPS and SNIPS from logged slots (S,) (Li et al., 2018).

    Each logged slot ``s`` showed item ``a_s`` at position ``k_s`` to a user:
    ``clicks`` (S,) 0/1, ``target_probability`` (S,) = ``pi(a_s at k_s | user)``
    (0/1 for a deterministic target), ``logging_propensity`` (S,) = ``mu(a_s at
    k_s | user)``, the logging policy's *marginal* probability of that item at
    that position (> 0 on every logged slot). With ``w = pi / mu``::

        IPS   = sum_s w_s c_s / S          (CTR per impression; E[sum_k w] = K per slate)
        SNIPS = sum_s w_s c_s / sum_s w_s  (self-normalised: bounded by the click range)

    Unbiased (IPS) / consistent (SNIPS) when a click at a slot depends only on
    the user, the item there and the position (item-position model; no
    interaction with the other items of the slate), and ``mu > 0`` wherever
    ``pi > 0``. ``user_index`` (S,) int: the slot's user, for the clustered
    variance; ``coverage`` is passed through (the caller knows the target's slates).
    """
    users = np.asarray(user_index, dtype=np.int64)
    c = np.asarray(clicks, dtype=np.float64)
    pi = np.asarray(target_probability, dtype=np.float64)
    mu = np.asarray(logging_propensity, dtype=np.float64)
    if not (users.shape == c.shape == pi.shape == mu.shape) or c.ndim != 1:
        raise ValueError("user_index, clicks, target_probability, logging_propensity: (S,) each")
    if c.size == 0:
        raise ValueError("no logged slots")
    if np.any(mu <= 0) or not np.all(np.isfinite(mu)):
        raise ValueError("logging propensities must be finite and > 0 on every logged slot")
    w = pi / mu
    _, cluster = np.unique(users, return_inverse=True)
    n_clusters = int(cluster.max()) + 1
    per_user_wc = np.bincount(cluster, weights=w * c, minlength=n_clusters)
    per_user_w = np.bincount(cluster, weights=w, minlength=n_clusters)
    per_user_slots = np.bincount(cluster, minlength=n_clusters).astype(np.float64)
    ips = ratio_estimate(per_user_wc, per_user_slots, level)
    if w.sum() > 0:
        snips = ratio_estimate(per_user_wc, per_user_w, level)
    else:
        nan = float("nan")
        snips = RatioEstimate(nan, nan, nan, nan, n_clusters)
    square = float(np.sum(w**2))
    return OffPolicyEstimate(
        ips=ips,
        snips=snips,
        mean_weight=float(w.mean()),
        max_weight=float(w.max()),
        effective_slots=float(w.sum() ** 2 / square) if square > 0 else 0.0,
        matched_slots=int(np.count_nonzero(pi > 0)),
        logged_slots=int(c.size),
        coverage=coverage,
    )
