"""Post-hoc calibration of a binary head: logits -> calibrated probabilities.

Fitted on a validation split (never the training split, where the network is
over-confident by construction), saved beside the model as JSON, applied at
serving time. Both calibrators keep the ranking of the scores, so AUC is
unchanged up to ties (isotonic steps create ties); only logloss and ECE move.

- :class:`TemperatureScaling` (Guo et al., ICML 2017): ``sigmoid(z / T)`` with
  one ``T`` minimising the validation logloss. The loss is convex in ``1 / T``
  and its derivative is monotone, so a bisection on the derivative's sign
  finds it to machine precision; no optimiser state, no learning rate.
- :class:`IsotonicCalibration` (Zadrozny & Elkan, KDD 2002): the monotone step
  function of ``sigmoid(z)`` closest to the labels in squared error
  (pool-adjacent-violators), linearly interpolated between its steps and
  clipped to the end values outside the fitted range. Flexible, so it needs
  more validation rows than temperature scaling (thousands, not hundreds).

Both share :class:`Calibrator`: ``fit(logits, labels) -> self``,
``transform(logits) -> probabilities``, ``to_dict()`` / ``from_dict()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol, Self

import numpy as np
from numpy.typing import ArrayLike

CalibrationKind = Literal["temperature", "isotonic"]
CALIBRATION_KINDS: tuple[CalibrationKind, ...] = ("temperature", "isotonic")


class Calibrator(Protocol):
    """What the training driver fits and the serving path applies."""

    kind: CalibrationKind

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> Self: ...

    def transform(self, logits: ArrayLike) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # exp of a non-positive number only: no overflow warning for large |z|.
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _logits(logits: ArrayLike, name: str = "logits") -> np.ndarray:
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return values


def _fit_inputs(logits: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(n,)`` logits and 0/1 labels holding both classes (else there is nothing to fit)."""
    z = _logits(logits)
    y = np.asarray(labels).astype(np.float64)
    if y.shape != z.shape:
        raise ValueError(f"labels must have shape {z.shape} like logits, got {y.shape}")
    if not np.all((y == 0.0) | (y == 1.0)):
        raise ValueError("labels must be 0/1")
    if y.size == 0 or y.min() == y.max():
        raise ValueError("labels must hold both classes to fit a calibration")
    return z, y


def _check_kind(data: Mapping[str, Any], kind: CalibrationKind, keys: set[str]) -> None:
    if data.get("kind") != kind:
        raise ValueError(f"kind must be {kind!r}, got {data.get('kind')!r}")
    if set(data) != keys:
        raise ValueError(f"{kind} calibration needs keys {sorted(keys)}, got {sorted(data)}")


# --------------------------------------------------------------------------- temperature


