"""One verdict for the checks that judge a single statistic: sketches, embeddings, the index.

Column drift (:mod:`monitoring.drift`) and concept drift (:mod:`monitoring.concept`)
have results of their own shape; a check that reduces a window to one number
(DAU change, popularity-head distance, a classifier's AUC, an index's recall)
reports a :class:`Verdict`. Their thresholds share one rule with the column
tests: at least ``margin`` times the healthy days' own largest statistic
(:func:`noise_threshold`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def noise_threshold(floor: float, margin: float, noise: float | None) -> float:
    """``floor``, raised to ``margin`` times ``noise`` (the largest statistic of healthy
    days, each against the others) when that is known and larger."""
    return floor if noise is None else max(floor, margin * noise)


@dataclass(frozen=True)
class Verdict:
    """``statistic`` (by ``test``) against ``threshold``; ``judged`` False (with ``reason``)
    when there was too little to judge; ``baseline`` the healthy days' statistics the
    threshold came from; ``note`` one line for tables; ``details`` what a reader needs."""

    check: str
    test: str
    statistic: float | None
    threshold: float | None
    drifted: bool
    judged: bool
    reason: str = ""
    note: str = ""
    baseline: tuple[float, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "test": self.test,
            "statistic": self.statistic,
            "threshold": self.threshold,
            "drifted": self.drifted,
            "judged": self.judged,
            "reason": self.reason,
            "note": self.note,
            "baseline": list(self.baseline),
            **self.details,
        }


def above(
    check: str,
    test: str,
    statistic: float,
    baseline: Sequence[float],
    margin: float,
    floor: float,
    note: str = "",
    details: dict[str, Any] | None = None,
) -> Verdict:
    """Drifted when ``statistic`` exceeds :func:`noise_threshold` of the ``baseline``."""
    threshold = noise_threshold(floor, margin, max(baseline) if baseline else None)
    return Verdict(
        check=check,
        test=test,
        statistic=statistic,
        threshold=threshold,
        drifted=statistic > threshold,
        judged=True,
        note=note,
        baseline=tuple(round(b, 6) for b in baseline),
        details=details or {},
    )


def not_judged(check: str, test: str, reason: str) -> Verdict:
    return Verdict(check, test, None, None, False, False, reason)
