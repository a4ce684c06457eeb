"""Validation with quarantine: type, null, range and id checks with reasons.

Raw frames come from sources with the canonical column names but values that
may be strings or of the wrong type. :func:`validate_table` casts each column
without raising, and every row that fails any check goes to the quarantine
frame with all its reasons (``"label: not a number ('x'); ts: before 1990-01-01"``).
The caller publishes nothing when :meth:`ValidationResult.raise_if_over_bound`
fires; the error names the worst column and its count.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import polars as pl

from features.schemas import ColumnContract, TableContract
from infra.errors import DataValidationError

REASON = "_reason"
TsUnit = Literal["s", "ms", "us", "iso"]


@dataclass(frozen=True)
class ValidationRules:
    """Bounds that are data, not code: they come from ``data.validation``."""

    ts_min: dt.datetime = dt.datetime(1990, 1, 1, tzinfo=dt.UTC)
    ts_max: dt.datetime = field(
        default_factory=lambda: dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    )
    # How numeric or string timestamps in raw input are read.
    ts_unit: TsUnit = "s"


@dataclass
class ValidationResult:
    """Typed good rows, quarantined bad rows (as strings, with ``_reason``), counts.

    When a table is validated in parts and the good rows are written as they
    come, ``valid`` may hold only the last part; ``n_valid`` counts them all.
    """

    table: str
    valid: pl.DataFrame
    quarantined: pl.DataFrame
    # "column: problem" -> rows; one row may count under several reasons.
    reason_counts: dict[str, int]
    n_valid: int = -1

    def __post_init__(self) -> None:
        if self.n_valid < 0:
            self.n_valid = self.valid.height

    @property
    def n_rows(self) -> int:
        return self.n_valid + self.quarantined.height

    @property
    def bad_fraction(self) -> float:
        return self.quarantined.height / self.n_rows if self.n_rows else 0.0

    def raise_if_over_bound(self, max_bad_fraction: float, source: str = "") -> None:
        if self.bad_fraction <= max_bad_fraction:
            return
        worst, count = max(self.reason_counts.items(), key=lambda kv: kv[1])
        where = f" in {source}" if source else ""
        raise DataValidationError(
            f"{self.table}{where}: {self.quarantined.height:,} of {self.n_rows:,} rows are bad "
            f"({self.bad_fraction:.2%} > bound {max_bad_fraction:.2%}); "
            f"worst: {worst} ({count:,} rows); see the quarantine file for each row's reason"
        )


def combine(parts: list[ValidationResult]) -> ValidationResult:
    """One result for a table validated in parts; keeps counts and bad rows, not good rows."""
    counts: dict[str, int] = {}
    for part in parts:
        for key, value in part.reason_counts.items():
            counts[key] = counts.get(key, 0) + value
    return ValidationResult(
        parts[0].table,
        parts[-1].valid.head(0),
        pl.concat([p.quarantined for p in parts], how="diagonal_relaxed"),
        counts,
        n_valid=sum(p.n_valid for p in parts),
    )


def validate_table(
    raw: pl.DataFrame,
    contract: TableContract,
    rules: ValidationRules | None = None,
    known_ids: Mapping[str, pl.Series] | None = None,
) -> ValidationResult:
    """Cast ``raw`` to ``contract`` row by row, quarantining what does not fit.

    ``known_ids`` maps an id column to the ids that exist (from the users/items
    tables); ids outside it are "out of range". Missing nullable columns are
    added as nulls; a missing required column fails the whole table at once.
    """
    rules = rules or ValidationRules()
    missing = [c.name for c in contract.columns if c.name not in raw.columns and not c.nullable]
    if missing:
        raise DataValidationError(
            f"{contract.name}: required column(s) {', '.join(missing)} missing; found {raw.columns}"
        )
    frame = raw.with_row_index("__row")
    typed: list[pl.Expr] = []
    problems: list[pl.Expr] = []
    for col in contract.columns:
        if col.name not in raw.columns:
            typed.append(pl.lit(None, dtype=col.dtype).alias(col.name))
            continue
        cast = _cast(col, raw.schema[col.name], rules.ts_unit)
        typed.append(cast.alias(col.name))
        problems.extend(_checks(col, cast, rules, known_ids))
    extra = [c for c in raw.columns if c not in contract.names]
    if extra and not contract.allow_extra:
        raise DataValidationError(f"{contract.name}: unexpected column(s) {', '.join(extra)}")

    checked = frame.with_columns(
        pl.concat_list(problems).list.drop_nulls().alias(REASON)
        if problems
        else pl.lit([], pl.List(pl.String)).alias(REASON)
    )
    bad_mask = pl.col(REASON).list.len() > 0
    valid = checked.filter(~bad_mask).select([*typed, *[pl.col(c) for c in extra]])
    bad = checked.filter(bad_mask)
    counts = (
        bad.select(pl.col(REASON).explode().str.replace(r" \('.*'\)$", ""))
        .group_by(REASON)
        .len()
        .sort("len", descending=True)
    )
    quarantined = bad.select(
        [pl.col(c).cast(pl.String) for c in raw.columns]
        + [pl.col("__row").alias("_source_row"), pl.col(REASON).list.join("; ")]
    )
    return ValidationResult(
        contract.name, valid, quarantined, dict(zip(counts[REASON], counts["len"], strict=True))
    )


def _cast(col: ColumnContract, raw_dtype: pl.DataType, ts_unit: TsUnit) -> pl.Expr:
    source = pl.col(col.name)
    if isinstance(col.dtype, pl.Datetime):
        if isinstance(raw_dtype, pl.Datetime):
            return (
                source.dt.convert_time_zone("UTC").cast(col.dtype)
                if raw_dtype.time_zone
                else source.dt.replace_time_zone("UTC").cast(col.dtype)
            )
        if raw_dtype == pl.String and ts_unit == "iso":
            return source.str.to_datetime(time_zone="UTC", strict=False, time_unit="us")
        seconds = (
            source.cast(pl.Float64, strict=False)
            if raw_dtype == pl.String
            else source.cast(pl.Float64)
        )
        scale = {"s": 1_000_000, "ms": 1_000, "us": 1, "iso": 1_000_000}[ts_unit]
        return (seconds * scale).round().cast(pl.Int64, strict=False).cast(pl.Datetime("us", "UTC"))
    if raw_dtype == pl.String and col.dtype.is_numeric():
        # "3.0" is a fine int64 id but "3.5" is not: parse as float, then demand integrality.
        as_float = source.str.strip_chars().cast(pl.Float64, strict=False)
        if col.dtype.is_integer():
            return (
                pl.when(as_float == as_float.round()).then(as_float).cast(col.dtype, strict=False)
            )
        return as_float.cast(col.dtype)
    return source.cast(col.dtype, strict=False)


def _checks(
    col: ColumnContract,
    cast: pl.Expr,
    rules: ValidationRules,
    known_ids: Mapping[str, pl.Series] | None,
) -> list[pl.Expr]:
    raw = pl.col(col.name)
    raw_text = raw.cast(pl.String)
    raw_present = raw.is_not_null() & (raw_text.str.strip_chars() != "")
    name = col.name

    def reason(cond: pl.Expr, text: str, show_value: bool = True) -> pl.Expr:
        message = (
            pl.format(f"{name}: {text} ('{{}}')", raw_text.str.slice(0, 40))
            if show_value
            else pl.lit(f"{name}: {text}")
        )
        return pl.when(cond).then(message).otherwise(pl.lit(None, pl.String))

    checks = [reason(raw_present & cast.is_null(), f"not a valid {col.dtype}")]
    if not col.nullable:
        checks.append(reason(~raw_present, "null in a required column", show_value=False))
    if col.min_value is not None:
        checks.append(reason(cast < col.min_value, f"below {col.min_value:g}"))
    if col.max_value is not None:
        checks.append(reason(cast > col.max_value, f"above {col.max_value:g}"))
    if col.allowed is not None:
        checks.append(
            reason(
                cast.is_not_null() & ~cast.is_in(list(col.allowed)),
                "not one of " + "|".join(col.allowed),
            )
        )
    if isinstance(col.dtype, pl.Datetime):
        checks.append(reason(cast < pl.lit(rules.ts_min), f"before {rules.ts_min:%Y-%m-%d}"))
        checks.append(reason(cast > pl.lit(rules.ts_max), f"after {rules.ts_max:%Y-%m-%d %H:%M}"))
    if col.unique:
        checks.append(reason(cast.is_not_null() & cast.is_duplicated(), "duplicate id"))
    if known_ids is not None and name in known_ids:
        checks.append(
            reason(
                cast.is_not_null() & ~cast.is_in(known_ids[name].implode()),
                "id out of range (unknown entity)",
            )
        )
    return checks
