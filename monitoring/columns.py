"""What monitoring knows about a column (numeric or categorical) and how it samples rows.

Monitoring sees features and predictions as plain columns of a Polars frame; the
feature spec says which kind each feature is. Sequence and embedding features
are not compared column by column (embedding drift is a separate check).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import polars as pl

from features.feature_spec import FeatureKind, FeatureSpec

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
