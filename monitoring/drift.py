"""Data and prediction drift, one Evidently test per column.

:func:`data_drift` compares a current window with the reference profile column by
column through Evidently's ``ValueDrift`` metric (one ``Report`` for all columns,
so one HTML and one JSON per run); :func:`prediction_drift` is the same on the
score column.

Which test (``monitoring.drift``, :class:`infra.config.DriftTestConfig`)
    Chosen by the column's kind and by the rows of the current window the test
    sees (after sampling): fewer than ``large_window_rows`` take a test with a
    p-value (``numeric_small`` KS, ``categorical_small`` chi-squared: drift at
    ``p < p_value_threshold``); more take a distance (``numeric_large``
    Wasserstein normalised by the reference's std, ``categorical_large``
    Jensen-Shannon: drift at ``distance >= distance_threshold``), since with
    enough rows any difference, however small, is significant. A column listed
    in ``thresholds`` uses that threshold for whichever test it gets. The
    threshold family follows the test, not the window size, so a config that
    names a p-value test for large windows still gets a p-value threshold.

Columns as Evidently sees them
    Numeric: float64; nulls and non-finite values are dropped by the test (their
    share is in the summary). Categorical: strings; the reference's
    ``max_categories`` most frequent values are kept, every other value (also
    one never seen in the reference) becomes ``"__other__"`` and null becomes
    ``"__null__"``. Without that, a feature with thousands of hash buckets has a
    Jensen-Shannon distance above any sensible threshold from sampling noise
    alone, and chi-squared has empty expected cells; with it, a new value taking
    over shows as a jump of ``"__other__"``, and a feature going null as one of
    ``"__null__"``.

Sampling and cost
    The current window is reduced to ``max_rows`` rows (``monitoring.max_window_rows``)
    by a uniform sample without replacement, seeded (``default_rng([seed, 0])``,
    rows kept in their order); the reference likewise (``[seed, 1]``; it is
    normally already a ``reference_rows`` sample). A rerun of the same window with
    the same seed judges the same rows. Evidently's cost is linear in the rows it
    sees, so one run costs at most about ``columns x 2 x max_rows`` row-tests
    whatever the window's size: measured here ~0.08-0.14 s per column for 100k
    current + 50k reference rows (KS 0.08, chi-squared 0.06, Wasserstein 0.14,
    Jensen-Shannon 0.08); a 1M-row window of 20 columns takes 2.4 s end to end
    at the default bound (sampling and summaries included, ~0.7 GB peak). A
    100k-row uniform sample moves a share by at most ~0.5 percentage point and
    a mean by ~0.01 std (3 sigma), far below what the thresholds call drift.

Summaries (for the e-mail and the CLI) are computed on the same sampled rows the
test saw: numbers get mean, std, min, 5/25/50/75/95 % quantiles and max;
categories get the shares of the reference's and the window's most frequent
values, the same values on both sides so they line up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import polars as pl

from features.feature_spec import FeatureKind
from infra.config import DriftTestConfig
from infra.storage import StoragePath
from monitoring.columns import column_kinds, sample_rows
from monitoring.verdict import noise_threshold

if TYPE_CHECKING:
    from evidently import Run

TestFamily = Literal["p_value", "distance"]

# Evidently 0.7 drift methods (``ValueDrift(method=...)``): what they return and
# which column kinds take them. A p-value flags drift below its threshold, a
# distance at or above it (Evidently decides; this says which threshold applies).
_NUM, _CAT = FeatureKind.NUMERIC, FeatureKind.CATEGORICAL
TESTS: dict[str, tuple[TestFamily, frozenset[FeatureKind]]] = {
    "ks": ("p_value", frozenset({_NUM})),
    "anderson": ("p_value", frozenset({_NUM})),
    "cramer_von_mises": ("p_value", frozenset({_NUM})),
    "es": ("p_value", frozenset({_NUM})),
    "mannw": ("p_value", frozenset({_NUM})),
    "t_test": ("p_value", frozenset({_NUM})),
    "empirical_mmd": ("p_value", frozenset({_NUM})),
    "chisquare": ("p_value", frozenset({_CAT})),
    "z": ("p_value", frozenset({_CAT})),
    "fisher_exact": ("p_value", frozenset({_CAT})),
    "g_test": ("p_value", frozenset({_CAT})),
    "TVD": ("p_value", frozenset({_CAT})),
    "wasserstein": ("distance", frozenset({_NUM})),
    "ed": ("distance", frozenset({_NUM})),
    "psi": ("distance", frozenset({_NUM, _CAT})),
    "kl_div": ("distance", frozenset({_NUM, _CAT})),
    "hellinger": ("distance", frozenset({_NUM, _CAT})),
    "jensenshannon": ("distance", frozenset({_NUM, _CAT})),
}

# Categories kept per categorical column (the reference's most frequent); the
# rest fold into OTHER (the default of DriftTestConfig.max_categories).
MAX_CATEGORIES = 20
OTHER = "__other__"
NULL = "__null__"
# Values listed per side in a categorical summary (the union of both sides' top).
TOP_CATEGORIES = 5
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class DriftTest:
    """The Evidently method for one column, its family and its threshold."""

    method: str
    family: TestFamily
    threshold: float


def choose_test(column: str, kind: str, rows: int, config: DriftTestConfig) -> DriftTest:
    """The test for ``column`` of ``kind`` when the current window shows ``rows`` rows.

    ``rows >= config.large_window_rows`` is a large window (distance), fewer a
    small one (p-value); the threshold is ``config.thresholds[column]`` when set,
    else the default of the method's family.
    """
    typed = column_kinds({column: kind})[column]
    large = rows >= config.large_window_rows
    if typed == FeatureKind.NUMERIC:
        method = config.numeric_large if large else config.numeric_small
    else:
        method = config.categorical_large if large else config.categorical_small
    if method not in TESTS:
        raise ValueError(f"unknown drift test {method!r}; Evidently 0.7 has {sorted(TESTS)}")
    family, kinds = TESTS[method]
    if typed not in kinds:
        raise ValueError(f"drift test {method!r} does not take {typed.value} columns ({column!r})")
    default = config.p_value_threshold if family == "p_value" else config.distance_threshold
    return DriftTest(method, family, config.thresholds.get(column, default))


@dataclass(frozen=True)
class ColumnDrift:
    """The verdict on one column.

    ``statistic`` is the p-value or the distance (``None`` when not judged);
    ``reference`` / ``current`` summarise the rows the test saw (see the module
    docstring); ``judged`` is False with a ``reason`` when the column could not be
    tested (no values on one side).
    """

    column: str
    kind: FeatureKind
    test: DriftTest | None
    statistic: float | None
    drifted: bool
    reference: dict[str, Any]
    current: dict[str, Any]
    judged: bool = True
    reason: str = ""

    def describe(self) -> str:
        """One line for logs and e-mails, e.g. ``x: wasserstein 0.93 >= 0.1 (drift)``."""
        if not self.judged or self.test is None or self.statistic is None:
            return f"{self.column}: not judged ({self.reason})"
        if self.test.family == "p_value":
            relation = "<" if self.statistic < self.test.threshold else ">="
            label = f"{self.test.method} p"
        else:
            relation = ">=" if self.statistic >= self.test.threshold else "<"
            label = self.test.method
        verdict = "drift" if self.drifted else "no drift"
        return f"{self.column}: {label} {self.statistic:.4g} {relation} {self.test.threshold:g} ({verdict})"

    def brief(self, side: Literal["reference", "current"]) -> str:
        """A short summary of one side, e.g. ``mean 0.01 · std 1 · p50 0.02 · n 50000``
        or ``a 50% · b 30% · c 20% · null 0% · n 50000``."""
        summary = self.reference if side == "reference" else self.current
        parts: list[str] = []
        if self.kind == FeatureKind.NUMERIC:
            for key in ("mean", "std", "p05", "p50", "p95"):
                if summary.get(key) is not None:
                    parts.append(f"{key} {summary[key]:.3g}")
        else:
            parts += [f"{item['value']} {item['share']:.0%}" for item in summary.get("top", [])]
        if summary.get("null_share"):
            parts.append(f"null {summary['null_share']:.0%}")
        parts.append(f"n {summary.get('rows', 0)}")
        return " · ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "kind": self.kind.value,
            "test": self.test.method if self.test else None,
            "test_family": self.test.family if self.test else None,
            "threshold": self.test.threshold if self.test else None,
            "statistic": _finite(self.statistic),
            "drifted": self.drifted,
            "judged": self.judged,
            "reason": self.reason,
            "reference": self.reference,
            "current": self.current,
        }


@dataclass(frozen=True)
class DriftResult:
    """Per-column verdicts of one window plus the Evidently run behind them.

    ``*_rows`` the rows given, ``*_rows_used`` the rows Evidently saw (after
    sampling); ``snapshot`` the Evidently ``Run`` (``None`` when no column could
    be judged), kept for :meth:`save_html` / :meth:`save_json`.
    """

    columns: tuple[ColumnDrift, ...]
    reference_rows: int
    current_rows: int
    reference_rows_used: int
    current_rows_used: int
    seed: int
    snapshot: Run | None = field(default=None, repr=False, compare=False)

    def __getitem__(self, column: str) -> ColumnDrift:
        for item in self.columns:
            if item.column == column:
                return item
        raise KeyError(f"no drift result for column {column!r}")

    @property
    def drifted(self) -> tuple[str, ...]:
        return tuple(c.column for c in self.columns if c.drifted)

    @property
    def judged(self) -> tuple[str, ...]:
        return tuple(c.column for c in self.columns if c.judged)

    @property
    def drifted_share(self) -> float:
        """Drifted columns over judged columns (0 when none was judged)."""
        judged = len(self.judged)
        return len(self.drifted) / judged if judged else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference_rows": self.reference_rows,
            "current_rows": self.current_rows,
            "reference_rows_used": self.reference_rows_used,
            "current_rows_used": self.current_rows_used,
            "seed": self.seed,
            "drifted": list(self.drifted),
            "drifted_share": self.drifted_share,
            "columns": [c.to_dict() for c in self.columns],
        }

    def save_html(self, path: StoragePath | str | os.PathLike[str]) -> StoragePath:
        """Evidently's HTML report (~4 MB: it embeds its JS), written atomically."""
        target = _storage(path)
        if self.snapshot is None:
            html = "<html><body><p>No column could be judged in this window.</p></body></html>"
        else:
            html = self.snapshot.get_html_str(as_iframe=False)
        target.write_text_atomic(html)
        return target

    def save_json(self, path: StoragePath | str | os.PathLike[str]) -> StoragePath:
        """Evidently's JSON (``{"metrics": [...], "tests": [...]}``), written atomically."""
        target = _storage(path)
        text = '{"metrics": [], "tests": []}' if self.snapshot is None else self.snapshot.json()
        target.write_text_atomic(text)
        return target


