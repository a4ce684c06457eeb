"""Training frames: entity rows plus every feature as of each row's own time.

``build_training_frame(rows, events, users, items, config)`` is the offline
store's read: each row ``(user_id, item_id, ts, …)`` gets user and item
counters (:mod:`features.pit`), the user's recent positive items, the user's
affinity to the item's category, item age, context (hour, weekday, position)
and the static attributes of both entities, all computed from events strictly
before ``ts``. :func:`describe_frame` writes the matching feature spec.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import polars as pl

from features.aggregates import CtrPrior
from features.feature_spec import (
    DriftRole,
    Entity,
    Feature,
    FeatureKind,
    FeatureSpec,
    Normalization,
)
from features.pit import (
    category_affinity_at,
    context_features,
    distinct_counts_at,
    entity_counters_at,
    recent_positives_at,
)
from infra.config import FeaturesConfig

# Example columns carried through untouched (they are not features).
PASSTHROUGH = ("user_id", "item_id", "ts", "label", "rating", "request_id", "propensity")
# Smoothing strength of the category-affinity share (pseudo-positives).
AFFINITY_STRENGTH = 5.0


def has_impressions(events: pl.LazyFrame) -> bool:
    """Whether the log holds impressions (a click log) or not (a rating log)."""
    return events.filter(pl.col("event_type") == "impression").head(1).collect().height > 0


def example_rows(events: pl.LazyFrame, impressions: bool | None = None) -> pl.LazyFrame:
    """The rows to learn from: impressions when the log has them, else labelled events.

    Click logs (the simulator, serving) label impressions with the click;
    rating logs (MovieLens) label each rating (rating >= threshold). Either
    way the rows gain ``rating`` (Float64, null when none): the rating event
    of the same user, item and ``request_id`` for an impression, the row's own
    ``value`` for a rating log.
    ``impressions`` is :func:`has_impressions` of ``events`` when None; a
    partitioned build passes the whole log's answer, so a partition that
    happens to hold no impression still picks the rows the whole log would.
    """
    if impressions is None:
        impressions = has_impressions(events)
    columns = events.collect_schema().names()
    if "value" not in columns:
        events = events.with_columns(pl.lit(None, pl.Float64).alias("value"))
    if impressions:
        shown = events.filter(pl.col("event_type") == "impression")
        if "request_id" not in columns:
            return shown.with_columns(pl.lit(None, pl.Float64).alias(RATING))
        return shown.join(
            impression_ratings(events), on=RATING_KEYS, how="left", maintain_order="left"
        )
    return events.filter(pl.col("label").is_not_null()).with_columns(
        pl.col("value").cast(pl.Float64).alias(RATING)
    )


# The target of the reranker's second task: the rating a row's user gave its item.
# It arrives after the row (a label, never a feature), so it only passes through.
RATING = "rating"
# A rating answers one impression: same user, item and slate.
RATING_KEYS = ("user_id", "item_id", "request_id")


def impression_ratings(events: pl.LazyFrame) -> pl.LazyFrame:
    """``user_id, item_id, request_id, rating``: the last rating of each shown slate item.

    Ratings without a ``request_id`` answer no impression and are left out.
    """
    return (
        events.filter(
            (pl.col("event_type") == "rating")
            & pl.col("value").is_not_null()
            & pl.col("request_id").is_not_null()
        )
        .sort("ts", maintain_order=True)
        .group_by(*RATING_KEYS)
        .agg(pl.col("value").last().cast(pl.Float64).alias(RATING))
    )


# The canonical order of examples (ties broken by every id): both engines sort by
# it, so their outputs can be compared row by row.
EXAMPLE_ORDER = ("ts", "user_id", "request_id", "position", "item_id")


def example_keys(columns: Sequence[str]) -> list[str]:
    """The columns of :data:`EXAMPLE_ORDER` present in ``columns``: what identifies a row."""
    return [c for c in EXAMPLE_ORDER if c in columns]


def canonical_rows(rows: pl.DataFrame) -> pl.DataFrame:
    """``rows`` sorted by :data:`EXAMPLE_ORDER` (the columns it has), with ``_row``."""
    return rows.sort(
        example_keys(rows.columns), nulls_last=True, maintain_order=True
    ).with_row_index("_row")


def user_side(
    rows: pl.DataFrame,
    events: pl.LazyFrame,
    items: pl.DataFrame,
    config: FeaturesConfig,
    prior: CtrPrior,
) -> pl.DataFrame:
    """``_row`` + user counters, history and category affinity of ``rows``.

    Needs only the events of the rows' users, so it runs per user partition.
    """
    parts = [
        _prefixed(entity_counters_at(rows, events, "user", config.windows_days, prior), "user_"),
        distinct_counts_at(rows, events, "user_id", "item_id").rename(
            {"distinct": "user_distinct_items"}
        ),
        recent_positives_at(rows, events, config.history_length).rename(
            {"history": "user_history"}
        ),
    ]
    if "category" in items.columns:
        parts.append(category_affinity_at(rows, events, items, AFFINITY_STRENGTH))
    out = parts[0]
    for part in parts[1:]:
        out = out.join(part, on="_row", how="left")
    return out


def item_side(
    rows: pl.DataFrame, events: pl.LazyFrame, config: FeaturesConfig, prior: CtrPrior
) -> pl.DataFrame:
    """``_row`` + item counters and reach of ``rows``; needs only the events of the rows' items."""
    counters = _prefixed(
        entity_counters_at(rows, events, "item", config.windows_days, prior), "item_"
    )
    reach = distinct_counts_at(rows, events, "item_id", "user_id")
    return counters.join(reach.rename({"distinct": "item_distinct_users"}), on="_row", how="left")


