"""Training frames: entity rows plus every feature as of each row's own time.

``build_training_frame(rows, events, users, items, config)`` is the offline
store's read: each row ``(user_id, item_id, ts, …)`` gets user and item
counters (:mod:`features.pit`), the user's recent positive items, the user's
affinity to the item's category, item age, context (hour, weekday, position)
and the static attributes of both entities, all computed from events strictly
before ``ts``. :func:`describe_frame` writes the matching feature spec.
"""

from __future__ import annotations

import re

import polars as pl

from features.aggregates import CtrPrior
from features.feature_spec import Entity, Feature, FeatureKind, FeatureSpec, Normalization
from features.pit import (
    category_affinity_at,
    context_features,
    distinct_counts_at,
    entity_counters_at,
    recent_positives_at,
)
from infra.config import FeaturesConfig

# Example columns carried through untouched (they are not features).
PASSTHROUGH = ("user_id", "item_id", "ts", "label", "request_id", "propensity")
# Smoothing strength of the category-affinity share (pseudo-positives).
AFFINITY_STRENGTH = 5.0


def example_rows(events: pl.LazyFrame) -> pl.LazyFrame:
    """The rows to learn from: impressions when the log has them, else labelled events.

    Click logs (the simulator, serving) label impressions with the click;
    rating logs (MovieLens) label each rating (rating >= threshold).
    """
    has_impressions = (
        events.filter(pl.col("event_type") == "impression").head(1).collect().height > 0
    )
    if has_impressions:
        return events.filter(pl.col("event_type") == "impression")
    return events.filter(pl.col("label").is_not_null())


# The canonical order of examples (ties broken by every id): both engines sort by
# it, so their outputs can be compared row by row.
EXAMPLE_ORDER = ("ts", "user_id", "request_id", "position", "item_id")


def canonical_rows(rows: pl.DataFrame) -> pl.DataFrame:
    """``rows`` sorted by :data:`EXAMPLE_ORDER` (the columns it has), with ``_row``."""
    order = [c for c in EXAMPLE_ORDER if c in rows.columns]
    return rows.sort(order, nulls_last=True, maintain_order=True).with_row_index("_row")


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
    frame: pl.DataFrame, config: FeaturesConfig, n_users: int, n_items: int
) -> FeatureSpec:
    """The feature spec of a training frame; statistics are measured on ``frame``.

    Counts and durations are log1p-normalised (heavy tails); rates and
    affinities are already in [0, 1]; numeric attributes are standardised;
    string and low-cardinality integer attributes get a vocabulary; ids are
    hashed into as many buckets as there are entities.
    """
    features: list[Feature] = [
        Feature(name="user_id", kind=FeatureKind.CATEGORICAL, entity=Entity.USER, dtype="int64", hash_buckets=max(1, n_users)),
        Feature(name="item_id", kind=FeatureKind.CATEGORICAL, entity=Entity.ITEM, dtype="int64", hash_buckets=max(1, n_items)),
        Feature(
            name="user_history", kind=FeatureKind.SEQUENCE, entity=Entity.USER, dtype="list[int64]",
            max_length=config.history_length, description="last positive item ids before the row, most recent last",
        ),
    ]  # fmt: skip
    for name in frame.columns:
        if name in PASSTHROUGH or name in ("user_history", "label"):
            continue
        entity = (
            Entity.USER
            if name.startswith("user_")
            else Entity.ITEM
            if name.startswith("item_")
            else Entity.CONTEXT
        )
        dtype = frame.schema[name]
        if name in ("hour", "weekday", "position"):
            vocab = _vocabulary(frame.get_column(name))
            features.append(
                Feature(
                    name=name,
                    kind=FeatureKind.CATEGORICAL,
                    entity=Entity.CONTEXT,
                    dtype="int64",
                    vocabulary=vocab,
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
                )
            )
        elif name.endswith(("ctr_smoothed", "positive_rate")) or name == "category_affinity":
            features.append(
                Feature(name=name, kind=FeatureKind.NUMERIC, entity=entity, dtype="float64")
            )
        elif dtype == pl.String or (
            dtype.is_integer() and frame.get_column(name).n_unique() <= 1000
        ):
            vocab = _vocabulary(frame.get_column(name))
            features.append(
                Feature(
                    name=name,
                    kind=FeatureKind.CATEGORICAL,
                    entity=entity,
                    dtype="string" if dtype == pl.String else "int64",
                    vocabulary=vocab,
                )
            )
        elif dtype.is_numeric():
            column = frame.get_column(name).cast(pl.Float64)
            std = float(column.std() or 0.0)
            normalization = Normalization.STANDARD if std > 0 else Normalization.NONE
            features.append(
                Feature(
                    name=name, kind=FeatureKind.NUMERIC, entity=entity, dtype="float64", normalization=normalization,
                    mean=float(column.mean() or 0.0) if std > 0 else None, std=std if std > 0 else None,
                    min_value=float(column.min()), max_value=float(column.max()),
                )
            )  # fmt: skip
        # List attributes (genres, tags) wait for a multi-hot encoder in the models issue.
    return FeatureSpec(labels=("label",), features=tuple(features))


_COUNTER = re.compile(
    r"^(events|impressions|clicks|positives)_(\d+d|total)$|^seconds_since_|^age_days$|^distinct_"
)


def _vocabulary(column: pl.Series) -> tuple[str, ...]:
    """Distinct values, sorted, as strings (index 0 stays the out-of-vocabulary slot)."""
    return tuple(str(v) for v in sorted(column.drop_nulls().unique().to_list()))


def _is_counter(name: str) -> bool:
    return bool(_COUNTER.search(name.removeprefix("user_").removeprefix("item_")))
