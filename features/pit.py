"""Point-in-time correct features: a row at time ``t`` sees only events before ``t``.

The definitions are those of :mod:`features.aggregates` (day-bucket windows:
events with ``ts < t`` whose UTC day is within ``w - 1`` days before ``t``'s),
computed exactly per row with as-of joins on cumulative sums, so training rows
never see their own slate, their own click or anything later:

    count_w(t) = C(< t) - C(< start of day(t) - (w - 1))

where ``C(< x)`` is the entity's cumulative count over its events strictly
before ``x`` (one as-of join per boundary, ``allow_exact_matches=False``).
Evaluated at the end of a log, these equal :func:`features.aggregates.entity_features`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import polars as pl

from features.aggregates import ENTITY_KEYS, CtrPrior

_COUNTS = ("events", "impressions", "clicks", "positives")


def _flags(events: pl.LazyFrame) -> pl.LazyFrame:
    is_impression = pl.col("event_type") == "impression"
    positive = pl.col("label").fill_null(0.0) > 0
    return events.with_columns(
        pl.lit(1, pl.Int64).alias("events"),
        is_impression.cast(pl.Int64).alias("impressions"),
        ((is_impression & positive) | (pl.col("event_type") == "click"))
        .cast(pl.Int64)
        .alias("clicks"),
        positive.cast(pl.Int64).alias("positives"),
    )


def cumulative_counts(events: pl.LazyFrame, key: str | list[str]) -> pl.LazyFrame:
    """One row per (entity, distinct ts): counts up to and including that ts.

    ``key`` is an id column or several (``["user_id", "category"]``).

    Ties (a slate's impressions share one ``ts``) collapse into one row, so an
    as-of match before ``t`` includes all of them or none.
    """
    keys = [key] if isinstance(key, str) else list(key)
    return (
        _flags(events)
        .group_by(*keys, "ts")
        .agg([pl.col(c).sum() for c in _COUNTS])
        .sort(*keys, "ts")
        .with_columns(
            *[pl.col(c).cum_sum().over(key).alias(f"cum_{c}") for c in _COUNTS],
            pl.col("ts").min().over(key).alias("first_ts"),
            pl.col("ts").alias("last_ts"),
        )
        .select(*keys, "ts", "first_ts", "last_ts", *[f"cum_{c}" for c in _COUNTS])
        .sort("ts")
    )


def _asof_before(
    left: pl.DataFrame, right: pl.DataFrame, on: str, key: str | list[str]
) -> pl.DataFrame:
    """``left`` joined with the last ``right`` row of the same key strictly before ``left[on]``."""
    return left.sort(on).join_asof(
        right,
        left_on=on,
        right_on="ts",
        by=key,
        strategy="backward",
        allow_exact_matches=False,
        check_sortedness=False,
    )


def window_start(ts: pl.Expr, days: int) -> pl.Expr:
    """Midnight UTC starting the ``days``-day window that ends at ``ts``'s day."""
    return (ts.dt.truncate("1d") - pl.duration(days=days - 1)).cast(pl.Datetime("us", "UTC"))


def entity_counters_at(
    rows: pl.DataFrame,
    events: pl.LazyFrame,
    entity: str,
    windows_days: Sequence[int],
    prior: CtrPrior,
) -> pl.DataFrame:
    """Counter features of ``rows[<entity>_id]`` as of each ``rows["ts"]``.

    ``rows`` must have ``_row`` (a unique row index), the entity key and ``ts``.
    Returns ``_row`` plus the columns of :func:`features.aggregates.entity_features`.
    """
    key = ENTITY_KEYS[entity]
    cum = cumulative_counts(events, key).collect()
    base = rows.select("_row", key, "ts")
    at_t = _asof_before(base, cum, "ts", key).select(
        "_row",
        *[pl.col(f"cum_{c}").fill_null(0).alias(f"{c}_total") for c in _COUNTS],
        "first_ts",
        "last_ts",
    )
    out = base.join(at_t, on="_row")
    for w in windows_days:
        starts = base.with_columns(window_start(pl.col("ts"), w).alias("_start")).drop("ts")
        before = _asof_before(starts, cum.drop("first_ts", "last_ts"), "_start", key).select(
            "_row", *[pl.col(f"cum_{c}").fill_null(0).alias(f"_before_{c}") for c in _COUNTS]
        )
        out = (
            out.join(before, on="_row")
            .with_columns(
                *[
                    (pl.col(f"{c}_total") - pl.col(f"_before_{c}")).alias(f"{c}_{w}d")
                    for c in _COUNTS
                ]
            )
            .drop([f"_before_{c}" for c in _COUNTS])
        )
    s, p0 = prior.strength, prior.rate
    return out.with_columns(
        ((pl.col("clicks_total") + s * p0) / (pl.col("impressions_total") + s)).alias(
            "ctr_smoothed"
        ),
        ((pl.col("positives_total") + s * p0) / (pl.col("events_total") + s)).alias(
            "positive_rate"
        ),
        ((pl.col("ts") - pl.col("last_ts")).dt.total_microseconds() / 1e6).alias(
            "seconds_since_last"
        ),
        ((pl.col("ts") - pl.col("first_ts")).dt.total_microseconds() / 1e6).alias(
            "seconds_since_first"
        ),
    ).select(
        "_row",
        *[f"{c}_{w}d" for w in windows_days for c in _COUNTS],
        *[f"{c}_total" for c in _COUNTS],
        "ctr_smoothed",
        "positive_rate",
        "seconds_since_last",
        "seconds_since_first",
    )


def distinct_counts_at(rows: pl.DataFrame, events: pl.LazyFrame, key: str, of: str) -> pl.DataFrame:
    """Exact number of distinct ``of`` values of each row's ``key`` entity before its ``ts``.

    Training rows get the exact count; the online store serves the HLL
    estimate of the same quantity (within 3 x 1.04 / sqrt(2 ** lg_k)). Returns
    ``_row, distinct``.
    """
    firsts = (
        events.with_row_index("_order")
        .select(key, of, "ts", "_order")
        .sort(key, "ts", "_order")
        .with_columns(pl.struct(key, of).is_first_distinct().cast(pl.Int64).alias("_first"))
        .with_columns(pl.col("_first").cum_sum().over(key).alias("distinct"))
        # Tied timestamps: the last row of the tie holds the count after all of them.
        .group_by(key, "ts", maintain_order=True)
        .agg(pl.col("distinct").last())
        .sort("ts")
        .collect()
    )
    matched = _asof_before(rows.select("_row", key, "ts"), firsts, "ts", key)
    return matched.select("_row", pl.col("distinct").fill_null(0))


def recent_positives_at(rows: pl.DataFrame, events: pl.LazyFrame, length: int) -> pl.DataFrame:
    """The last ``length`` positive items of each row's user before its ``ts``.

    Most recent last; ties in ``ts`` keep the log's row order. Returns
    ``_row, history`` (``list[i64]``, empty when the user had none).
    """
    positives = (
        _flags(events.with_row_index("_order"))
        .filter(pl.col("positives") > 0)
        .sort("user_id", "ts", "_order")
        .select("user_id", "ts", "item_id")
        .collect()
    )
    shifted = [pl.col("item_id").shift(lag).over("user_id") for lag in range(length - 1, -1, -1)]
    after_each = (
        positives.with_columns(pl.concat_list(shifted).list.drop_nulls().alias("history"))
        # After a run of tied positives, the history holds all of them.
        .group_by("user_id", "ts", maintain_order=True)
        .agg(pl.col("history").last())
        .sort("ts")
    )
    matched = _asof_before(rows.select("_row", "user_id", "ts"), after_each, "ts", "user_id")
    return matched.select("_row", pl.col("history").fill_null(pl.lit([], dtype=pl.List(pl.Int64))))


def category_affinity_at(
    rows: pl.DataFrame, events: pl.LazyFrame, items: pl.DataFrame, strength: float
) -> pl.DataFrame:
    """Share of the user's positives before ``ts`` in the row item's category, smoothed.

    ``(positives in category + strength / n_categories) / (positives + strength)``:
    a user with no history gets the uniform share. Needs ``items.category``.
    """
    categories = items.select("item_id", "category")
    n_categories = max(1, categories.get_column("category").n_unique())
    per_pair = cumulative_counts(
        events.join(categories.lazy(), on="item_id", how="left"), ["user_id", "category"]
    ).collect()
    per_user = cumulative_counts(events, "user_id").collect()
    keyed = rows.select("_row", "user_id", "item_id", "ts").join(
        categories, on="item_id", how="left"
    )
    in_category = _asof_before(keyed, per_pair, "ts", ["user_id", "category"])
    overall = _asof_before(keyed, per_user, "ts", "user_id")
    share = 1.0 / n_categories
    return (
        in_category.select("_row", pl.col("cum_positives").fill_null(0).alias("_in"))
        .join(overall.select("_row", pl.col("cum_positives").fill_null(0).alias("_all")), on="_row")
        .select(
            "_row",
            ((pl.col("_in") + strength * share) / (pl.col("_all") + strength)).alias(
                "category_affinity"
            ),
        )
    )


def context_features(rows: pl.DataFrame) -> pl.DataFrame:
    """Hour of day and weekday (UTC) of each row, and its slate position when known."""
    columns = [
        "_row",
        pl.col("ts").dt.hour().cast(pl.Int64).alias("hour"),
        pl.col("ts").dt.weekday().cast(pl.Int64).alias("weekday"),
    ]
    if "position" in rows.columns:
        columns.append(pl.col("position").cast(pl.Int64).alias("position"))
    return rows.select(columns)


def as_of_rows(entity_ids: pl.Series, as_of: dt.datetime, key: str) -> pl.DataFrame:
    """Entity rows all at one time, to evaluate the same features at ``as_of``."""
    return (
        pl.DataFrame({key: entity_ids})
        .with_columns(
            pl.lit(as_of).cast(pl.Datetime("us", "UTC")).alias("ts"),
        )
        .with_row_index("_row")
    )