def side_of_partition(
    events: pl.DataFrame,
    side: Literal["user", "item"],
    items: pl.DataFrame,
    config: FeaturesConfig,
    prior: CtrPrior,
    impressions: bool,
) -> pl.DataFrame:
    """One entity partition's example rows with ``side``'s features, keyed by the example keys.

    ``events`` must hold every event of the partition's users (``side ==
    "user"``) or items (``"item"``) and no other entity's; ``impressions`` is
    :func:`has_impressions` of the whole log. Returns :func:`example_keys`
    plus the columns of :func:`user_side` or :func:`item_side`, in canonical
    order. The partitioned builds (the ``ray`` engine, the ``polars``
    engine's out-of-core path) run this per partition and join the sides back
    with :func:`assemble_by_keys`.
    """
    rows = canonical_rows(example_rows(events.lazy(), impressions).collect())
    lazy = events.lazy()
    features = (
        user_side(rows, lazy, items, config, prior)
        if side == "user"
        else item_side(rows, lazy, config, prior)
    )
    keys = example_keys(rows.columns)
    return (
        rows.select("_row", *keys)
        .join(features, on="_row", how="left", maintain_order="left")
        .drop("_row")
    )


def assemble_by_keys(
    rows: pl.DataFrame,
    user_features: pl.DataFrame,
    item_features: pl.DataFrame,
    users: pl.DataFrame,
    items: pl.DataFrame,
) -> pl.DataFrame:
    """:func:`assemble` with sides from :func:`side_of_partition` (keyed by the example keys).

    ``rows`` are canonical (with ``_row``); each side may hold rows ``rows``
    lacks (they are dropped). Every side feature is a function of the row's
    keys (entity, time, item), so rows that share all keys (a logged event
    twice) get the same features: duplicate keys in a side collapse before the
    join rather than multiplying rows.
    """
    keys = example_keys(rows.columns)
    keyed = rows.select("_row", *keys)
    duplicated = bool(keyed.select(keys).is_duplicated().any())
    sides = []
    for side in (user_features, item_features):
        if duplicated:
            side = side.unique(subset=keys, keep="first", maintain_order=True)
        sides.append(keyed.join(side, on=keys, how="left", nulls_equal=True).drop(keys))
    return assemble(rows, sides[0], sides[1], users, items)


