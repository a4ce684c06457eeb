"""What monitoring knows about a column (numeric or categorical) and how it samples rows.

Monitoring sees features and predictions as plain columns of a Polars frame; the
feature spec says which kind each feature is. Sequence and embedding features
are not compared column by column (embedding drift is a separate check).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import polars as pl

from features.feature_spec import DriftRole, FeatureKind, FeatureSpec

# The kinds a per-column drift test handles.
COLUMN_KINDS: tuple[FeatureKind, ...] = (FeatureKind.NUMERIC, FeatureKind.CATEGORICAL)


def column_kinds(kinds: Mapping[str, str]) -> dict[str, FeatureKind]:
    """``{name: "numeric" | "categorical"}`` checked and typed; anything else raises."""
    typed: dict[str, FeatureKind] = {}
    for name, kind in kinds.items():
        try:
            value = FeatureKind(kind)
        except ValueError:
            value = None
        if value not in COLUMN_KINDS:
            raise ValueError(
                f"column {name!r} has kind {kind!r}; drift checks take "
                f"{[k.value for k in COLUMN_KINDS]}"
            )
        typed[name] = value
    return typed


def spec_column_kinds(spec: FeatureSpec) -> dict[str, FeatureKind]:
    """The spec's numeric and categorical features, in spec order."""
    return {f.name: f.kind for f in spec.features if f.kind in COLUMN_KINDS}


def judged_columns(
    spec: FeatureSpec, log_age_days: float | None, window_days: int
) -> tuple[dict[str, FeatureKind], dict[str, str]]:
    """The spec's numeric and categorical features a drift test judges, and why the others are not.

    ``log_age_days``: how old the log is where the reference period starts (None:
    a table without time, where every windowed count is taken as warmed up);
    ``window_days``: the length of a current window. Returns ``({name: kind},
    {name: reason})``, both in spec order (see :class:`features.feature_spec.DriftRole`).
    """
    judged: dict[str, FeatureKind] = {}
    unjudged: dict[str, str] = {}
    for name, kind in spec_column_kinds(spec).items():
        feature = spec[name]
        if feature.drift == DriftRole.GROWING:
            unjudged[name] = "grows with the log's age by construction"
        elif feature.drift == DriftRole.IDENTIFIER:
            unjudged[name] = "an entity id: the sketch checks watch the entity mix"
        elif feature.drift == DriftRole.CALENDAR and window_days < 7:
            unjudged[name] = f"a weekly cycle: a {window_days}-day window holds part of it"
        elif (
            feature.warmup_days is not None
            and log_age_days is not None
            and log_age_days < feature.warmup_days
        ):
            unjudged[name] = (
                f"counts {feature.warmup_days} days but the reference starts when the log "
                f"is {log_age_days:.1f} days old (still filling up)"
            )
        else:
            judged[name] = kind
    return judged, unjudged


def sample_rows(frame: pl.DataFrame, rows: int, seed: int | list[int]) -> pl.DataFrame:
    """A uniform sample of ``rows`` rows without replacement, in the frame's order.

    The frame itself when it has at most ``rows`` rows. The same ``seed`` and frame
    give the same rows (numpy ``default_rng(seed).choice``), so a rerun of a window
    judges the same sample.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if frame.height <= rows:
        return frame
    picked = np.random.default_rng(seed).choice(frame.height, size=rows, replace=False)
    return frame[np.sort(picked)]
