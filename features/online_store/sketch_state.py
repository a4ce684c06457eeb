"""The sketches the online store keeps, and how a batch of events updates them.

Backend-free, like :mod:`.state`, and built from :mod:`features.sketches`'
own functions, so the stream and the batch cannot disagree:

``k`` (in each entity's state blob)
    The entity's HyperLogLog: distinct items of a user (``items_hll``),
    distinct users of an item (``users_hll``). Streaming folds a batch in with
    :func:`~features.sketches.update_hll`, the batch builder's routine; both
    write the canonical form, whose estimate depends on the set of values
    only, so the streamed estimate *equals* the batch table's
    (``items_estimate`` / ``users_estimate``), not just within the error.
    Memory: at most :attr:`~features.sketches.HllConfig.max_bytes` (HLL_4 at
    lg_k 10: ~0.6 kB; a few bytes per value while sparse, below ~k/4 values).
``q`` (items only)
    ``[[day, ...], [estimate, ...]]``: the item's Count-Min estimate on each
    UTC day of the longest window on which it had events (at most
    ``max(windows_days)`` pairs, a few bytes each).
Day sketches (store-wide)
    One Count-Min sketch of item frequency per UTC day, for the days of the
    longest window only (older days are deleted by the write that moves the
    clock past them). Each is a full counter array: ~8 * num_hashes *
    num_buckets bytes, **~1.1 MB per day at the default epsilon 1e-4**
    (~33 MB for 30 days). A batch is sketched with
    :func:`~features.sketches.cms_by_day` (the batch builder) and added to its
    day's stored sketch with :func:`~features.sketches.merge_cms`; with integer
    weights the sum is exact, so the stored day sketches equal the batch
    table's ``item_frequency`` byte for byte.

The item features ``popularity_cms_{w}d`` are the **sum over the window's days
of the per-day estimates** (not the estimate of the merged window sketch).
A day on which the item had no event contributes 0, its true count (the
buckets say so), rather than that day's hash collisions. Per day the estimate
is at least the true count and at most ``epsilon * N_day`` above it, so the
sum lies in ``[count, count + epsilon * N_window]``: the merged sketch's bound,
and never looser than its estimate (a sum of row-minima is at most the
minimum of row-sums). An estimate is taken when the item is written; it only
grows as other items hit the same counters (counters never decrease), so a
stored estimate is always >= the true count and a later one replaces it (we
keep the larger). :meth:`~features.online_store.OnlineStore.refresh`
re-estimates every item from the stored day sketches, after which the values
equal the batch's exactly.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasketches as ds
import polars as pl

from features.aggregates import ENTITY_KEYS
from features.sketches import (
    CmsConfig,
    HllConfig,
    cms_by_day,
    cms_estimates,
    hll_estimate,
    merge_cms,
    update_hll,
)
from infra.config import SketchConfig

_EPOCH_DATE = dt.date(1970, 1, 1)
# The other side of each entity's HLL: a user counts items, an item counts users.
_COUNTED = {"user": "item_id", "item": "user_id"}
DISTINCT_COLUMNS = {"user": "distinct_items", "item": "distinct_users"}


def popularity_column(window_days: int) -> str:
    """The item vector's Count-Min popularity column of a window."""
    return f"popularity_cms_{window_days}d"


def sketch_columns(entity: str, windows_days: Sequence[int]) -> list[str]:
    """Columns the sketches add to an entity's vector, after the counter features."""
    if entity == "user":
        return [DISTINCT_COLUMNS["user"]]
    return [DISTINCT_COLUMNS["item"], *[popularity_column(w) for w in windows_days]]


def sketch_schema(entity: str, windows_days: Sequence[int]) -> dict[str, pl.DataType]:
    """HLL estimates are floats; Count-Min estimates of counts are integers."""
    return {
        c: pl.Float64() if c in DISTINCT_COLUMNS.values() else pl.Int64()
        for c in sketch_columns(entity, windows_days)
    }


def layout(hll: HllConfig, cms: CmsConfig) -> list[Any]:
    """The sketch shapes a store was written with (kept in its meta)."""
    return [hll.lg_k, hll.tgt_type, cms.num_hashes, cms.num_buckets, cms.seed]


def configs(settings: SketchConfig) -> tuple[HllConfig, CmsConfig]:
    return HllConfig.from_settings(settings), CmsConfig.from_settings(settings)


# --------------------------------------------------------------------------- days


def day_number(day: dt.date) -> int:
    """Days since 1970-01-01 (the state blob's day encoding)."""
    return (day - _EPOCH_DATE).days


def day_date(number: int) -> dt.date:
    return _EPOCH_DATE + dt.timedelta(days=number)


def first_kept_day(as_of: dt.datetime, windows_days: Sequence[int]) -> int:
    """The first day of the longest window at ``as_of`` (as :func:`~features.aggregates.compact`)."""
    return day_number(as_of.astimezone(dt.UTC).date()) - max(windows_days) + 1


def check_cms_shape(cms: bytes, config: CmsConfig, what: str) -> None:
    sketch = ds.count_min_sketch.deserialize(cms)
    if (sketch.num_hashes, sketch.num_buckets) != (config.num_hashes, config.num_buckets):
        raise ValueError(
            f"{what}: Count-Min of {sketch.num_hashes} x {sketch.num_buckets}, the config "
            f"(features.sketches) gives {config.num_hashes} x {config.num_buckets}"
        )


# --------------------------------------------------------------------------- per entity