def data_drift(
    reference: pl.DataFrame,
    current: pl.DataFrame,
    columns: Mapping[str, str],
    config: DriftTestConfig,
    max_rows: int,
    seed: int,
    max_categories: int | None = None,
    p_value_correction: Literal["none", "bonferroni"] | None = None,
    noise: Mapping[str, float] | None = None,
) -> DriftResult:
    """Judge each of ``columns`` (``{name: "numeric" | "categorical"}``) for drift.

    ``noise`` ``{column: distance}``: the reference's own day-to-day distance per
    column (:func:`day_noise`); a distance test's threshold is then at least
    ``config.noise_margin`` times it, so a column whose healthy days already
    differ by more than the configured threshold (clustered traffic: one
    user's session is many rows) is judged against what healthy looks like.

    Both frames are sampled to at most ``max_rows`` rows (uniform, seeded; see
    the module docstring for the cost this bounds), the test per column comes
    from :func:`choose_test` on the current rows seen, and Evidently decides each
    verdict. Columns with no value on one side are reported as not judged.

    ``p_value_correction="bonferroni"`` divides the threshold of each p-value
    test by the number of columns that got one: at ``p < 0.05`` per column, 20
    clean columns flag at least one in 64 % of small windows; corrected, in 5 %.
    """
    # Unset: the config's (DriftTestConfig.max_categories, .p_value_correction).
    max_categories = max_categories or config.max_categories
    p_value_correction = p_value_correction or config.p_value_correction
    if p_value_correction not in ("none", "bonferroni"):
        raise ValueError(f"p_value_correction must be none or bonferroni: {p_value_correction!r}")
    kinds = column_kinds(columns)
    missing = sorted(
        f"{name} ({side})"
        for side, frame in (("reference", reference), ("current", current))
        for name in kinds
        if name not in frame.columns
    )
    if missing:
        raise ValueError(f"drift columns missing from the frames: {missing}")
    names = list(kinds)
    ref = sample_rows(reference.select(names), max_rows, [seed, 1])
    cur = sample_rows(current.select(names), max_rows, [seed, 0])

    prepared_ref: dict[str, Any] = {}
    prepared_cur: dict[str, Any] = {}
    plans: dict[str, tuple[DriftTest, dict[str, Any], dict[str, Any]]] = {}
    skipped: list[ColumnDrift] = []
    for name, kind in kinds.items():
        if kind == FeatureKind.NUMERIC:
            ref_values, cur_values = _numeric(ref[name]), _numeric(cur[name])
            ref_summary, cur_summary = _numeric_summary(ref_values), _numeric_summary(cur_values)
            empty = [
                s
                for s, v in (("reference", ref_values), ("current", cur_values))
                if not np.isfinite(v).any()
            ]
        else:
            ref_values, cur_values = _categories(ref[name], cur[name], max_categories)
            ref_summary, cur_summary = _category_summaries(ref[name], cur[name])
            empty = [s for s, f in (("reference", ref), ("current", cur)) if f.height == 0]
        if empty:
            reason = f"no values in the {' and '.join(empty)} rows"
            skipped.append(
                ColumnDrift(name, kind, None, None, False, ref_summary, cur_summary, False, reason)
            )
            continue
        prepared_ref[name], prepared_cur[name] = ref_values, cur_values
        test = choose_test(name, kind, cur.height, config)
        if noise and name in noise and test.family == "distance" and name not in config.thresholds:
            threshold = noise_threshold(test.threshold, config.noise_margin, noise[name])
            test = replace(test, threshold=threshold)
        plans[name] = (test, ref_summary, cur_summary)

    tested = [name for name, (test, _, _) in plans.items() if test.family == "p_value"]
    if p_value_correction == "bonferroni" and len(tested) > 1:
        for name in tested:
            test, ref_summary, cur_summary = plans[name]
            corrected = replace(test, threshold=test.threshold / len(tested))
            plans[name] = (corrected, ref_summary, cur_summary)

    snapshot = None
    verdicts: dict[str, tuple[float, bool]] = {}
    if plans:
        snapshot, verdicts = _run_evidently(
            pd.DataFrame(prepared_ref),
            pd.DataFrame(prepared_cur),
            {name: (kinds[name], test) for name, (test, _, _) in plans.items()},
        )
    results = {c.column: c for c in skipped}
    for name, (test, ref_summary, cur_summary) in plans.items():
        statistic, drifted = verdicts[name]
        results[name] = ColumnDrift(
            name, kinds[name], test, statistic, drifted, ref_summary, cur_summary
        )
    return DriftResult(
        columns=tuple(results[name] for name in names),
        reference_rows=reference.height,
        current_rows=current.height,
        reference_rows_used=ref.height,
        current_rows_used=cur.height,
        seed=seed,
        snapshot=snapshot,
    )


