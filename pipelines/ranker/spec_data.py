"""Reranker training data from a feature spec: any example table the ``features`` step publishes.

The encoding itself (feature spec -> tensors, per feature kind) is
:mod:`serving.encoding`, shared with the request path so that training and
serving encode alike; this module splits an example table and encodes each
part with it, fitting nothing (the statistics are the spec's own).

Splits: ``temporal`` cuts the rows sorted by ``ts`` at the cumulative ratios
(the last share is the test: the honest protocol for a click log; ties in
``ts`` stay together on one side); ``random`` is a seeded permutation (tables
without time, e.g. the CTR samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import polars as pl

from features.feature_spec import FeatureSpec
from pipelines.ranker.data import ColumnSpec, RankerData
from serving.encoding import SpecColumns, SpecError, encode_examples

SplitKind = Literal["temporal", "random"]


def column_spec(columns: SpecColumns) -> ColumnSpec:
    """The training loop's view of ``columns``: which named columns feed which group."""
    return ColumnSpec(
        categorical=tuple(f.name for f in columns.categorical),
        numeric=tuple(f.name for f in columns.numeric),
        sequences=tuple(f.name for f in columns.sequences),
        label=columns.label,
        user=columns.user,
    )


def split_examples(
    frame: pl.DataFrame,
    kind: SplitKind,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Train/valid/test rows: by time (``ts``) or a seeded permutation (see module doc)."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-9:
        raise ValueError(f"ratios must be 3 non-negative numbers summing to 1, got {ratios}")
    n = frame.height
    if kind == "random":
        order = np.random.default_rng(seed).permutation(n)
        first = round(ratios[0] * n)
        second = first + round(ratios[1] * n)
        return tuple(frame[np.sort(part)] for part in np.split(order, [first, second]))  # type: ignore[return-value]
    if "ts" not in frame.columns:
        raise SpecError("a temporal split needs a 'ts' column; use split 'random' for this table")
    ordered = frame.sort("ts", maintain_order=True)
    ts = ordered.get_column("ts")
    # Cut at the timestamp of the quantile row: every row of one instant stays on one side.
    # A cut at or past the end leaves the later parts empty (a ratio of 0 means none).
    first = round(ratios[0] * n)
    second = round((ratios[0] + ratios[1]) * n)
    never = pl.lit(False)
    after_valid = pl.col("ts") >= ts[first] if first < n else never
    after_test = pl.col("ts") >= ts[second] if second < n else never
    train = ordered.filter(~after_valid)
    valid = ordered.filter(after_valid & ~after_test)
    test = ordered.filter(after_test)
    return train, valid, test


def ranker_data_from_examples(
    frame: pl.DataFrame,
    spec: FeatureSpec,
    split: SplitKind = "temporal",
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> RankerData:
    """Split an example table and encode each part by ``spec`` (statistics are the spec's own)."""
    parts = split_examples(frame, split, ratios, seed)
    for name, part in zip(("train", "valid", "test"), parts, strict=True):
        if part.height == 0:
            raise SpecError(f"the {split} split left the {name} part empty ({frame.height} rows)")
    return ranker_data_from_parts(*parts, spec=spec)


def ranker_data_from_parts(
    train: pl.DataFrame, valid: pl.DataFrame, test: pl.DataFrame, spec: FeatureSpec
) -> RankerData:
    """Encode given train/valid/test tables (e.g. a dataset's own files) by ``spec``."""
    columns = SpecColumns.of(spec, train.columns)
    encoded = [encode_examples(part, spec, columns) for part in (train, valid, test)]
    return RankerData(
        layout=columns.layout(),
        spec=column_spec(columns),
        train=encoded[0],
        valid=encoded[1],
        test=encoded[2],
        vocabularies={f.name: list(f.vocabulary or ()) for f in columns.categorical},
        numeric_stats={
            f.name: (float(f.mean or 0.0), float(f.std or 1.0)) for f in columns.numeric
        },
    )
