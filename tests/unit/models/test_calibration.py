"""Calibration: temperature scaling and isotonic regression on over-confident logits."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from models.calibration import (
    IsotonicCalibration,
    TemperatureScaling,
    calibration_from_dict,
    fit_calibration,
    pool_adjacent_violators,
)
from models.ctr_metrics import auc, expected_calibration_error, logloss

HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _over_confident(n: int, seed: int, factor: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(true logits); the model reports true logits × factor."""
    rng = np.random.default_rng(seed)
    true = rng.normal(0.0, 1.5, n)
    labels = (rng.random(n) < _sigmoid(true)).astype(np.int64)
    return true * factor, labels


def test_temperature_recovers_the_over_confidence_and_improves_logloss_and_ece() -> None:
    logits, labels = _over_confident(50_000, seed=0)
    test_logits, test_labels = _over_confident(50_000, seed=1)
    scaler = TemperatureScaling().fit(logits, labels)
    assert scaler.temperature == pytest.approx(3.0, rel=0.05)
    raw, calibrated = _sigmoid(test_logits), scaler.transform(test_logits)
    assert logloss(test_labels, calibrated) < logloss(test_labels, raw) - 0.05
    ece_raw, _ = expected_calibration_error(test_labels, raw)
    ece_cal, _ = expected_calibration_error(test_labels, calibrated)
    assert ece_cal < 0.01 < 0.05 < ece_raw
    np.testing.assert_allclose(scaler.scale(test_logits), test_logits / scaler.temperature)
    assert auc(test_labels, calibrated) == pytest.approx(auc(test_labels, raw))


def test_temperature_is_clipped_to_its_bounds_on_separable_data() -> None:
    # Perfectly separated labels: the loss keeps falling as T -> 0.
    logits = np.array([-2.0, -1.0, 1.0, 2.0])
    scaler = TemperatureScaling(min_temperature=0.1).fit(logits, np.array([0, 0, 1, 1]))
    assert scaler.temperature == pytest.approx(0.1)
    with pytest.raises(ValueError, match="both classes"):
        TemperatureScaling().fit(logits, np.ones(4))
    with pytest.raises(ValueError, match="min_temperature"):
        TemperatureScaling(temperature=0.0)


def test_isotonic_is_monotone_clipped_and_improves_ece() -> None:
    logits, labels = _over_confident(20_000, seed=2)
    test_logits, test_labels = _over_confident(20_000, seed=3)
    iso = IsotonicCalibration().fit(logits, labels)
    grid = np.linspace(-30, 30, 2001)
    out = iso.transform(grid)
    assert np.all(np.diff(out) >= 0)
    assert out[0] == iso.y[0] and out[-1] == iso.y[-1]  # clipped outside the knots
    assert np.all((out >= 0) & (out <= 1))
    ece_raw, _ = expected_calibration_error(test_labels, _sigmoid(test_logits))
    ece_iso, _ = expected_calibration_error(test_labels, iso.transform(test_logits))
    assert ece_iso < 0.02 < 0.05 < ece_raw


def test_pool_adjacent_violators_by_hand() -> None:
    # 3, 2 violate -> both 2.5; then 0 < 2.5 pools the three into 5 / 3, still above 1.
    np.testing.assert_allclose(pool_adjacent_violators(np.array([1.0, 3.0, 2.0])), [1, 2.5, 2.5])
    np.testing.assert_allclose(
        pool_adjacent_violators(np.array([1.0, 3.0, 2.0, 0.0])), [1, 5 / 3, 5 / 3, 5 / 3]
    )
    np.testing.assert_allclose(pool_adjacent_violators(np.array([3.0, 2.0, 1.0])), [2, 2, 2])
    np.testing.assert_allclose(
        pool_adjacent_violators(np.array([2.0, 0.0]), np.array([3.0, 1.0])), [1.5, 1.5]
    )


@pytest.mark.skipif(not HAS_SKLEARN, reason="sklearn is not installed")
def test_the_fallback_fit_gives_sklearns_function() -> None:
    rng = np.random.default_rng(5)
    logits = np.round(rng.normal(0, 2, 3000), 2)  # ties in x
    labels = (rng.random(3000) < _sigmoid(logits / 2)).astype(np.int64)
    ours = IsotonicCalibration().fit(logits, labels, use_sklearn=False)
    theirs = IsotonicCalibration().fit(logits, labels, use_sklearn=True)
    grid = np.linspace(-8, 8, 1001)
    np.testing.assert_allclose(ours.transform(grid), theirs.transform(grid), atol=1e-12)


@pytest.mark.parametrize("kind", ["temperature", "isotonic"])
def test_calibrators_round_trip_through_json(kind: str) -> None:
    logits, labels = _over_confident(2000, seed=6)
    fitted = fit_calibration(kind, logits, labels)  # type: ignore[arg-type]
    assert fitted.kind == kind
    restored = calibration_from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert type(restored) is type(fitted)
    np.testing.assert_array_equal(restored.transform(logits), fitted.transform(logits))


def test_from_dict_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        calibration_from_dict({"kind": "platt"})
    with pytest.raises(ValueError, match="needs keys"):
        IsotonicCalibration.from_dict({"kind": "isotonic", "x": [0.1]})
    with pytest.raises(ValueError, match="non-decreasing"):
        IsotonicCalibration.from_dict({"kind": "isotonic", "x": [0.1, 0.2], "y": [0.5, 0.4]})
    with pytest.raises(ValueError, match="kind must be one of"):
        fit_calibration("platt", np.zeros(2), np.array([0, 1]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not fitted"):
        IsotonicCalibration().transform(np.zeros(2))