def prediction_drift(
    reference: pl.DataFrame,
    current: pl.DataFrame,
    config: DriftTestConfig,
    max_rows: int,
    seed: int,
    column: str = "score",
    noise: Mapping[str, float] | None = None,
) -> DriftResult:
    """Drift of the model's score distribution: :func:`data_drift` on one numeric column."""
    return data_drift(
        reference, current, {column: FeatureKind.NUMERIC}, config, max_rows, seed, noise=noise
    )


def day_noise(
    frame: pl.DataFrame,
    day: pl.Series,
    columns: Mapping[str, str],
    config: DriftTestConfig,
    max_rows: int,
    seed: int,
    min_days: int = 3,
) -> dict[str, float]:
    """The largest leave-one-day-out distance per column: each UTC ``day`` of ``frame``
    (the reference rows) against the others, by the distance test of a large window.

    Healthy traffic is clustered (a session is many rows, a heavy user many
    sessions), so one day differs from the next by more than sampling noise;
    this is how much, measured where nothing drifted. Each side is sampled to
    ``max_rows`` rows. Empty (nothing calibrated) with fewer than ``min_days``
    days.
    """
    days = day.cast(pl.Date)
    distinct = days.unique().sort().to_list()
    if len(distinct) < min_days:
        return {}
    # Every column takes its distance test, whatever the day's size.
    distances = config.model_copy(update={"large_window_rows": 1, "thresholds": {}})
    noise: dict[str, float] = {}
    for index, value in enumerate(distinct):
        mask = days == value
        result = data_drift(
            frame.filter(~mask),
            frame.filter(mask),
            columns,
            distances,
            max_rows,
            seed + index,
            p_value_correction="none",
        )
        for column in result.columns:
            if column.statistic is not None and math.isfinite(column.statistic):
                noise[column.column] = max(noise.get(column.column, 0.0), column.statistic)
    return {name: round(value, 6) for name, value in noise.items()}


