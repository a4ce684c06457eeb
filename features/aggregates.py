"""Mergeable per-day aggregates: the one way events become entity features.

Every counter feature is defined on *day buckets*: for an entity at time ``t``,
the window of ``w`` days holds the events with ``ts < t`` whose UTC day lies in
``day(t) - w + 1 .. day(t)``. The same definition serves three paths:

- batch materialisation: :func:`aggregate_events` over the whole log, then
  :func:`entity_features` at the log's end;
- streaming (the online store): :func:`aggregate_events` over each incoming
  batch of events (one event is a batch of one), :func:`merge_aggregates` into
  the stored buckets, :func:`entity_features` at read time;
- point-in-time training rows (:mod:`features.pit`), computed exactly per row
  and tested equal to these at the log's end.

Buckets are plain frames, so merging is a concat and a group-by: sums for
counters, min for first-seen, max for last-seen. A bucket table holds, per
``(entity id, day)``:

    events        all rows
    impressions   event_type == impression
    clicks        impressions with label 1, plus click events
    positives     rows with label 1 (clicks, ratings >= threshold, ...)
    value_sum     sum of non-null ``value`` (ratings)
    first_ts      earliest ``ts``;  last_ts  latest ``ts``
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

COUNTERS = ("events", "impressions", "clicks", "positives", "value_sum")
ENTITY_KEYS = {"user": "user_id", "item": "item_id"}


@dataclass(frozen=True)
class CtrPrior:
    """Beta prior for smoothed rates: ``(hits + strength * rate) / (trials + strength)``."""

    rate: float
    strength: float


def _with_day(events: pl.LazyFrame) -> pl.LazyFrame:
    is_impression = pl.col("event_type") == "impression"
    positive = pl.col("label").fill_null(0.0) > 0
    return events.with_columns(
        pl.col("ts").dt.date().alias("day"),
        is_impression.cast(pl.Int64).alias("_impression"),
        ((is_impression & positive) | (pl.col("event_type") == "click"))
        .cast(pl.Int64)
        .alias("_click"),
        positive.cast(pl.Int64).alias("_positive"),
    )


def _bucket_aggs() -> list[pl.Expr]:
    return [
        pl.len().cast(pl.Int64).alias("events"),
        pl.col("_impression").sum().alias("impressions"),
        pl.col("_click").sum().alias("clicks"),
        pl.col("_positive").sum().alias("positives"),
        pl.col("value").fill_null(0.0).sum().alias("value_sum"),
        pl.col("ts").min().alias("first_ts"),
        pl.col("ts").max().alias("last_ts"),
    ]


def aggregate_events(events: pl.DataFrame | pl.LazyFrame, entity: str) -> pl.DataFrame:
    """Day buckets of ``entity`` ("user" or "item") from a batch of canonical events.

    Returns ``[<entity>_id, day, events, impressions, clicks, positives,
    value_sum, first_ts, last_ts]``, one row per (entity, day) present.
    """
    key = ENTITY_KEYS[entity]
    return (
        _with_day(events.lazy()).group_by(key, "day").agg(_bucket_aggs()).sort(key, "day").collect()
    )


def merge_aggregates(*tables: pl.DataFrame) -> pl.DataFrame:
    """Combine bucket tables of one entity kind (any order, any overlap of days)."""
    present = [t for t in tables if t.height]
    if not present:
        return tables[0].head(0)
    key = present[0].columns[0]
    return (
        pl.concat(present, how="vertical_relaxed")
        .group_by(key, "day")
        .agg(
            *[pl.col(c).sum() for c in COUNTERS],
            pl.col("first_ts").min(),
            pl.col("last_ts").max(),
        )
        .sort(key, "day")
    )


def entity_features(
    buckets: pl.DataFrame,
    as_of: dt.datetime,
    windows_days: Sequence[int],
    prior: CtrPrior,
) -> pl.DataFrame:
    """Counter features of every entity in ``buckets`` at time ``as_of``.

    Buckets must hold only events before ``as_of`` (true of a store that is
    read after it is updated); they may be compacted (:func:`compact`) as long
    as the longest window fits in what was kept. Columns, ``w`` each window:

        events_{w}d, impressions_{w}d, clicks_{w}d, positives_{w}d
        events_total, clicks_total, impressions_total, positives_total
        ctr_smoothed       (clicks_total + s * p0) / (impressions_total + s)
        positive_rate      (positives_total + s * p0) / (events_total + s)
        seconds_since_last, seconds_since_first
    """
    key = buckets.columns[0]
    today = as_of.astimezone(dt.UTC).date()
    in_window = [(pl.col("day") > today - dt.timedelta(days=w)) for w in windows_days]
    windowed = [
        (pl.col(c) * cond.cast(pl.Int64)).sum().alias(f"{c}_{w}d")
        for w, cond in zip(windows_days, in_window, strict=True)
        for c in ("events", "impressions", "clicks", "positives")
    ]
    as_of_lit = pl.lit(as_of).cast(pl.Datetime("us", "UTC"))
    s, p0 = prior.strength, prior.rate
    return (
        buckets.lazy()
        .group_by(key)
        .agg(
            *windowed,
            *[
                pl.col(c).sum().alias(f"{c}_total")
                for c in ("events", "impressions", "clicks", "positives")
            ],
            pl.col("first_ts").min().alias("first_ts"),
            pl.col("last_ts").max().alias("last_ts"),
        )
        .with_columns(
            ((pl.col("clicks_total") + s * p0) / (pl.col("impressions_total") + s)).alias(
                "ctr_smoothed"
            ),
            ((pl.col("positives_total") + s * p0) / (pl.col("events_total") + s)).alias(
                "positive_rate"
            ),
            ((as_of_lit - pl.col("last_ts")).dt.total_microseconds() / 1e6).alias(
                "seconds_since_last"
            ),
            ((as_of_lit - pl.col("first_ts")).dt.total_microseconds() / 1e6).alias(
                "seconds_since_first"
            ),
        )
        .drop("first_ts", "last_ts")
        .sort(key)
        .collect()
    )


def prior_from_buckets(buckets: pl.DataFrame, strength: float) -> CtrPrior:
    """The log's own click rate as the prior mean (rating logs: the positive rate).

    From bucket sums, so any engine that merged the same buckets gets the same prior.
    """
    impressions, clicks, n, positives = buckets.select(
        pl.col("impressions").sum(),
        pl.col("clicks").sum(),
        pl.col("events").sum(),
        pl.col("positives").sum(),
    ).row(0)
    rate = clicks / impressions if impressions else (positives / n if n else 0.0)
    return CtrPrior(rate=float(rate), strength=strength)


def global_prior(events: pl.DataFrame | pl.LazyFrame, strength: float) -> CtrPrior:
    """:func:`prior_from_buckets` of the user buckets of ``events``."""
    return prior_from_buckets(aggregate_events(events, "user"), strength)


# Buckets older than the longest window fold into one row on this day: they
# still count in the lifetime totals and first-seen, never in a window.
LIFETIME_DAY = dt.date(1970, 1, 1)


def compact(buckets: pl.DataFrame, as_of: dt.datetime, keep_days: int) -> pl.DataFrame:
    """Fold buckets older than ``keep_days`` into the lifetime row of each entity.

    Features read from the result equal those of the uncompacted buckets for
    any window up to ``keep_days``, so the online store keeps at most
    ``keep_days + 1`` rows per entity and still answers exactly.
    """
    cutoff = as_of.astimezone(dt.UTC).date() - dt.timedelta(days=keep_days - 1)
    old = pl.col("day") < cutoff
    folded = buckets.with_columns(
        pl.when(old).then(pl.lit(LIFETIME_DAY)).otherwise(pl.col("day")).alias("day")
    )
    return merge_aggregates(folded)
