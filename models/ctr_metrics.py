"""Offline CTR metrics: AUC, GAUC, logloss, expected calibration error.

All functions take numpy-convertible 1-d arrays of equal length (a CPU torch
tensor works) and compute in float64. Labels are binary (0/1 or bool).

========================= =======================================================
``auc``                   probability that a random positive scores above a random
                          negative, ties counted one half (Mann-Whitney U over
                          tie-averaged ranks); ``nan`` without both classes
``gauc``                  per-user AUC averaged with weights = the user's rows
                          (impressions); users with one class only are skipped,
                          and the share of rows that were counted is returned
                          (Zhou et al., "Deep Interest Network", KDD 2018)
``logloss``               mean binary cross-entropy of probabilities clipped to
                          ``[eps, 1 - eps]``
``ece``                   ``sum_b n_b / n · |mean prediction_b - observed rate_b|``
                          over ``n_bins`` bins of the predicted probability
                          (Guo et al., "On Calibration of Modern Neural
                          Networks", ICML 2017); equal-width (``"uniform"``) or
                          equal-count (``"quantile"``) bins
========================= =======================================================

AUC and GAUC share one vectorised pass: rows sorted by (group, score), ranks
averaged over tied runs, positives' rank sums per group with ``bincount``; no
Python loop per user, so GAUC over 1M rows costs one ``lexsort``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

BinStrategy = Literal["uniform", "quantile"]
BIN_STRATEGIES: tuple[BinStrategy, ...] = ("uniform", "quantile")
# Probabilities come from a float32 sigmoid, which rounds to exactly 1.0 above a
# logit of ~17; clipping at 1e-7 (about float32's resolution below 1) caps one
# confident mistake at ~16 nats instead of letting the rounding decide.
DEFAULT_EPS = 1e-7


class Gauc(NamedTuple):
    """GAUC and how much of the data it covers.

    ``value`` the impression-weighted mean of per-user AUCs (``nan`` when no
    user has both classes); ``impression_share`` the share of rows belonging to
    counted users; ``n_users`` the number of counted users.
    """

    value: float
    impression_share: float
    n_users: int


@dataclass(frozen=True)
class ReliabilityTable:
    """The bins of a reliability diagram, ``n_bins`` each; empty bins hold ``nan`` and 0.

    ``edges`` ``(n_bins + 1,)`` bin boundaries in probability; ``mean_prediction``
    ``(n_bins,)`` the mean predicted probability in each bin; ``observed_rate``
    ``(n_bins,)`` the share of positives; ``count`` ``(n_bins,)`` int64 rows.
    """

    edges: np.ndarray
    mean_prediction: np.ndarray
    observed_rate: np.ndarray
    count: np.ndarray


# --------------------------------------------------------------------------- inputs


def _labels(labels: ArrayLike, name: str = "labels") -> np.ndarray:
    """``(n,)`` float64 of 0/1; anything else raises, naming the field."""
    values = np.asarray(labels)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {values.shape}")
    values = values.astype(np.float64)
    if not np.all((values == 0.0) | (values == 1.0)):
        bad = values[(values != 0.0) & (values != 1.0)][:3]
        raise ValueError(f"{name} must be 0/1, found {bad.tolist()}")
    return values


def _scores(scores: ArrayLike, n: int, name: str) -> np.ndarray:
    """``(n,)`` finite float64."""
    values = np.asarray(scores, dtype=np.float64)
    if values.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like labels, got {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return values


def _probabilities(probabilities: ArrayLike, n: int) -> np.ndarray:
    values = _scores(probabilities, n, "probabilities")
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise ValueError(
            f"probabilities must lie in [0, 1], got range [{values.min()}, {values.max()}]"
        )
    return values


# --------------------------------------------------------------------------- AUC


def _grouped_auc(
    groups: np.ndarray, labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group AUC over rows ``(n,)``: ``(auc (G,), positives (G,), rows (G,))``.

    ``auc`` is ``nan`` for a group without both classes. Groups come out in
    sorted order of their ids.
    """
    order = np.lexsort((scores, groups))
    g, y, s = groups[order], labels[order], scores[order]
    n = g.size
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = g[1:] != g[:-1]
    group_id = np.cumsum(new_group) - 1  # (n,) dense group index
    group_start = np.flatnonzero(new_group)  # (G,) first row of each group
    # A tied run: same group and same score. Its rows share the mean of the
    # ranks they occupy, (first + last) / 2 with 1-based ranks inside the group.
    new_run = new_group.copy()
    new_run[1:] |= s[1:] != s[:-1]
    run_start = np.flatnonzero(new_run)
    run_end = np.append(run_start[1:], n) - 1  # inclusive
    run_id = np.cumsum(new_run) - 1
    offset = group_start[group_id]  # (n,) position of the row's group start
    rank = (run_start[run_id] + run_end[run_id]) / 2.0 - offset + 1.0
    n_groups = group_start.size
    rows = np.bincount(group_id, minlength=n_groups).astype(np.float64)
    positives = np.bincount(group_id, weights=y, minlength=n_groups)
    rank_sum = np.bincount(group_id, weights=rank * y, minlength=n_groups)
    negatives = rows - positives
    with np.errstate(divide="ignore", invalid="ignore"):
        auc_values = (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)
    auc_values[(positives == 0) | (negatives == 0)] = np.nan
    return auc_values, positives, rows


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC of ``scores`` ``(n,)`` (any monotone scale) against binary ``labels`` ``(n,)``.

    Ties count one half; ``nan`` when one class is missing (the AUC is undefined).
    """
    y = _labels(labels)
    s = _scores(scores, y.size, "scores")
    if y.size == 0:
        return float("nan")
    values, _, _ = _grouped_auc(np.zeros(y.size, dtype=np.int64), y, s)
    return float(values[0])


def gauc(users: ArrayLike, labels: ArrayLike, scores: ArrayLike) -> Gauc:
    """Impression-weighted mean of per-user AUC; users ``(n,)`` any sortable ids.

    A user's weight is their number of rows; users whose rows are all positive
    or all negative have no AUC and are skipped (see ``impression_share``).
    """
    y = _labels(labels)
    s = _scores(scores, y.size, "scores")
    u = np.asarray(users)
    if u.shape != y.shape:
        raise ValueError(f"users must have shape {y.shape} like labels, got {u.shape}")
    if y.size == 0:
        return Gauc(float("nan"), 0.0, 0)
    values, _, rows = _grouped_auc(u, y, s)
    counted = ~np.isnan(values)
    weight = rows[counted].sum()
    if weight == 0:
        return Gauc(float("nan"), 0.0, 0)
    value = float((values[counted] * rows[counted]).sum() / weight)
    return Gauc(value, float(weight / y.size), int(counted.sum()))


# --------------------------------------------------------------------------- probability metrics


def logloss(labels: ArrayLike, probabilities: ArrayLike, eps: float = DEFAULT_EPS) -> float:
    """Mean binary cross-entropy (nats) of ``probabilities`` ``(n,)``, clipped to ``[eps, 1-eps]``."""
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
    y = _labels(labels)
    p = np.clip(_probabilities(probabilities, y.size), eps, 1.0 - eps)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def _bin_edges(p: np.ndarray, n_bins: int, strategy: BinStrategy) -> np.ndarray:
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    # Equal-count bins; with many tied predictions several edges coincide and
    # the bins between them stay empty (a tied value cannot be split).
    edges = np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1))
    edges[0], edges[-1] = 0.0, 1.0
    return edges


def expected_calibration_error(
    labels: ArrayLike,
    probabilities: ArrayLike,
    n_bins: int = 15,
    strategy: BinStrategy = "uniform",
) -> tuple[float, ReliabilityTable]:
    """ECE of ``probabilities`` ``(n,)`` and the reliability table behind it.

    15 bins is Guo et al.'s choice. ``"uniform"`` bins split ``[0, 1]`` evenly
    (CTRs near 0.02 then all fall into the first bin: use ``"quantile"`` for
    skewed predictions). A row on an inner edge goes to the bin above it; 1.0
    goes to the last bin. ``nan`` ECE for empty input.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if strategy not in BIN_STRATEGIES:
        raise ValueError(f"strategy must be one of {BIN_STRATEGIES}, got {strategy!r}")
    y = _labels(labels)
    p = _probabilities(probabilities, y.size)
    if y.size == 0:
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        empty = np.full(n_bins, np.nan)
        return float("nan"), ReliabilityTable(
            edges, empty, empty.copy(), np.zeros(n_bins, dtype=np.int64)
        )
    edges = _bin_edges(p, n_bins, strategy)
    index = np.searchsorted(edges[1:-1], p, side="right")  # (n,) in 0..n_bins-1
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_prediction = np.bincount(index, weights=p, minlength=n_bins) / count
        observed_rate = np.bincount(index, weights=y, minlength=n_bins) / count
    filled = count > 0
    ece = float(
        (count[filled] * np.abs(mean_prediction[filled] - observed_rate[filled])).sum() / y.size
    )
    return ece, ReliabilityTable(edges, mean_prediction, observed_rate, count.astype(np.int64))


def ctr_report(
    labels: ArrayLike,
    probabilities: ArrayLike,
    users: ArrayLike | None = None,
    n_bins: int = 15,
    strategy: BinStrategy = "uniform",
    eps: float = DEFAULT_EPS,
) -> dict[str, float]:
    """``auc, gauc, logloss, ece, n, positive_rate`` of one prediction set.

    ``gauc`` is ``nan`` without ``users`` (call :func:`gauc` for its coverage).
    AUC is computed on the probabilities: logits would rank the same, except
    that sigmoid saturation can tie the most extreme ones.
    """
    y = _labels(labels)
    p = _probabilities(probabilities, y.size)
    ece, _ = expected_calibration_error(y, p, n_bins=n_bins, strategy=strategy)
    return {
        "auc": auc(y, p),
        "gauc": gauc(users, y, p).value if users is not None else float("nan"),
        "logloss": logloss(y, p, eps=eps),
        "ece": ece,
        "n": float(y.size),
        "positive_rate": float(y.mean()) if y.size else float("nan"),
    }
