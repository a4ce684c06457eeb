"""Count-Min item frequencies: global, per UTC day, and any window as the merge of its days.

A Count-Min sketch is ``num_hashes`` rows of ``num_buckets`` counters; an item
adds its weight to one counter per row and its estimate is the minimum over
rows. With non-negative weights it never underestimates, and it overestimates
by at most ``epsilon * N`` (N = total weight) with probability ``1 - delta`` per
item. Merging adds counters, so the merge of per-day sketches *is* the sketch
of the window (exactly, bytes included, when the weights are integers: float
sums of counts below 2**53 do not round).

Costs: DataSketches' Python API updates one item at a time, so events are
pre-counted per item with Polars and each distinct item is one
``update(item, weight)`` call. A serialised sketch stores every counter
(~8 * num_hashes * num_buckets bytes, 1.1 MB at the default epsilon), so keep
one per day, not one per entity.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import NamedTuple

import datasketches as ds
import numpy as np
import numpy.typing as npt
import polars as pl

from features.sketches.base import (
    CmsConfig,
    as_cms_config,
    require_columns,
    require_integer,
)
from infra.config import SketchConfig

__all__ = [
    "TopItems",
    "cms_by_day",
    "cms_estimates",
    "cms_from_events",
    "cms_total_weight",
    "cms_window",
    "merge_cms",
    "merge_cms_many",
    "top_items",
]

_WEIGHT = "__cms_weight"


def _new(config: CmsConfig) -> ds.count_min_sketch:
    return ds.count_min_sketch(config.num_hashes, config.num_buckets, config.seed)


def _item_weights(
    events: pl.DataFrame, key: str, weight: str | None, by: tuple[str, ...] = ()
) -> pl.DataFrame:
    """``[*by, key, _WEIGHT]``: one row per distinct non-null key (per ``by``), summed weight.

    The weight is the row count when ``weight`` is None. Null keys and null weights
    are skipped; a negative weight raises, since it would void the
    never-underestimates guarantee. Sorted, so the update order (hence the float
    sums with non-integer weights) is fixed.
    """
    require_columns(events, [key] if weight is None else [key, weight], "count-min")
    require_integer(events, key, "count-min")
    if weight is not None:
        if not events.schema[weight].is_numeric():
            raise TypeError(f"count-min: weight column {weight!r} must be numeric")
        lowest = events.get_column(weight).min()
        if lowest is not None and lowest < 0:  # type: ignore[operator]
            raise ValueError(f"count-min: weight column {weight!r} holds negative values")
    value = pl.len() if weight is None else pl.col(weight).sum()
    return (
        events.lazy()
        .drop_nulls([*by, key] if weight is None else [*by, key, weight])
        .group_by(*by, key)
        .agg(value.cast(pl.Float64).alias(_WEIGHT))
        .sort(*by, key)
        .collect()
    )


def _build(keys: list[int], weights: list[float], config: CmsConfig) -> bytes:
    sketch = _new(config)
    update = sketch.update
    for item, w in zip(keys, weights, strict=True):
        update(item, w)
    return bytes(sketch.serialize())


def cms_from_events(
    events: pl.DataFrame,
    config: CmsConfig | SketchConfig,
    key: str = "item_id",
    weight: str | None = None,
) -> bytes:
    """Serialised Count-Min sketch of ``key`` frequencies (``weight``: sum of that column).

    Empty input gives a serialised empty sketch (total weight 0).
    """
    cfg = as_cms_config(config)
    counts = _item_weights(events, key, weight)
    return _build(counts.get_column(key).to_list(), counts.get_column(_WEIGHT).to_list(), cfg)


def cms_by_day(
    events: pl.DataFrame,
    config: CmsConfig | SketchConfig,
    key: str = "item_id",
    weight: str | None = None,
) -> pl.DataFrame:
    """One sketch per UTC day of ``ts``: ``[day (date), cms (binary), total_weight (f64)]``.

    Sorted by day; days without events have no row. A window is
    :func:`cms_window` (the merge of its days).
    """
    cfg = as_cms_config(config)
    require_columns(events, ["ts"], "cms_by_day")
    with_day = events.with_columns(pl.col("ts").dt.date().alias("day"))
    counts = _item_weights(with_day, key, weight, by=("day",))
    schema = {"day": pl.Date(), "cms": pl.Binary(), "total_weight": pl.Float64()}
    rows: dict[str, list[object]] = {"day": [], "cms": [], "total_weight": []}
    for (day,), part in counts.partition_by("day", as_dict=True, maintain_order=True).items():
        weights = part.get_column(_WEIGHT).to_list()
        rows["day"].append(day)
        rows["cms"].append(_build(part.get_column(key).to_list(), weights, cfg))
        rows["total_weight"].append(float(sum(weights)))
    return pl.DataFrame(rows, schema=schema)


def merge_cms(a: bytes, b: bytes) -> bytes:
    """Counter-wise sum of two serialised sketches of the same shape and seed.

    Raises ``ValueError`` (from DataSketches) when the shapes differ.
    """
    merged = ds.count_min_sketch.deserialize(a)
    merged.merge(ds.count_min_sketch.deserialize(b))
    return bytes(merged.serialize())


def merge_cms_many(sketches: Iterable[bytes], config: CmsConfig | SketchConfig) -> bytes:
    """Merge of any number of serialised sketches; none at all gives an empty sketch."""
    merged = _new(as_cms_config(config))
    for serialised in sketches:
        merged.merge(ds.count_min_sketch.deserialize(serialised))
    return bytes(merged.serialize())


def cms_window(
    by_day: pl.DataFrame, start: dt.date, end: dt.date, config: CmsConfig | SketchConfig
) -> bytes:
    """Sketch of the days ``start <= day <= end`` of a :func:`cms_by_day` frame (merge of days)."""
    require_columns(by_day, ["day", "cms"], "cms_window")
    days = by_day.filter(pl.col("day").is_between(start, end, closed="both"))
    return merge_cms_many(days.get_column("cms").to_list(), config)


def cms_total_weight(cms: bytes) -> float:
    """N of the error bound: the sum of all weights the sketch has seen."""
    return float(ds.count_min_sketch.deserialize(cms).total_weight)


def cms_estimates(cms: bytes, item_ids: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Estimated frequency of each id, shape ``(len(item_ids),)``; never below the true count."""
    sketch = ds.count_min_sketch.deserialize(cms)
    ids = np.asarray(item_ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"cms_estimates: item ids must be integers, got {ids.dtype}")
    estimate = sketch.get_estimate
    return np.fromiter((estimate(i) for i in ids.tolist()), dtype=np.float64, count=ids.size)


class TopItems(NamedTuple):
    """Heavy hitters among candidates, by estimate descending (ties: smaller id first)."""

    item_ids: npt.NDArray[np.int64]
    estimates: npt.NDArray[np.float64]


def top_items(cms: bytes, candidate_ids: npt.ArrayLike, k: int) -> TopItems:
    """The ``k`` candidates with the largest estimated frequency (fewer if fewer candidates).

    A sketch cannot list its items, so the candidates (e.g. the catalogue) are
    given. Each estimate is at most ``epsilon * N`` above the truth (probability
    ``1 - delta`` per item), so an item whose true count beats the k-th largest
    true count by more than ``epsilon * N`` is returned.
    """
    if k < 0:
        raise ValueError(f"top_items: k must be >= 0, got {k}")
    ids = np.unique(np.asarray(candidate_ids, dtype=np.int64))  # sorted, deduplicated
    estimates = cms_estimates(cms, ids)
    # lexsort's last key is primary: estimate descending, then id ascending.
    order = np.lexsort((ids, -estimates))[:k]
    return TopItems(item_ids=ids[order], estimates=estimates[order])