class TemperatureScaling:
    """``sigmoid(z / T)`` with one temperature; ``T > 1`` softens over-confident logits."""

    kind: CalibrationKind = "temperature"

    def __init__(
        self, temperature: float = 1.0, min_temperature: float = 0.05, max_temperature: float = 20.0
    ) -> None:
        # The bounds keep a degenerate validation set (separable, or pure noise)
        # from fitting T -> 0 or T -> inf; a fit that lands on one is suspect.
        if not 0 < min_temperature <= temperature <= max_temperature:
            raise ValueError(
                f"need 0 < min_temperature <= temperature <= max_temperature, got "
                f"{min_temperature}, {temperature}, {max_temperature}"
            )
        self.temperature = float(temperature)
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> Self:
        """Set ``T`` minimising the logloss of ``sigmoid(logits / T)``; logits, labels ``(n,)``."""
        z, y = _fit_inputs(logits, labels)

        def slope(log_scale: float) -> float:
            # d/da of mean(softplus(a·z) - y·a·z) at a = 1/T: monotone increasing in a.
            return float(np.mean((_sigmoid(math.exp(log_scale) * z) - y) * z))

        lo, hi = -math.log(self.max_temperature), -math.log(self.min_temperature)
        if slope(lo) >= 0:
            log_scale = lo
        elif slope(hi) <= 0:
            log_scale = hi
        else:
            # 60 halvings of a range of ~6 in log(1/T) leave ~1e-17: float64's limit.
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
            log_scale = (lo + hi) / 2
        self.temperature = float(
            np.clip(math.exp(-log_scale), self.min_temperature, self.max_temperature)
        )
        return self

    def scale(self, logits: ArrayLike) -> np.ndarray:
        """Calibrated logits ``(n,)``: ``logits / T``."""
        return _logits(logits) / self.temperature

    def transform(self, logits: ArrayLike) -> np.ndarray:
        """Calibrated probabilities ``(n,)`` float64."""
        return _sigmoid(self.scale(logits))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "temperature": self.temperature,
            "min_temperature": self.min_temperature,
            "max_temperature": self.max_temperature,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TemperatureScaling:
        _check_kind(
            data, "temperature", {"kind", "temperature", "min_temperature", "max_temperature"}
        )
        return cls(
            temperature=float(data["temperature"]),
            min_temperature=float(data["min_temperature"]),
            max_temperature=float(data["max_temperature"]),
        )


# --------------------------------------------------------------------------- isotonic


