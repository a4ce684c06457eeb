"""Concept drift: AUC, logloss, ECE of a window against the reference, with bootstrap intervals.

Synthetic model: logit ~ N(-1, 1.2), score = sigmoid(logit), label ~ Bernoulli(score),
so the scores are calibrated and AUC is ~0.77. Shuffling the scores against the
labels keeps every marginal distribution and destroys the relation (AUC 0.5).
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from models.ctr_metrics import auc, expected_calibration_error, logloss
from monitoring.concept import _Sorted, concept_drift

CI, MIN_LABELS = 0.95, 500


def _window(n: int, seed: int, shuffle: bool = False) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    score = 1.0 / (1.0 + np.exp(-rng.normal(-1.0, 1.2, n)))
    label = (rng.random(n) < score).astype(np.int64)
    score = np.round(score, 3)  # ties, as float32 scores have
    if shuffle:
        score = rng.permutation(score)
    return pl.DataFrame({"label": label, "score": score})


@pytest.fixture(scope="module")
def reference() -> pl.DataFrame:
    return _window(20_000, seed=100)


def test_weighted_metrics_are_those_of_models_ctr_metrics() -> None:
    frame = _window(3_000, seed=0)
    y, p = frame["label"].to_numpy().astype(float), frame["score"].to_numpy()
    rows = _Sorted(y, p)
    ones = rows.metrics(np.ones((1, y.size)))
    assert ones["auc"][0] == pytest.approx(auc(y, p), abs=1e-12)
    assert ones["logloss"][0] == pytest.approx(logloss(y, p), abs=1e-12)
    assert ones["ece"][0] == pytest.approx(expected_calibration_error(y, p)[0], abs=1e-12)
    # A resample as counts equals the metrics of the resampled rows themselves
    # (rows are in score order inside _Sorted, so resample in that order).
    rng = np.random.default_rng(1)
    picks = rng.integers(0, y.size, y.size)
    counts = np.bincount(picks, minlength=y.size)[None, :].astype(float)
    got = rows.metrics(counts)
    ys, ps = rows.y[picks], rows.p[picks]
    assert got["auc"][0] == pytest.approx(auc(ys, ps), abs=1e-12)
    assert got["logloss"][0] == pytest.approx(logloss(ys, ps), abs=1e-12)
    assert got["ece"][0] == pytest.approx(expected_calibration_error(ys, ps)[0], abs=1e-12)


def test_same_rows_are_not_drifted(reference: pl.DataFrame) -> None:
    result = concept_drift(reference, reference, CI, MIN_LABELS, seed=0)
    assert result.judged and result.drifted == ()
    for metric in result.metrics:
        assert metric.current == metric.reference


# At ci 0.95 each metric flags a clean window 5 % of the time (one 2000-row window
# in ten flags some metric: seed 2's logloss does); at 0.99, ~3 % of windows.
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_fresh_window_of_the_same_model_is_not_drifted(
    reference: pl.DataFrame, seed: int
) -> None:
    result = concept_drift(reference, _window(2_000, seed), 0.99, MIN_LABELS, seed=0)
    assert result.judged and result.drifted == ()
    assert {m.metric for m in result.metrics} == {"auc", "logloss", "ece"}
    change = result["auc"]
    assert change.low < 0.0 < change.high


def test_small_window_ece_is_judged_against_the_reference_at_that_size(
    reference: pl.DataFrame,
) -> None:
    # 500 calibrated rows show an ECE of ~0.06 from noise alone (the reference's
    # 20k rows ~0.01): judged against reference samples of 500 rows, no drift.
    result = concept_drift(reference, _window(500, 7), CI, MIN_LABELS, seed=0)
    ece = result["ece"]
    assert ece.current > 3 * ece.reference
    assert ece.interval == "reference_at_window_size" and ece.low < ece.current < ece.high
    assert not ece.drifted


def test_scores_shuffled_against_labels_drift(reference: pl.DataFrame) -> None:
    result = concept_drift(reference, _window(2_000, 5, shuffle=True), CI, MIN_LABELS, seed=0)
    assert result.drifted == ("auc", "logloss", "ece")
    auc_drift = result["auc"]
    assert auc_drift.current == pytest.approx(0.5, abs=0.03)
    assert auc_drift.reference == pytest.approx(0.77, abs=0.02)
    # The interval of the change (window - reference) lies wholly below 0: AUC
    # fell by ~0.27, and even the interval's end nearest 0 is a fall of > 0.2.
    assert auc_drift.interval == "change_bootstrap" and auc_drift.high < -0.2
    assert all(m.worse for m in result.metrics)
    assert result["logloss"].low > 0.0
    assert result["ece"].current > result["ece"].high
    assert "(drift, worse)" in auc_drift.describe()
    assert json.loads(json.dumps(result.to_dict()))["drifted"] == ["auc", "logloss", "ece"]


def test_too_few_labels_are_not_judged(reference: pl.DataFrame) -> None:
    # 1000 rows, 600 of them without a label yet: 400 labelled < 500.
    window = _window(1_000, 3).with_columns(
        pl.when(pl.int_range(pl.len()) < 600).then(None).otherwise(pl.col("label")).alias("label")
    )
    result = concept_drift(reference, window, CI, MIN_LABELS, seed=0)
    assert not result.judged and result.metrics == () and result.drifted == ()
    assert result.reason == "current window has 400 labelled rows, fewer than 500"
    assert result.current_labels == 400


def test_one_class_window_skips_auc_only(reference: pl.DataFrame) -> None:
    window = _window(1_000, 3).with_columns(pl.lit(0).alias("label"))
    result = concept_drift(reference, window, CI, MIN_LABELS, seed=0)
    assert result.judged and [m.metric for m in result.metrics] == ["logloss", "ece"]
    assert result.skipped == {"auc": "current window has one class only (AUC undefined)"}


def test_bootstrap_is_seeded(reference: pl.DataFrame) -> None:
    window = _window(1_000, 9)
    one = concept_drift(reference, window, CI, MIN_LABELS, seed=4)
    two = concept_drift(reference, window, CI, MIN_LABELS, seed=4)
    other = concept_drift(reference, window, CI, MIN_LABELS, seed=5)
    assert one.to_dict() == two.to_dict()
    assert one["auc"].low != other["auc"].low


def test_bad_inputs_are_named(reference: pl.DataFrame) -> None:
    with pytest.raises(ValueError, match="0/1"):
        concept_drift(reference, reference.with_columns(pl.lit(2).alias("label")), CI, 10, 0)
    with pytest.raises(ValueError, match="probabilities"):
        concept_drift(reference, reference.with_columns(pl.lit(1.5).alias("score")), CI, 10, 0)
    with pytest.raises(ValueError, match="lacks columns"):
        concept_drift(reference, reference.drop("score"), CI, 10, 0)


def _days(frames: list[pl.DataFrame]) -> pl.DataFrame:
    import datetime as dt

    start = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)
    return pl.concat(
        [
            f.with_columns(pl.lit(start + dt.timedelta(days=i)).alias("ts"))
            for i, f in enumerate(frames)
        ]
    )


def test_concept_day_noise_is_the_largest_one_day_against_the_rest_change() -> None:
    from monitoring.concept import concept_day_noise, noise_key

    same = _window(3_000, seed=5)
    # Three copies of one day: each day's metrics equal the others' exactly.
    copies = _days([same, same, same])
    noise = concept_day_noise(copies, copies.get_column("ts"))
    assert set(noise) == {noise_key(m) for m in ("auc", "logloss", "ece")}
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in noise.values())
    # One day of shuffled scores (AUC ~0.5): its AUC against the other two days' is the noise.
    shuffled = _window(3_000, seed=5, shuffle=True)
    mixed = _days([same, same, shuffled])
    noise = concept_day_noise(mixed, mixed.get_column("ts"))
    expected = auc(same["label"].to_numpy(), same["score"].to_numpy()) - auc(
        shuffled["label"].to_numpy(), shuffled["score"].to_numpy()
    )
    assert noise[noise_key("auc")] == pytest.approx(expected, abs=1e-6)
    two = _days([same, same])
    assert concept_day_noise(two, two.get_column("ts")) == {}
