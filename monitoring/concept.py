"""Concept drift: has the relation between scores and labels changed since the reference?

Once labels arrive for a window, :func:`concept_drift` measures AUC, logloss and
ECE on it and judges each against the reference profile with a seeded,
vectorised bootstrap (``n_boot`` resamples, level ``ci`` =
``monitoring.concept_ci``), so that noise does not alert:

AUC and logloss: confidence interval of the change
    Each resample draws the window's rows and the reference's rows with
    replacement (each at its own size) and takes ``window - reference``; drift
    when the central ``ci`` interval of that change excludes 0. Resampling the
    reference too matters: the window is often as large as the reference (50k
    reference rows, up to 100k window rows), and an interval around the
    window's value alone, compared with the reference's value as if it were
    exact, would exclude it on ~25 % of clean windows of that size.

ECE: range of the reference at the window's size (one-sided)
    ECE's estimate is biased upward by sampling noise, ~``sqrt(bins / n)``
    (~0.06 at 500 rows and 15 bins for a perfectly calibrated model, against
    ~0.006 on a 50k-row reference), and resampling adds the bias again, so any
    interval built around the window's ECE excludes the reference's on almost
    every small window with no drift at all. ECE is judged the other way round:
    ``n_boot`` samples of the window's size drawn from the reference give the
    central ``ci`` range of ECE that windows of this size show when nothing
    changed; drift when the window's ECE lies above it (a lower ECE is no harm,
    and below the range is mostly the reference's own noise on large windows).

A window with fewer than ``min_labels`` labelled rows (or a reference with fewer)
is not judged, with the reason (``monitoring.concept_min_labels``); AUC alone is
left out when a side has one class only.

The metrics are those of :mod:`models.ctr_metrics` (``auc`` with ties counted
one half, ``logloss`` clipped at 1e-7, ``ece`` over 15 equal-width bins, an edge
value going to the bin above), which monitoring may not import (it sees
predictions as columns): here they are computed for a whole matrix of resample
weights at once, and the unit tests pin them to ``models.ctr_metrics``.

Vectorised: rows are sorted by score once; a resample is a row of counts
``(B, n)``; AUC's tied runs, the bins of ECE (contiguous in score order) and
the sums of logloss are then ``np.add.reduceat``/matrix sums over that matrix,
in chunks of about 2M counts. Cost ~``n_boot x (2 x reference rows + window
rows)``: ~1.5 s for 300 resamples, 50k reference and 10k window rows.
``max_rows`` caps each side's labelled rows by a seeded uniform sample first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl

from monitoring.columns import sample_rows

MetricName = Literal["auc", "logloss", "ece"]
Interval = Literal["change_bootstrap", "reference_at_window_size"]
# As models.ctr_metrics: clip probabilities at 1e-7 for logloss, 15 uniform ECE bins.
LOGLOSS_EPS = 1e-7
ECE_BINS = 15
DEFAULT_N_BOOT = 300
# Counts per chunk of the (B, n) resample matrix (~16 MB per float64 array).
CHUNK_CELLS = 2_000_000
# A larger value is worse for these.
HIGHER_IS_WORSE: dict[MetricName, bool] = {"auc": False, "logloss": True, "ece": True}


@dataclass(frozen=True)
class MetricDrift:
    """One metric's verdict.

    ``reference`` / ``current`` the metric on all reference / window rows;
    ``low``-``high`` the interval the verdict uses, in the metric's units:
    ``interval="change_bootstrap"``: of the change ``current - reference``
    (drift when it excludes 0); ``"reference_at_window_size"``: of the metric
    on reference samples of the window's size (drift when ``current`` is above
    it). ``worse``: drifted in the harmful direction (lower AUC, higher logloss
    or ECE).
    """

    metric: MetricName
    reference: float
    current: float
    low: float
    high: float
    interval: Interval
    drifted: bool
    worse: bool

    def describe(self) -> str:
        """One line, e.g. ``auc 0.61 vs reference 0.80: change CI [-0.21, -0.17] (drift, worse)``."""
        if self.interval == "change_bootstrap":
            where = f"change CI [{self.low:+.4f}, {self.high:+.4f}]"
        else:
            where = f"reference range at this size [{self.low:.4f}, {self.high:.4f}]"
        verdict = (
            ("drift, worse" if self.worse else "drift, better") if self.drifted else "no drift"
        )
        return f"{self.metric} {self.current:.4f} vs reference {self.reference:.4f}: {where} ({verdict})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "reference": _json_float(self.reference),
            "current": _json_float(self.current),
            "low": _json_float(self.low),
            "high": _json_float(self.high),
            "interval": self.interval,
            "drifted": self.drifted,
            "worse": self.worse,
        }


@dataclass(frozen=True)
class ConceptResult:
    """The verdicts of one window; ``judged`` False with a ``reason`` when too few labels.

    ``skipped`` metrics left out and why (AUC with one class); ``*_labels`` the
    labelled rows used (after ``max_rows``).
    """

    judged: bool
    reason: str
    metrics: tuple[MetricDrift, ...]
    skipped: dict[str, str]
    reference_labels: int
    current_labels: int
    ci: float
    n_boot: int
    seed: int

    def __getitem__(self, metric: str) -> MetricDrift:
        for item in self.metrics:
            if item.metric == metric:
                return item
        raise KeyError(f"no concept-drift result for {metric!r}")

    @property
    def drifted(self) -> tuple[str, ...]:
        return tuple(m.metric for m in self.metrics if m.drifted)

    def to_dict(self) -> dict[str, Any]:
        return {
            "judged": self.judged,
            "reason": self.reason,
            "reference_labels": self.reference_labels,
            "current_labels": self.current_labels,
            "ci": self.ci,
            "n_boot": self.n_boot,
            "seed": self.seed,
            "drifted": list(self.drifted),
            "skipped": self.skipped,
            "metrics": [m.to_dict() for m in self.metrics],
        }


def concept_drift(
    reference: pl.DataFrame,
    current: pl.DataFrame,
    ci: float,
    min_labels: int,
    seed: int,
    label: str = "label",
    score: str = "score",
    n_boot: int = DEFAULT_N_BOOT,
    max_rows: int | None = None,
    min_change: dict[str, float] | None = None,
) -> ConceptResult:
    """Judge AUC, logloss and ECE of ``current`` against ``reference`` (see the module docstring).

    ``min_change`` ``{metric: absolute change}``: a metric also has to move by at
    least this much to count as drifted. The bootstrap takes rows as independent,
    but a day's rows come in sessions of one user, so a healthy day's metric
    strays outside the row-level interval more often than ``1 - ci`` says; a
    change too small to act on is no finding anyway.

    Both frames hold a 0/1 ``label`` column (null: not yet known; those rows are
    dropped) and a probability ``score`` column in [0, 1]. ``max_rows`` caps the
    labelled rows of each side by a seeded uniform sample.
    """
    if not 0.5 < ci < 1.0:
        raise ValueError(f"ci must lie in (0.5, 1), got {ci}")
    if n_boot < 10:
        raise ValueError(f"n_boot must be >= 10, got {n_boot}")
    ref_y, ref_p = _labelled(reference, label, score, "reference", max_rows, [seed, 1])
    cur_y, cur_p = _labelled(current, label, score, "current", max_rows, [seed, 0])

    def result(
        reason: str = "", metrics: Sequence[MetricDrift] = (), skipped: dict[str, str] | None = None
    ) -> ConceptResult:
        return ConceptResult(
            judged=not reason,
            reason=reason,
            metrics=tuple(metrics),
            skipped=skipped or {},
            reference_labels=ref_y.size,
            current_labels=cur_y.size,
            ci=ci,
            n_boot=n_boot,
            seed=seed,
        )

    for side, size in (("current window", cur_y.size), ("reference", ref_y.size)):
        if size < min_labels:
            return result(f"{side} has {size} labelled rows, fewer than {min_labels}")

    ref_rows, cur_rows = _Sorted(ref_y, ref_p), _Sorted(cur_y, cur_p)
    ones_ref, ones_cur = np.ones((1, ref_y.size)), np.ones((1, cur_y.size))
    ref_value = {k: float(v[0]) for k, v in ref_rows.metrics(ones_ref).items()}
    cur_value = {k: float(v[0]) for k, v in cur_rows.metrics(ones_cur).items()}
    rng = np.random.default_rng([seed, 2])
    cur_boot = cur_rows.bootstrap(cur_y.size, n_boot, rng)
    ref_boot = ref_rows.bootstrap(ref_y.size, n_boot, rng)
    ref_at_window = ref_rows.bootstrap(cur_y.size, n_boot, rng)
    alpha = 1.0 - ci

    skipped: dict[str, str] = {}
    metrics: list[MetricDrift] = []
    for name in ("auc", "logloss", "ece"):
        if name == "auc" and not (ref_rows.both_classes and cur_rows.both_classes):
            side = "current window" if not cur_rows.both_classes else "reference"
            skipped[name] = f"{side} has one class only (AUC undefined)"
            continue
        interval: Interval
        if name == "ece":
            interval = "reference_at_window_size"
            low, high = np.nanquantile(ref_at_window[name], [alpha / 2.0, 1.0 - alpha / 2.0])
            drifted = bool(cur_value[name] > high)
        else:
            interval = "change_bootstrap"
            change = cur_boot[name] - ref_boot[name]
            low, high = np.nanquantile(change, [alpha / 2.0, 1.0 - alpha / 2.0])
            drifted = bool(low > 0.0 or high < 0.0)
        delta = cur_value[name] - ref_value[name]
        drifted = drifted and abs(delta) >= (min_change or {}).get(name, 0.0)
        worse = drifted and (delta > 0 if HIGHER_IS_WORSE[name] else delta < 0)
        metrics.append(
            MetricDrift(
                metric=name,
                reference=ref_value[name],
                current=cur_value[name],
                low=float(low),
                high=float(high),
                interval=interval,
                drifted=drifted,
                worse=worse,
            )
        )
    return result(metrics=metrics, skipped=skipped)


def noise_key(metric: str) -> str:
    """The key of a concept metric's day-to-day noise in a reference profile's ``noise``."""
    return f"concept:{metric}"


def concept_day_noise(
    frame: pl.DataFrame,
    days: pl.Series,
    label: str = "label",
    score: str = "score",
    min_days: int = 3,
) -> dict[str, float]:
    """``{noise_key(metric): largest |metric(one day) - metric(the other days)|}`` over the
    UTC days of ``frame``'s labelled rows; ``{}`` with fewer than ``min_days`` days.

    A day's rows come in sessions, so healthy days differ in AUC and logloss by
    more than the row bootstrap allows (day 26 of the drift benchmark's clean
    world: logloss +0.011 over the reference, past a fixed 0.01); a window's
    change then has to exceed what one healthy day shows against the others.
    Measure it on held-out days: a model's training days score sharper, and
    one held-out day against training days would read as noise.
    """
    keep = frame.select(
        pl.col(label).alias("y"), pl.col(score).alias("p"), days.dt.date().alias("day")
    ).drop_nulls()
    day_of_row = keep.get_column("day").to_physical().to_numpy()
    distinct = np.unique(day_of_row)
    if len(distinct) < min_days:
        return {}
    labels = keep.get_column("y").cast(pl.Float64).to_numpy()
    scores = keep.get_column("p").cast(pl.Float64).to_numpy()
    rows = _Sorted(labels, scores)
    # _Sorted holds rows in score order (stable): put the day of each row in that order.
    in_order = day_of_row[np.argsort(scores, kind="stable")]
    masks = in_order[None, :] == distinct[:, None]  # (D, n)
    one = rows.metrics(masks.astype(np.float64))  # each (D,)
    rest = rows.metrics((~masks).astype(np.float64))
    return {
        noise_key(name): round(float(np.nanmax(np.abs(one[name] - rest[name]))), 6)
        for name in ("auc", "logloss", "ece")
    }


# --------------------------------------------------------------------------- inputs


def _labelled(
    frame: pl.DataFrame,
    label: str,
    score: str,
    side: str,
    max_rows: int | None,
    seed: list[int],
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels (n,), probabilities (n,))`` float64 of the rows with both known."""
    missing = [c for c in (label, score) if c not in frame.columns]
    if missing:
        raise ValueError(f"{side} frame lacks columns {missing}")
    rows = frame.select(label, score).drop_nulls()
    if max_rows is not None:
        rows = sample_rows(rows, max_rows, seed)
    y = rows[label].cast(pl.Float64).to_numpy()
    p = rows[score].cast(pl.Float64).to_numpy()
    if not np.all((y == 0.0) | (y == 1.0)):
        raise ValueError(
            f"{side} {label!r} must be 0/1, found {np.unique(y[(y != 0) & (y != 1)])[:3]}"
        )
    if not np.all(np.isfinite(p)) or (p.size and (p.min() < 0.0 or p.max() > 1.0)):
        raise ValueError(f"{side} {score!r} must be probabilities in [0, 1]")
    return y, p