def pool_adjacent_violators(y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Non-decreasing least-squares fit ``(m,)`` of ``y`` ``(m,)`` (in x order) with ``weights``.

    The classic stack form: each new point starts a block; while the last block's
    mean is below the one before it, the two merge (weighted mean). O(m) merges
    in all; a Python loop, used only where sklearn is missing.
    """
    y = np.asarray(y, dtype=np.float64)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64)
    means: list[float] = []
    totals: list[float] = []
    sizes: list[int] = []
    for value, weight in zip(y.tolist(), w.tolist(), strict=True):
        means.append(value)
        totals.append(weight)
        sizes.append(1)
        while len(means) > 1 and means[-2] >= means[-1]:
            mean, total, size = means.pop(), totals.pop(), sizes.pop()
            merged = totals[-1] + total
            means[-1] = (means[-1] * totals[-1] + mean * total) / merged
            totals[-1] = merged
            sizes[-1] += size
    return np.repeat(np.asarray(means), sizes)


def _isotonic_steps(
    x: np.ndarray, y: np.ndarray, use_sklearn: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The fitted function as interpolation knots ``(k,)`` each, x increasing.

    Equal ``x`` are pooled first (weighted mean label), then PAV; inside a flat
    block only its end points are kept, as sklearn's ``X_thresholds_``.
    """
    if use_sklearn:
        from sklearn.isotonic import IsotonicRegression

        model = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(x, y)
        return (
            np.asarray(model.X_thresholds_, dtype=np.float64),
            np.asarray(model.y_thresholds_, dtype=np.float64),
        )
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    unique_x, start, counts = np.unique(xs, return_index=True, return_counts=True)
    means = np.add.reduceat(ys, start) / counts
    fitted = pool_adjacent_violators(means, counts.astype(np.float64))
    keep = np.ones(fitted.size, dtype=bool)
    keep[1:-1] = (fitted[1:-1] != fitted[:-2]) | (fitted[1:-1] != fitted[2:])
    return unique_x[keep], fitted[keep]


def _sklearn_available() -> bool:
    try:
        import sklearn.isotonic  # noqa: F401
    except ImportError:
        return False
    return True


class IsotonicCalibration:
    """Monotone step function of ``p = sigmoid(logit)`` fitted by pool-adjacent-violators.

    ``x`` ``(k,)`` increasing probabilities and ``y`` ``(k,)`` non-decreasing
    calibrated probabilities are the knots; between them the output is linear
    in ``p``, outside them it is clipped to ``y[0]`` / ``y[-1]``. Fitting uses
    sklearn's ``IsotonicRegression`` when it is installed (compiled; it is not a
    dependency of rayrec) and :func:`pool_adjacent_violators` otherwise: the
    knots are the same, so the saved function does not depend on which ran.
    """

    kind: CalibrationKind = "isotonic"

    def __init__(self, x: ArrayLike | None = None, y: ArrayLike | None = None) -> None:
        if (x is None) != (y is None):
            raise ValueError("x and y must be given together")
        self.x = np.zeros(0) if x is None else np.asarray(x, dtype=np.float64)
        self.y = np.zeros(0) if y is None else np.asarray(y, dtype=np.float64)
        if self.x.ndim != 1 or self.x.shape != self.y.shape:
            raise ValueError(f"x {self.x.shape} and y {self.y.shape} must be equal 1-d")
        if np.any(np.diff(self.x) <= 0):
            raise ValueError("x must be strictly increasing")
        if np.any(np.diff(self.y) < 0):
            raise ValueError("y must be non-decreasing")
        if self.y.size and (self.y.min() < 0 or self.y.max() > 1):
            raise ValueError("y must lie in [0, 1]")

    def fit(self, logits: ArrayLike, labels: ArrayLike, use_sklearn: bool | None = None) -> Self:
        """Fit the knots on ``(n,)`` logits and labels; ``use_sklearn=None`` picks it if installed."""
        z, y = _fit_inputs(logits, labels)
        if use_sklearn is None:
            use_sklearn = _sklearn_available()
        self.x, self.y = _isotonic_steps(_sigmoid(z), y, use_sklearn)
        return self

    def transform(self, logits: ArrayLike) -> np.ndarray:
        """Calibrated probabilities ``(n,)`` float64; non-decreasing in the logits."""
        return self.transform_probabilities(_sigmoid(_logits(logits)))

    def transform_probabilities(self, probabilities: ArrayLike) -> np.ndarray:
        """The same map for callers that hold ``sigmoid(logits)`` ``(n,)`` already."""
        if self.x.size == 0:
            raise ValueError("IsotonicCalibration is not fitted")
        p = np.asarray(probabilities, dtype=np.float64)
        return np.interp(p, self.x, self.y)  # clips to y[0], y[-1] outside [x[0], x[-1]]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "x": self.x.tolist(), "y": self.y.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IsotonicCalibration:
        _check_kind(data, "isotonic", {"kind", "x", "y"})
        return cls(x=data["x"], y=data["y"])


# --------------------------------------------------------------------------- choosers

_CALIBRATORS: dict[CalibrationKind, type[TemperatureScaling] | type[IsotonicCalibration]] = {
    "temperature": TemperatureScaling,
    "isotonic": IsotonicCalibration,
}


def fit_calibration(
    kind: CalibrationKind, logits: ArrayLike, labels: ArrayLike
) -> TemperatureScaling | IsotonicCalibration:
    """A calibrator of ``kind`` fitted on validation ``logits`` and ``labels`` ``(n,)``."""
    if kind not in _CALIBRATORS:
        raise ValueError(f"kind must be one of {CALIBRATION_KINDS}, got {kind!r}")
    return _CALIBRATORS[kind]().fit(logits, labels)


def click_probabilities(logits: ArrayLike, calibrator: Calibrator | None) -> np.ndarray:
    """(n,) probabilities of click ``logits``: ``calibrator``'s, or the plain sigmoid without one."""
    if calibrator is not None:
        return calibrator.transform(logits)
    return _sigmoid(np.asarray(logits, dtype=np.float64))


def calibration_from_dict(data: Mapping[str, Any]) -> TemperatureScaling | IsotonicCalibration:
    """The calibrator a :meth:`to_dict` wrote (its ``kind`` picks the class)."""
    kind = data.get("kind")
    if kind not in _CALIBRATORS:
        raise ValueError(f"kind must be one of {CALIBRATION_KINDS}, got {kind!r}")
    return _CALIBRATORS[kind].from_dict(data)
