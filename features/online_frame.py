"""Training-frame rows from online reads: what the request path featurises candidates with.

The reranker was trained on :func:`features.training_frame.build_training_frame`
(the offline store, point in time); a request has no event log, only the
online store's latest vectors. :func:`online_frame` builds the same columns
for one user and a list of candidate items from those reads and the static
attribute tables, and hands them to the training frame's own
:func:`~features.training_frame.assemble` (context, attributes, item age), so
names and derivations cannot drift apart.

Per column, and how far it matches the offline value at the same time:

- ``user_<counter>``, ``item_<counter>``: the store's vector (the same
  :func:`~features.aggregates.entity_features`), exact as of the vector's
  ``features_as_of``. ``seconds_since_*`` are moved on to the request time
  (``+ (ts - features_as_of)``: no event happened in between, or the vector
  would be newer); windowed counts roll over only when the store is
  refreshed (:meth:`~features.online_store.OnlineStore.refresh`, daily).
- ``user_distinct_items``, ``item_distinct_users``: the store's HLL
  estimates where training has exact counts (within the sketch's error).
- ``user_history``: the store's recent positives, as training's.
- ``category_affinity``: training counts all the user's positives per
  category; the store keeps only the last ``history_length`` positive items.
  The share of the candidate's category in that history stands for the share
  in all positives: exact while the user has at most ``history_length``
  positives, an estimate from the recent ones beyond.
- ``hour``, ``weekday`` of the request time; ``position`` a constant (the
  slot is not known before ranking: see :mod:`pipelines.ranker.two_stage`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from features.online_store.sketch_state import DISTINCT_COLUMNS
from features.online_store.state import SECONDS_COLUMNS, entity_schema, feature_columns
from features.online_store.store import FeatureRead
from features.schemas import TS_DTYPE
from features.training_frame import AFFINITY_STRENGTH, assemble


def online_frame(
    user_id: int,
    user: FeatureRead,
    item_ids: Sequence[int] | np.ndarray,
    item_reads: pl.DataFrame,
    ts: dt.datetime,
    users: pl.DataFrame,
    items: pl.DataFrame,
    windows_days: Sequence[int],
    position: int = 0,
) -> pl.DataFrame:
    """(M) rows, one per candidate in the order of ``item_ids``, with the training frame's columns.

    ``user`` the store's read of ``user_id`` (its vector and history; defaults
    when not found); ``item_reads`` :meth:`OnlineStore.read_items` of
    ``item_ids`` (same order); ``ts`` the request time (UTC); ``users`` /
    ``items`` the static attribute tables (``items.category`` enables
    ``category_affinity``); ``windows_days`` the store's. Columns: ``user_id,
    item_id, ts`` and every feature :func:`build_training_frame` makes (see
    the module doc for how each matches), no label.
    """
    ids = np.asarray(item_ids, dtype=np.int64)
    m = ids.size
    if item_reads.height != m:
        raise ValueError(f"item_reads has {item_reads.height} rows for {m} candidate items")
    rows = pl.DataFrame(
        {
            "user_id": np.full(m, user_id, dtype=np.int64),
            "item_id": ids,
            "ts": pl.Series([ts] * m, dtype=TS_DTYPE),
            "position": np.full(m, position, dtype=np.int64),
        }
    ).with_row_index("_row")
    counters = feature_columns(windows_days)
    user_columns = [*counters, DISTINCT_COLUMNS["user"]]
    schema = entity_schema("user", windows_days)
    user_values = {c: user.values.get(c) for c in user_columns}
    advance_seconds(user_values, user.features_as_of, ts)
    history = pl.Series("user_history", [list(user.history)], dtype=pl.List(pl.Int64))
    # One value per user column, broadcast over the candidates.
    users_side = rows.select(
        "_row",
        *[pl.lit(user_values[c], dtype=schema[c]).alias(f"user_{c}") for c in user_columns],
        pl.lit(history).first().alias("user_history"),
    )
    if "category" in items.columns:
        users_side = users_side.with_columns(category_affinity=_category_affinity(user, ids, items))
    item_columns = [*counters, DISTINCT_COLUMNS["item"]]
    items_side = item_reads.select(
        pl.int_range(pl.len(), dtype=pl.UInt32).alias("_row"),
        *[pl.col(c).alias(f"item_{c}") for c in item_columns],
        pl.col("features_as_of"),
    )
    elapsed = (pl.lit(ts, dtype=TS_DTYPE) - pl.col("features_as_of")).dt.total_microseconds()
    items_side = items_side.with_columns(
        (pl.col(f"item_{c}") + elapsed.cast(pl.Float64) / 1e6).alias(f"item_{c}")
        for c in SECONDS_COLUMNS
    ).drop("features_as_of")
    return assemble(rows, users_side, items_side, users, items)


def advance_seconds(values: dict[str, Any], as_of: dt.datetime | None, ts: dt.datetime) -> None:
    """``seconds_since_*`` of a vector computed at ``as_of``, moved on to ``ts`` (in place)."""
    if as_of is None:
        return
    elapsed = (ts - as_of).total_seconds()
    for column in SECONDS_COLUMNS:
        if values.get(column) is not None:
            values[column] = float(values[column]) + elapsed


def _category_affinity(user: FeatureRead, ids: np.ndarray, items: pl.DataFrame) -> pl.Series:
    """(M,) smoothed share of the user's positives in each candidate's category.

    The smoothing of :func:`features.pit.category_affinity_at`:
    ``(in category + s / n_categories) / (positives + s)``, with the in-category
    count estimated from the stored history (module doc).
    """
    categories = items.select("item_id", "category")
    positives = float(user.values.get("positives_total") or 0)
    history = pl.DataFrame({"item_id": pl.Series(list(user.history), dtype=pl.Int64)})
    per_category = (
        history.join(categories, on="item_id", how="left")
        .group_by("category")
        .agg(pl.len().alias("_n"))
    )
    candidates = (
        pl.DataFrame({"item_id": ids})
        .join(categories, on="item_id", how="left", maintain_order="left")
        .join(per_category, on="category", how="left", maintain_order="left")
    )
    in_category = candidates.get_column("_n").fill_null(0).to_numpy()
    return pl.Series(
        category_affinity(in_category, history.height, positives, category_count(items))
    )


def category_count(items: pl.DataFrame) -> int:
    """How many categories the smoothing spreads its prior over (a null category counts as one)."""
    return max(1, items.get_column("category").n_unique())


def category_affinity(
    in_category: np.ndarray, history_length: int, positives: float, n_categories: int
) -> np.ndarray:
    """(M,) float64 :func:`_category_affinity` from its counts: ``in_category`` (M,) how many of
    the ``history_length`` stored history items share each candidate's (non-null) category."""
    # Each history item stands for positives / len(history) of the user's positives.
    scale = positives / history_length if history_length else 0.0
    share = 1.0 / n_categories
    return (in_category.astype(np.float64) * scale + AFFINITY_STRENGTH * share) / (
        positives + AFFINITY_STRENGTH
    )
