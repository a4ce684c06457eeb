"""What monitoring knows about a column (numeric or categorical) and how it samples rows.

Monitoring sees features and predictions as plain columns of a Polars frame; the
feature spec says which kind each feature is. Sequence and embedding features
are not compared column by column (embedding drift is a separate check).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


def sample_positions(height: int, rows: int, seed: int | list[int]) -> np.ndarray | None:
    """The sorted positions of a uniform sample of ``rows`` of ``height`` rows without
    replacement; None when there are at most ``rows`` (take them all).

    The same ``seed`` and height give the same positions (numpy
    ``default_rng(seed).choice``), so a rerun of a window judges the same sample,
    whether the rows are in memory (:func:`sample_rows`) or read back from storage
    by position (:class:`ScanRows`).
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if height <= rows:
        return None
    return np.sort(np.random.default_rng(seed).choice(height, size=rows, replace=False))


def sample_rows(frame: pl.DataFrame, rows: int, seed: int | list[int]) -> pl.DataFrame:
    """A uniform sample of ``rows`` rows without replacement, in the frame's order.

    The frame itself when it has at most ``rows`` rows (:func:`sample_positions`).
    """
    picked = sample_positions(frame.height, rows, seed)
    return frame if picked is None else frame[picked]


# The row-number column ScanRows adds to a scan (the row's place in the table).
ROW = "__row"


@dataclass(frozen=True)
class ScanRows:
    """The rows of a lazily scanned table that match a filter, in a fixed order, held as
    row numbers rather than rows.

    A reference period or a window of a 25M-row log is millions of rows of some
    60 columns; what monitoring keeps of it is a seeded sample of a few thousand.
    This holds 4 bytes a matching row (its number in the scan; ``by`` adds that
    column for the sort), counts them, and reads back only the rows it samples,
    so memory follows the sample sizes, not the table. :meth:`sample` gives
    exactly the rows :func:`sample_rows` would draw from the collected, ordered
    rows with the same seed.
    """

    source: pl.LazyFrame
    where: pl.Expr
    numbers: pl.Series

    @classmethod
    def of(cls, frame: pl.LazyFrame, where: pl.Expr, by: str | None = None) -> ScanRows:
        """The rows of ``frame`` where ``where`` holds, in scan order or (``by``) sorted by
        that column (stable: ties keep scan order, as ``sort(by, maintain_order=True)``)."""
        source = frame.with_row_index(ROW)
        matching = source.filter(where).select(ROW, *([by] if by else []))
        if by is not None:
            matching = matching.sort(by, ROW)
        rows = matching.select(ROW).collect(engine="streaming").get_column(ROW)
        return cls(source, where, rows)

    @property
    def height(self) -> int:
        return self.numbers.len()

    @property
    def columns(self) -> list[str]:
        return [name for name in self.source.collect_schema().names() if name != ROW]

    def take(self, positions: np.ndarray | None) -> pl.DataFrame:
        """The rows at ``positions`` (sorted, of this order; None: all), in this order."""
        wanted = self.numbers if positions is None else self.numbers.gather(positions)
        found = self._read(wanted).collect(engine="streaming")
        return wanted.to_frame().join(found, on=ROW, how="left", maintain_order="left").drop(ROW)

    def sample(self, rows: int, seed: int | list[int]) -> pl.DataFrame:
        """:func:`sample_rows` of these rows, reading only the sampled ones."""
        return self.take(sample_positions(self.height, rows, seed))

    def first_of(self, keys: Sequence[str]) -> ScanRows:
        """The first row (in this order) of each distinct value of ``keys``; reads the key
        columns of the matching rows only."""
        values = self._read(self.numbers).select(ROW, *keys)
        ordered = self.numbers.to_frame().join(
            values.collect(engine="streaming"), on=ROW, how="left", maintain_order="left"
        )
        firsts = ordered.filter(pl.struct(*keys).is_first_distinct()).get_column(ROW)
        return ScanRows(self.source, self.where, firsts)

    def _read(self, numbers: pl.Series) -> pl.LazyFrame:
        # The filter again beside the row numbers: Parquet statistics on its columns
        # (ts) skip the row groups outside it.
        return self.source.filter(self.where & pl.col(ROW).is_in(numbers.implode()))
