"""Data and prediction drift through Evidently, on synthetic columns with known answers.

Reference: ``x ~ N(0, 1)``, ``y ~ N(5, 2)``, ``c`` in {a, b, c} with shares
(0.5, 0.3, 0.2), ``k`` an integer code 0..9, uniform. Drifted windows move ``x``
by one standard deviation (normalised Wasserstein distance = 1) and ``c`` to
shares (0.3, 0.3, 0.4) (Jensen-Shannon distance 0.172, worked out in
``test_drift_flags_exactly_the_shifted_columns``); ``y`` and ``k`` stay put.
Evidently imports in ~5 s: the module's first call pays it once.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from infra.config import DriftTestConfig
from monitoring.drift import (
    DriftResult,
    choose_test,
    data_drift,
    day_noise,
    prediction_drift,
)

KINDS = {"x": "numeric", "y": "numeric", "c": "categorical", "k": "categorical"}
REFERENCE_SHARES = (0.5, 0.3, 0.2)
DRIFTED_SHARES = (0.3, 0.3, 0.4)
SMALL, LARGE = 500, 5_000  # either side of the default large_window_rows (1000)
CONFIG = DriftTestConfig(large_window_rows=1_000, p_value_correction="none")


def _frame(n: int, seed: int, x_mean: float = 0.0, shares=REFERENCE_SHARES) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "x": rng.normal(x_mean, 1.0, n),
            "y": rng.normal(5.0, 2.0, n),
            "c": rng.choice(["a", "b", "c"], size=n, p=shares),
            "k": rng.integers(0, 10, n),
        }
    )


@pytest.fixture(scope="module")
def reference() -> pl.DataFrame:
    return _frame(20_000, seed=100)


@pytest.fixture(scope="module")
def drifted_large(reference: pl.DataFrame) -> DriftResult:
    current = _frame(LARGE, seed=1, x_mean=1.0, shares=DRIFTED_SHARES)
    return data_drift(reference, current, KINDS, CONFIG, max_rows=100_000, seed=0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_distribution_large_window_flags_nothing(reference: pl.DataFrame, seed: int) -> None:
    # Distances of a 5000-row sample from its own distribution: Wasserstein ~0.02,
    # Jensen-Shannon ~0.01-0.02, far below 0.1.
    result = data_drift(reference, _frame(LARGE, seed), KINDS, CONFIG, max_rows=100_000, seed=0)
    assert result.drifted == ()
    assert all(c.statistic < 0.5 * c.test.threshold for c in result.columns)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_distribution_small_window_flags_nothing(reference: pl.DataFrame, seed: int) -> None:
    # p-value tests flag a clean column with probability alpha; at alpha = 0.01
    # over 4 columns (Bonferroni: 0.0025 each) a clean window flags with p <= 1 %.
    config = DriftTestConfig(p_value_threshold=0.01)
    result = data_drift(
        reference, _frame(SMALL, seed), KINDS, config, 100_000, 0, p_value_correction="bonferroni"
    )
    assert result.drifted == ()
    assert {c.test.threshold for c in result.columns} == {0.0025}


def test_drift_flags_exactly_the_shifted_columns(drifted_large: DriftResult) -> None:
    assert drifted_large.drifted == ("x", "c")
    assert drifted_large.drifted_share == 0.5
    # N(0,1) -> N(1,1): the Wasserstein distance is the shift, 1 std.
    assert drifted_large["x"].statistic == pytest.approx(1.0, abs=0.05)
    # Jensen-Shannon distance (natural log) of p = (.5,.3,.2) and q = (.3,.3,.4):
    # m = (.4,.3,.3); KL(p|m) = .5 ln 1.25 + .2 ln(2/3) = 0.0305,
    # KL(q|m) = .3 ln .75 + .4 ln(4/3) = 0.0288; sqrt((0.0305 + 0.0288) / 2) = 0.172.
    p, q = np.array(REFERENCE_SHARES), np.array(DRIFTED_SHARES)
    m = (p + q) / 2
    expected = math.sqrt((np.sum(p * np.log(p / m)) + np.sum(q * np.log(q / m))) / 2)
    assert expected == pytest.approx(0.172, abs=0.001)
    assert drifted_large["c"].statistic == pytest.approx(expected, abs=0.02)


def test_summaries_describe_both_sides(drifted_large: DriftResult) -> None:
    x = drifted_large["x"]
    assert x.reference["mean"] == pytest.approx(0.0, abs=0.05)
    assert x.current["mean"] == pytest.approx(1.0, abs=0.05)
    assert x.current["std"] == pytest.approx(1.0, abs=0.05)
    assert x.current["p05"] < x.current["p50"] < x.current["p95"]
    c = drifted_large["c"]
    # The same categories on both sides, in the reference's order of share.
    assert [t["value"] for t in c.reference["top"]] == ["a", "b", "c"]
    assert [t["value"] for t in c.current["top"]] == ["a", "b", "c"]
    assert [t["share"] for t in c.current["top"]] == pytest.approx(DRIFTED_SHARES, abs=0.02)
    assert c.brief("current").startswith("a 3")  # "a 30% · b 30% · c 40% · n 5000"
    assert x.describe() == f"x: wasserstein {x.statistic:.4g} >= 0.1 (drift)"
    assert json.loads(json.dumps(drifted_large.to_dict()))["drifted"] == ["x", "c"]


def test_small_window_flags_the_same_columns_with_p_value_tests(reference: pl.DataFrame) -> None:
    current = _frame(SMALL, seed=1, x_mean=1.0, shares=DRIFTED_SHARES)
    result = data_drift(reference, current, KINDS, CONFIG, max_rows=100_000, seed=0)
    assert result.drifted == ("x", "c")
    assert [c.test.method for c in result.columns] == ["ks", "ks", "chisquare", "chisquare"]
    assert {c.test.family for c in result.columns} == {"p_value"}
    assert result["x"].statistic < 1e-10  # a 1-std shift over 500 rows


def test_window_size_picks_the_test_family(drifted_large: DriftResult) -> None:
    assert [c.test.method for c in drifted_large.columns] == [
        "wasserstein",
        "wasserstein",
        "jensenshannon",
        "jensenshannon",
    ]
    assert choose_test("x", "numeric", 999, CONFIG).method == "ks"
    assert choose_test("x", "numeric", 1_000, CONFIG).method == "wasserstein"
    assert choose_test("c", "categorical", 999, CONFIG).threshold == 0.05
    assert choose_test("c", "categorical", 1_000, CONFIG).threshold == 0.1


def test_thresholds_follow_the_test_family_and_per_column_overrides() -> None:
    config = DriftTestConfig(numeric_large="ks", thresholds={"y": 0.3})
    # A p-value test named for large windows keeps the p-value threshold.
    assert choose_test("x", "numeric", 5_000, config).threshold == 0.05
    assert choose_test("y", "numeric", 5_000, config).threshold == 0.3
    with pytest.raises(ValueError, match="unknown drift test 'nope'"):
        choose_test("x", "numeric", 10, DriftTestConfig(numeric_small="nope"))
    with pytest.raises(ValueError, match="does not take categorical"):
        choose_test("c", "categorical", 10, DriftTestConfig(categorical_small="ks"))
    with pytest.raises(ValueError, match="sequence"):
        choose_test("h", "sequence", 10, CONFIG)


def test_sampling_caps_the_rows_evidently_sees(reference: pl.DataFrame) -> None:
    current = _frame(30_000, seed=4, x_mean=1.0)
    config = DriftTestConfig(large_window_rows=5_000)
    result = data_drift(reference, current, KINDS, config, max_rows=2_000, seed=0)
    assert (result.current_rows, result.current_rows_used) == (30_000, 2_000)
    assert (result.reference_rows, result.reference_rows_used) == (20_000, 2_000)
    # Evidently's own row count, and the window size that chose the test, are the sample's.
    metrics = result.snapshot.dict()["metrics"]
    counts = [m["value"] for m in metrics if m["metric_name"].startswith("RowCount")]
    assert counts == [2_000]
    assert result["x"].test.method == "ks" and result["x"].current["rows"] == 2_000
    assert result.drifted == ("x",)
    # Seeded: the same seed judges the same rows, another seed other rows.
    again = data_drift(reference, current, KINDS, config, max_rows=2_000, seed=0)
    other = data_drift(reference, current, KINDS, config, max_rows=2_000, seed=1)
    assert again["y"].statistic == result["y"].statistic != other["y"].statistic


def test_many_categories_fold_into_other(reference: pl.DataFrame) -> None:
    # 5000 equally likely hash buckets: a 5000-row window sees each ~once, so the
    # raw Jensen-Shannon distance is large from noise alone; folded to the
    # reference's 20 most frequent + __other__ it stays small.
    rng = np.random.default_rng(0)
    ref = pl.DataFrame({"h": rng.integers(0, 5_000, 20_000)})
    cur = pl.DataFrame({"h": rng.integers(0, 5_000, LARGE)})
    folded = data_drift(ref, cur, {"h": "categorical"}, CONFIG, 100_000, 0)
    raw = data_drift(ref, cur, {"h": "categorical"}, CONFIG, 100_000, 0, max_categories=10_000)
    assert folded.drifted == () and folded["h"].statistic < 0.05
    assert raw.drifted == ("h",)


def test_new_values_and_nulls_show_as_other_and_null() -> None:
    ref = pl.DataFrame({"c": ["a", "b"] * 1_000})
    cur = pl.DataFrame({"c": ["a", "b", "zzz", None] * 500})
    result = data_drift(ref, cur, {"c": "categorical"}, CONFIG, 100_000, 0)
    assert result.drifted == ("c",)
    assert result["c"].current["null_share"] == 0.25


def test_a_column_without_values_is_not_judged(reference: pl.DataFrame) -> None:
    current = _frame(LARGE, seed=5).with_columns(pl.lit(None, dtype=pl.Float64).alias("y"))
    result = data_drift(reference, current, KINDS, CONFIG, 100_000, 0)
    assert not result["y"].judged and result["y"].reason == "no values in the current rows"
    assert result.judged == ("x", "c", "k") and result.drifted == ()
    assert result["y"].describe() == "y: not judged (no values in the current rows)"


def test_prediction_drift_is_one_numeric_column() -> None:
    rng = np.random.default_rng(0)
    ref = pl.DataFrame({"score": rng.beta(2, 20, 20_000)})  # a CTR-like score, mean 0.09
    same = pl.DataFrame({"score": rng.beta(2, 20, LARGE)})
    higher = pl.DataFrame({"score": rng.beta(4, 20, LARGE)})  # mean 0.17
    assert prediction_drift(ref, same, CONFIG, 100_000, 0).drifted == ()
    result = prediction_drift(ref, higher, CONFIG, 100_000, 0)
    assert result.drifted == ("score",) and result["score"].test.method == "wasserstein"


def test_reports_save_as_html_and_json(drifted_large: DriftResult, tmp_path: Path) -> None:
    # pathlib.Path works (Evidently's own save_html silently writes nothing for one).
    html = drifted_large.save_html(tmp_path / "drift.html").local_path()
    saved = drifted_large.save_json(str(tmp_path / "drift.json")).local_path()
    assert html.stat().st_size > 100_000 and "<html" in html.read_text()[:2_000].lower()
    report = json.loads(saved.read_text())
    drift_metrics = [m for m in report["metrics"] if m["metric_name"].startswith("ValueDrift")]
    assert [m["config"]["column"] for m in drift_metrics] == ["x", "y", "c", "k"]
    failed = [t["name"] for t in report["tests"] if t["status"] == "FAIL"]
    assert failed == ["Value Drift for column x", "Value Drift for column c"]


def test_missing_columns_are_named(reference: pl.DataFrame) -> None:
    with pytest.raises(ValueError, match=r"y \(current\)"):
        data_drift(reference, _frame(10, 0).drop("y"), KINDS, CONFIG, 100, 0)


def test_an_empty_window_judges_nothing_and_still_saves(
    reference: pl.DataFrame, tmp_path: Path
) -> None:
    result = data_drift(reference, _frame(0, 0), KINDS, CONFIG, 100_000, 0)
    assert result.judged == () and result.drifted == () and result.snapshot is None
    assert result.drifted_share == 0.0
    assert "No column" in result.save_html(tmp_path / "empty.html").local_path().read_text()


def test_day_noise_raises_thresholds_to_what_healthy_days_show() -> None:
    """Days that differ by a per-day offset (clustered traffic): the leave-one-day-out
    distance measures it, and a window shifted by as much is then no drift."""
    rng = np.random.default_rng(5)
    offsets = [0.0, 0.25, -0.2, 0.1, -0.1]
    days = pl.Series(
        "ts",
        [dt.datetime(2024, 1, 1 + d) for d, _ in enumerate(offsets) for _ in range(4_000)],
    )
    x = np.concatenate([rng.normal(o, 1.0, 4_000) for o in offsets])
    stable = rng.normal(0.0, 1.0, x.size)
    frame = pl.DataFrame({"x": x, "stable": stable})
    columns = {"x": "numeric", "stable": "numeric"}
    config = DriftTestConfig(large_window_rows=1_000, noise_margin=1.5)
    noise = day_noise(frame, days, columns, config, 5_000, seed=0)
    assert noise["x"] > 0.1 > noise["stable"]
    # Fewer than min_days days: nothing is calibrated.
    assert day_noise(frame.head(8_000), days.head(8_000), columns, config, 5_000, 0) == {}
    window = pl.DataFrame(
        {"x": rng.normal(0.25, 1.0, 4_000), "stable": rng.normal(0.0, 1.0, 4_000)}
    )
    plain = data_drift(frame, window, columns, config, 20_000, seed=1)
    calibrated = data_drift(frame, window, columns, config, 20_000, seed=1, noise=noise)
    assert plain["x"].drifted and not calibrated["x"].drifted
    assert calibrated["x"].test.threshold == pytest.approx(1.5 * noise["x"])
    # A real shift still clears the calibrated threshold.
    shifted = window.with_columns(pl.col("x") + 1.0)
    assert data_drift(frame, shifted, columns, config, 20_000, seed=1, noise=noise)["x"].drifted