def assemble(
    rows: pl.DataFrame,
    users_side: pl.DataFrame,
    items_side: pl.DataFrame,
    users: pl.DataFrame,
    items: pl.DataFrame,
) -> pl.DataFrame:
    """Join both sides, context and static attributes onto ``rows`` (which has ``_row``)."""
    frame = rows.select("_row", *[c for c in PASSTHROUGH if c in rows.columns])
    for part in (users_side, items_side, context_features(rows)):
        frame = frame.join(part, on="_row", how="left")
    frame = frame.join(_attributes(users, "user_id", "user_"), on="user_id", how="left")
    frame = frame.join(_attributes(items, "item_id", "item_"), on="item_id", how="left")
    if "item_first_seen" in frame.columns:
        age = (pl.col("ts") - pl.col("item_first_seen")).dt.total_microseconds() / 86_400e6
        frame = frame.with_columns(age.clip(lower_bound=0.0).alias("item_age_days")).drop(
            "item_first_seen"
        )
    else:
        frame = frame.with_columns(
            (pl.col("item_seconds_since_first") / 86_400).alias("item_age_days")
        )
    return frame.sort("_row").drop("_row")


def build_training_frame(
    rows: pl.DataFrame,
    events: pl.LazyFrame,
    users: pl.DataFrame,
    items: pl.DataFrame,
    config: FeaturesConfig,
    prior: CtrPrior,
) -> pl.DataFrame:
    """``rows`` (at least ``user_id, item_id, ts``) with point-in-time features.

    Output rows come in :data:`EXAMPLE_ORDER`. Columns: the passthrough
    columns present, ``user_<counter>`` and ``item_<counter>`` (see
    :mod:`features.aggregates`), ``user_history`` (``list[i64]``),
    ``category_affinity`` (when items have a ``category``), ``hour``,
    ``weekday``, ``position``, ``user_<attr>`` / ``item_<attr>`` for every
    static attribute, and ``item_age_days``.
    """
    missing = [c for c in ("user_id", "item_id", "ts") if c not in rows.columns]
    if missing:
        raise ValueError(f"training rows need column(s) {missing}; got {rows.columns}")
    base = canonical_rows(rows)
    return assemble(
        base,
        user_side(base, events, items, config, prior),
        item_side(base, events, config, prior),
        users,
        items,
    )


def _prefixed(frame: pl.DataFrame, prefix: str) -> pl.DataFrame:
    return frame.rename({c: f"{prefix}{c}" for c in frame.columns if c != "_row"})


def _attributes(table: pl.DataFrame, key: str, prefix: str) -> pl.DataFrame:
    """Static attributes, prefixed; list columns (genres) are kept as lists."""
    return table.rename({c: f"{prefix}{c}" for c in table.columns if c != key})