# --------------------------------------------------------------------------- metrics


class _Sorted:
    """Rows sorted by score, with what the weighted metrics need precomputed.

    ``y`` ``(n,)`` 0/1 and ``p`` ``(n,)`` in score order; ``run_starts`` ``(R,)``
    the first row of each run of tied scores; ``bin_starts`` ``(K,)`` the first
    row of each non-empty ECE bin; ``loss`` ``(n,)`` each row's clipped logloss.
    """

    def __init__(self, labels: np.ndarray, probabilities: np.ndarray) -> None:
        order = np.argsort(probabilities, kind="stable")
        self.y = labels[order]
        self.p = probabilities[order]
        n = self.y.size
        new_run = np.ones(n, dtype=bool)
        new_run[1:] = self.p[1:] != self.p[:-1]
        self.run_starts = np.flatnonzero(new_run)
        edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
        bins = np.searchsorted(edges[1:-1], self.p, side="right")  # (n,) non-decreasing
        new_bin = np.ones(n, dtype=bool)
        new_bin[1:] = bins[1:] != bins[:-1]
        self.bin_starts = np.flatnonzero(new_bin)
        clipped = np.clip(self.p, LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
        self.loss = -(self.y * np.log(clipped) + (1.0 - self.y) * np.log1p(-clipped))
        self.residual = self.p - self.y
        self.both_classes = bool(0.0 < self.y.sum() < n)

    def metrics(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """``{"auc", "logloss", "ece"}`` each ``(B,)`` for row weights ``(B, n)`` (counts).

        AUC: over tied runs in score order, positives' weight times the negative
        weight strictly below plus half the negative weight tied with them, over
        (positive weight x negative weight); ``nan`` without both classes.
        ECE: ``sum_bins |sum w (p - y)| / sum w`` (= ``sum n_b/n |mean p - mean y|``).
        """
        total = weights.sum(axis=1)
        positive = weights * self.y
        pos_runs = np.add.reduceat(positive, self.run_starts, axis=1)  # (B, R)
        neg_runs = np.add.reduceat(weights - positive, self.run_starts, axis=1)
        neg_below = np.cumsum(neg_runs, axis=1) - neg_runs
        pairs = pos_runs.sum(axis=1) * neg_runs.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            auc = (pos_runs * (neg_below + 0.5 * neg_runs)).sum(axis=1) / pairs
        auc[pairs == 0] = np.nan
        logloss = weights @ self.loss / total
        per_bin = np.add.reduceat(weights * self.residual, self.bin_starts, axis=1)
        ece = np.abs(per_bin).sum(axis=1) / total
        return {"auc": auc, "logloss": logloss, "ece": ece}

    def bootstrap(self, size: int, n_boot: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Metrics of ``n_boot`` samples of ``size`` rows drawn with replacement, ``(n_boot,)`` each."""
        n = self.y.size
        chunk = max(1, min(n_boot, CHUNK_CELLS // max(n, size)))
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, n_boot, chunk):
            b = min(chunk, n_boot - start)
            picks = rng.integers(0, n, size=(b, size)) + (np.arange(b) * n)[:, None]
            counts = np.bincount(picks.ravel(), minlength=b * n).reshape(b, n)
            parts.append(self.metrics(counts.astype(np.float64)))
        return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def _json_float(value: float) -> float | None:
    return value if np.isfinite(value) else None