# --------------------------------------------------------------------------- Evidently


def _run_evidently(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    tests: Mapping[str, tuple[FeatureKind, DriftTest]],
) -> tuple[Run, dict[str, tuple[float, bool]]]:
    """One Report: ``RowCount`` and a ``ValueDrift`` per column; ``{column: (statistic, drifted)}``.

    The verdict is Evidently's own (its per-metric test: ``FAIL`` = drift), so the
    edge convention (``p <= t`` for KS, ``p < t`` for chi-squared) is Evidently's.
    """
    # Imported here: evidently takes ~5 s to import, and only a monitoring run needs it.
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import RowCount, ValueDrift

    definition = DataDefinition(
        numerical_columns=[n for n, (k, _) in tests.items() if k == FeatureKind.NUMERIC],
        categorical_columns=[n for n, (k, _) in tests.items() if k == FeatureKind.CATEGORICAL],
    )
    metrics = {
        name: ValueDrift(column=name, method=test.method, threshold=test.threshold)
        for name, (_, test) in tests.items()
    }
    # RowCount first: the report states how many (sampled) rows each side had.
    # tests=[]: with include_tests its default test fails whenever the window's
    # size is not the reference's +-10 %, which is no finding.
    report = Report([RowCount(tests=[]), *metrics.values()], include_tests=True)
    snapshot = report.run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    verdicts: dict[str, tuple[float, bool]] = {}
    for name, metric in metrics.items():
        result = snapshot.metric_results[metric.metric_id]
        # TestStatus lives in evidently.legacy; its value is the stable part.
        failed = [t for t in result.tests if t.status.value == "FAIL"]
        verdicts[name] = (float(result.value), bool(failed))
    return snapshot, verdicts