def describe_frame(
    frame: pl.DataFrame | pl.LazyFrame, config: FeaturesConfig, n_users: int, n_items: int
) -> FeatureSpec:
    """The feature spec of a training frame; statistics are measured on ``frame``.

    Counts and durations are log1p-normalised (heavy tails); rates and
    affinities are already in [0, 1]; numeric attributes are standardised;
    string and low-cardinality integer attributes get a vocabulary; ids are
    hashed into as many buckets as there are entities.

    ``frame`` may be a LazyFrame over files larger than memory: statistics are
    gathered one UTC day of ``ts`` at a time (only the columns they need) and
    merged (:class:`_ColumnStats`), so the frame is never materialised, and an
    in-memory frame and the same rows written per day give the same spec.
    """
    schema = frame.lazy().collect_schema()
    features: list[Feature] = [
        Feature(name="user_id", kind=FeatureKind.CATEGORICAL, entity=Entity.USER, dtype="int64", hash_buckets=max(1, n_users), drift=DriftRole.IDENTIFIER),
        Feature(name="item_id", kind=FeatureKind.CATEGORICAL, entity=Entity.ITEM, dtype="int64", hash_buckets=max(1, n_items), drift=DriftRole.IDENTIFIER),
        Feature(
            name="user_history", kind=FeatureKind.SEQUENCE, entity=Entity.USER, dtype="list[int64]",
            max_length=config.history_length, description="last positive item ids before the row, most recent last",
        ),
    ]  # fmt: skip
    measured = [
        name
        for name, dtype in schema.items()
        if name not in PASSTHROUGH
        and name not in ("user_history", "label")
        and not _is_counter(name)
        and not _is_rate(name)
        and (dtype == pl.String or dtype.is_numeric())
    ]
    stats = _measure(frame.lazy(), measured)
    for name, dtype in schema.items():
        if name in PASSTHROUGH or name in ("user_history", "label"):
            continue
        entity = (
            Entity.USER
            if name.startswith("user_")
            else Entity.ITEM
            if name.startswith("item_")
            else Entity.CONTEXT
        )
        if name in ("hour", "weekday", "position"):
            features.append(
                Feature(
                    name=name,
                    kind=FeatureKind.CATEGORICAL,
                    entity=Entity.CONTEXT,
                    dtype="int64",
                    vocabulary=stats[name].vocabulary(),
                    drift=DriftRole.CALENDAR if name == "weekday" else DriftRole.REFERENCE,
                )
            )
        elif _is_counter(name):
            features.append(
                Feature(
                    name=name,
                    kind=FeatureKind.NUMERIC,
                    entity=entity,
                    dtype="float64",
                    normalization=Normalization.LOG1P,
                    **_counter_drift(name),
                )
            )
        elif _is_rate(name):
            # Lifetime rates: their spread grows with the entities' history (the
            # smoothing prior weighs less), so they trend while the log is young.
            features.append(
                Feature(
                    name=name,
                    kind=FeatureKind.NUMERIC,
                    entity=entity,
                    dtype="float64",
                    drift=DriftRole.GROWING,
                )
            )
        elif dtype == pl.String or (
            dtype.is_integer() and stats[name].n_unique() <= VOCABULARY_MAX
        ):
            features.append(
                Feature(
                    name=name,
                    kind=FeatureKind.CATEGORICAL,
                    entity=entity,
                    dtype="string" if dtype == pl.String else "int64",
                    vocabulary=stats[name].vocabulary(),
                )
            )
        elif dtype.is_numeric():
            column = stats[name]
            std = column.std()
            normalization = Normalization.STANDARD if std > 0 else Normalization.NONE
            features.append(
                Feature(
                    name=name, kind=FeatureKind.NUMERIC, entity=entity, dtype="float64", normalization=normalization,
                    mean=column.mean if std > 0 else None, std=std if std > 0 else None,
                    min_value=column.min_value, max_value=column.max_value,
                )
            )  # fmt: skip
        # List attributes (genres, tags) wait for a multi-hot encoder in the models issue.
    # The rating is the second task's target when the frame has one (never a feature).
    labels = ("label", RATING) if RATING in schema else ("label",)
    return FeatureSpec(labels=labels, features=tuple(features))


# Integer attributes with at most this many distinct values (null counts as one)
# get a vocabulary; more, and they are standardised as numbers.
VOCABULARY_MAX = 1000