@dataclass
class SketchState:
    """An entity's HLL (None: no value yet) and, for items, Count-Min estimates per day."""

    hll: bytes | None = None
    days: dict[int, int] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        """Fields merged into the entity's state blob (see :mod:`.state`)."""
        out: dict[str, Any] = {"k": self.hll}
        if self.days:
            ordered = sorted(self.days)
            out["q"] = [ordered, [self.days[d] for d in ordered]]
        return out

    @staticmethod
    def decode(raw: Mapping[str, Any]) -> SketchState:
        days = raw.get("q")
        return SketchState(
            hll=raw.get("k"),
            days=dict(zip(days[0], days[1], strict=True)) if days else {},
        )


@dataclass(frozen=True)
class BatchSketches:
    """What a batch adds, computed once outside the write transaction.

    ``values[entity][id]``: the distinct ids the entity's HLL counts (sorted);
    ``day_cms[day]``: the Count-Min of the batch's events of that day.
    """

    values: dict[str, dict[int, list[int]]]
    day_cms: dict[int, bytes]


def batch_sketches(events: pl.DataFrame, cms: CmsConfig) -> BatchSketches:
    values: dict[str, dict[int, list[int]]] = {}
    for entity, key in ENTITY_KEYS.items():
        grouped = (
            events.lazy()
            .select(key, _COUNTED[entity])
            .drop_nulls()
            .group_by(key)
            .agg(pl.col(_COUNTED[entity]).unique().sort())
            .collect()
        )
        values[entity] = dict(grouped.iter_rows())
    by_day = cms_by_day(events.select("item_id", "ts"), cms)
    day_cms = {day_number(d): blob for d, blob in by_day.select("day", "cms").iter_rows()}
    return BatchSketches(values, day_cms)


def fold_days(
    stored: Mapping[int, bytes | None], batch: Mapping[int, bytes], keep_from: int
) -> dict[int, bytes]:
    """The day sketches after the batch: stored + batch (:func:`merge_cms`), kept days only.

    A late event of a day before ``keep_from`` is in no window any more: it is
    not sketched (its bucket is folded into the lifetime row the same way).
    """
    out: dict[int, bytes] = {}
    for day, cms in batch.items():
        if day < keep_from:
            continue
        old = stored.get(day)
        out[day] = cms if old is None else merge_cms(old, cms)
    return out


def update_states(
    entity: str,
    buckets: pl.DataFrame,
    stored: Mapping[int, SketchState],
    new_values: Mapping[int, Sequence[int]],
    day_cms: Mapping[int, bytes],
    keep_from: int,
    hll: HllConfig,
) -> dict[int, SketchState]:
    """New sketch state of every entity in ``buckets`` (compacted, after the update).

    HLL: ``update_hll(stored, new values)`` for the entities with new values.
    Items: for each day of the longest window on which the bucket table has the
    item, the estimate from ``day_cms`` where this write has that day's sketch
    (never lowering a stored one: estimates only grow), else the stored one.
    """
    key = buckets.columns[0]
    days_of: dict[int, list[int]] = {}
    if entity == "item":
        recent = buckets.filter(pl.col("day") >= day_date(keep_from)).select(
            key, pl.col("day").cast(pl.Int32)
        )
        for i, day in recent.iter_rows():
            days_of.setdefault(i, []).append(day)
    estimates = _estimates(day_cms, days_of)
    out: dict[int, SketchState] = {}
    for i in buckets.get_column(key).unique(maintain_order=True).to_list():
        old = stored.get(i) or SketchState()
        values = new_values.get(i)
        sketch = update_hll(old.hll, values, hll) if values else old.hll
        days = {}
        for day in days_of.get(i, ()):
            fresh = estimates.get((day, i))
            kept = old.days.get(day, 0)
            days[day] = kept if fresh is None else max(kept, fresh)
        out[i] = SketchState(sketch, days)
    return out


def _estimates(
    day_cms: Mapping[int, bytes], days_of: Mapping[int, Iterable[int]]
) -> dict[tuple[int, int], int]:
    """``(day, item) -> estimate`` for the items' days that ``day_cms`` holds (one decode a day)."""
    wanted: dict[int, list[int]] = {}
    for item, days in days_of.items():
        for day in days:
            if day in day_cms:
                wanted.setdefault(day, []).append(item)
    out: dict[tuple[int, int], int] = {}
    for day, items in wanted.items():
        for item, estimate in zip(items, cms_estimates(day_cms[day], items).tolist(), strict=True):
            out[(day, item)] = round(estimate)
    return out


def with_sketch_columns(
    features: pl.DataFrame,
    entity: str,
    states: Mapping[int, SketchState],
    as_of: dt.datetime,
    windows_days: Sequence[int],
) -> pl.DataFrame:
    """``features`` (an ``entity_features`` frame) with :func:`sketch_columns` appended."""
    key = features.columns[0]
    ids = features.get_column(key).to_list()
    found = [states.get(i) or SketchState() for i in ids]
    columns: dict[str, list[Any]] = {DISTINCT_COLUMNS[entity]: [hll_estimate(s.hll) for s in found]}
    if entity == "item":
        today = day_number(as_of.astimezone(dt.UTC).date())
        for w in windows_days:
            start = today - w + 1
            columns[popularity_column(w)] = [
                sum(v for d, v in s.days.items() if d >= start) for s in found
            ]
    schema = sketch_schema(entity, windows_days)
    return features.with_columns(
        pl.Series(name, values, dtype=schema[name]) for name, values in columns.items()
    )