# --------------------------------------------------------------------------- columns


def _numeric(series: pl.Series) -> np.ndarray:
    """float64 with NaN for null and for non-finite values."""
    values = series.cast(pl.Float64).to_numpy().astype(np.float64, copy=True)
    values[~np.isfinite(values)] = np.nan
    return values


def _categories(
    reference: pl.Series, current: pl.Series, max_categories: int
) -> tuple[np.ndarray, np.ndarray]:
    """Both sides as strings over the reference's ``max_categories`` values + OTHER + NULL."""
    ref_text, cur_text = reference.cast(pl.String), current.cast(pl.String)
    counts = (
        ref_text.drop_nulls()
        .value_counts(name="n")
        .sort(["n", ref_text.name], descending=[True, False])
    )
    keep = counts[ref_text.name].head(max_categories)

    def fold(series: pl.Series) -> np.ndarray:
        frame = series.to_frame("v").select(
            pl.when(pl.col("v").is_null())
            .then(pl.lit(NULL))
            .when(pl.col("v").is_in(keep.implode()))
            .then(pl.col("v"))
            .otherwise(pl.lit(OTHER))
        )
        return frame.to_series().to_numpy().astype(object)

    return fold(ref_text), fold(cur_text)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _numeric_summary(values: np.ndarray) -> dict[str, Any]:
    present = values[np.isfinite(values)]
    summary: dict[str, Any] = {
        "rows": int(values.size),
        "null_share": float(1.0 - present.size / values.size) if values.size else None,
    }
    if present.size == 0:
        return summary | {"mean": None, "std": None, "min": None, "max": None}
    quantiles = np.quantile(present, QUANTILES)
    summary |= {
        "mean": float(present.mean()),
        "std": _finite(float(present.std(ddof=1))) if present.size > 1 else None,
        "min": float(present.min()),
        **{f"p{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, quantiles, strict=True)},
        "max": float(present.max()),
    }
    return summary


def _category_summaries(
    reference: pl.Series, current: pl.Series
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Shares of the union of both sides' TOP_CATEGORIES values, ordered by reference share."""
    ref_text, cur_text = reference.cast(pl.String), current.cast(pl.String)

    def shares(series: pl.Series) -> dict[str, float]:
        if series.len() == 0:
            return {}
        counts = series.drop_nulls().value_counts(name="n")
        return {
            value: n / series.len()
            for value, n in zip(counts[series.name], counts["n"], strict=True)
        }

    ref_shares, cur_shares = shares(ref_text), shares(cur_text)

    def top(values: dict[str, float]) -> list[str]:
        return [v for v, _ in sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))][
            :TOP_CATEGORIES
        ]

    picked = list(dict.fromkeys([*top(ref_shares), *top(cur_shares)]))
    picked.sort(key=lambda v: (-ref_shares.get(v, 0.0), -cur_shares.get(v, 0.0), v))

    def summary(series: pl.Series, values: dict[str, float]) -> dict[str, Any]:
        rows = series.len()
        return {
            "rows": rows,
            "null_share": series.null_count() / rows if rows else None,
            "distinct": series.drop_nulls().n_unique(),
            "top": [{"value": v, "share": values.get(v, 0.0)} for v in picked],
        }

    return summary(ref_text, ref_shares), summary(cur_text, cur_shares)


def _storage(path: StoragePath | str | os.PathLike[str]) -> StoragePath:
    # Evidently's own save_html/save_json write nothing for a pathlib.Path (they
    # check isinstance(str)); writing its strings ourselves also works on s3://.
    return path if isinstance(path, StoragePath) else StoragePath.from_uri(path)