@dataclass
class _ColumnStats:
    """Mergeable statistics of one column: its distinct values and its moments.

    Distinct values are kept for strings and integers (integers: until there
    are more than :data:`VOCABULARY_MAX`). Moments merge by Chan et al.'s
    pairwise update of ``(n, mean, M2)``; the parts are days, merged in day
    order, and each day's moments come from Polars on that day's contiguous
    column, so equal rows give equal floats however the frame was chunked or
    stored.
    """

    dtype: pl.DataType
    values: set[object] | None = field(default_factory=set)  # None: not kept, or too many
    has_null: bool = False
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min_value: float | None = None
    max_value: float | None = None

    def __post_init__(self) -> None:
        if not (self.dtype == pl.String or self.dtype.is_integer()):
            self.values = None

    def add(self, column: pl.Series) -> None:
        column = column.rechunk()
        self.has_null = self.has_null or column.null_count() > 0
        if self.values is not None:
            self.values.update(column.drop_nulls().unique().to_list())
            if self.dtype.is_integer() and len(self.values) > VOCABULARY_MAX:
                self.values = None
        if not self.dtype.is_numeric():
            return
        numbers = column.drop_nulls().cast(pl.Float64)
        n = numbers.len()
        if n == 0:
            return
        mean = float(numbers.mean())  # type: ignore[arg-type]
        m2 = float(numbers.var(ddof=0)) * n  # type: ignore[arg-type]
        low, high = float(numbers.min()), float(numbers.max())  # type: ignore[arg-type]
        total = self.n + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.n * n / total
        self.mean += delta * n / total
        self.n = total
        self.min_value = low if self.min_value is None else min(self.min_value, low)
        self.max_value = high if self.max_value is None else max(self.max_value, high)

    def n_unique(self) -> float:
        """Distinct values, null counting as one (Polars' ``n_unique``); inf past the limit."""
        if self.values is None:
            return math.inf
        return len(self.values) + int(self.has_null)

    def vocabulary(self) -> tuple[str, ...]:
        """Distinct values, sorted, as strings (index 0 stays the out-of-vocabulary slot)."""
        return tuple(str(v) for v in sorted(self.values or ()))  # type: ignore[type-var]

    def std(self) -> float:
        """Sample standard deviation (ddof 1, as Polars' ``std``); 0 below two values."""
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0


def _measure(frame: pl.LazyFrame, columns: list[str]) -> dict[str, _ColumnStats]:
    """:class:`_ColumnStats` of ``columns``, one UTC day of ``ts`` at a time."""
    schema = frame.collect_schema()
    stats = {name: _ColumnStats(schema[name]) for name in columns}
    if not columns:
        return stats
    for part in _day_parts(frame, columns):
        for name in columns:
            stats[name].add(part.get_column(name))
    return stats


def _day_parts(frame: pl.LazyFrame, columns: list[str]) -> Iterator[pl.DataFrame]:
    """``columns`` of ``frame`` per UTC day of ``ts``, in day order (the whole frame without ``ts``).

    A ``ts`` range filter, so a scan of per-day files reads only that day's
    (predicate pushdown on the Parquet statistics). Rows without ``ts`` come last.
    """
    if "ts" not in frame.collect_schema():
        yield frame.select(columns).collect()
        return
    days = frame.select(pl.col("ts").dt.date().unique().sort(nulls_last=True)).collect()
    for day in days.get_column("ts").to_list():
        if day is None:
            yield frame.filter(pl.col("ts").is_null()).select(columns).collect()
            continue
        start, end = day_bounds(day)
        yield frame.filter((pl.col("ts") >= start) & (pl.col("ts") < end)).select(columns).collect()


def day_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """``[midnight, next midnight)`` of a UTC day, as the bounds of a ``ts`` range filter."""
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


def _is_rate(name: str) -> bool:
    return name.endswith(("ctr_smoothed", "positive_rate")) or name == "category_affinity"


_COUNTER = re.compile(
    r"^(events|impressions|clicks|positives)_(\d+d|total)$|^seconds_since_|^age_days$|^distinct_"
)


def _is_counter(name: str) -> bool:
    return bool(_COUNTER.search(name.removeprefix("user_").removeprefix("item_")))


_WINDOWED = re.compile(r"_(\d+)d$")


def _counter_drift(name: str) -> dict[str, Any]:
    """A counter's drift role: windowed counts are stationary after their window
    (``warmup_days``); lifetime counts, distinct counts, ages and times since
    first or last seen grow with the log."""
    windowed = _WINDOWED.search(name)
    if windowed:
        return {"warmup_days": int(windowed.group(1))}
    # Seconds since last seen grows too: bounded by the entity's age, it lengthens
    # as the log ages (0.04 -> 0.23 normalised Wasserstein over 10 clean days).
    return {"drift": DriftRole.GROWING}
