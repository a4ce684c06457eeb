"""Per-entity HyperLogLog distinct counts as mergeable feature columns.

A frame of events becomes one row per entity::

    [entity, "<name>_hll" (pl.Binary, compact serialised sketch), "<name>_estimate" (f64)]

used for distinct items per user (diversity), distinct users per item (reach)
and distinct users per UTC day (DAU).

Canonical form, and what is exact. An HLL's *registers* (dense mode) or
*coupon set* (sparse mode) are a function of the set of values seen, whatever
the order or partitioning. Two things are not:

* the HIP estimator DataSketches uses for a sketch updated in one stream
  depends on the order of updates (measured: the same 5,000 values in two
  orders give estimates 1% apart);
* a union result carries an "out of order" flag and uses the composite
  estimator instead, so "built at once" and "built per block and merged"
  would disagree by that much.

Every sketch this module writes is therefore canonicalised: it goes through an
``hll_union`` twice (itself with itself; a no-op on the set), which always
leaves a dense sketch flagged out of order, so its estimate is the composite
estimator, a function of the registers alone (the price: HIP's ~0.83 / sqrt(k)
relative error becomes the composite's ~1.04 / sqrt(k), the figure the config
documents). Result: estimates are exactly
equal whether built at once, per block and merged in any grouping, or folded
in one event at a time; in dense mode the serialised bytes are equal too
(the union's HLL_8 gadget is converted to the target type register by
register). In sparse mode (small counts) the coupon *set* is equal but its
serialised order follows insertion order (and a deserialise / serialise round
trip of a SET-mode sketch reorders it), so bytes may differ while the estimate
(near-exact there) does not. The batch builder and the online
:func:`update_hll` share one routine (:func:`_fold`).

Costs: DataSketches' Python API updates one value at a time, so values are
deduplicated per entity with Polars first; each distinct (entity, value) pair
is one ``update`` call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import datasketches as ds
import polars as pl

from features.sketches.base import (
    HllConfig,
    as_hll_config,
    require_columns,
    require_integer,
)
from infra.config import SketchConfig

__all__ = [
    "daily_active_users",
    "distinct_per_entity",
    "hll_estimate",
    "item_reach",
    "merge_hll",
    "merge_hll_columns",
    "update_hll",
    "user_diversity",
]


def _union_add(union: ds.hll_union, sketch: ds.hll_sketch) -> None:
    """``union.update(sketch)``, then force the union's deferred register-summary rebuild.

    Works around apache/datasketches-cpp#512 (present in the datasketches 5.2 wheel):
    a dense merge only flags the KxQ/curMin summary for a lazy rebuild, and the next
    ``update`` reads the stale summary. After a merge that downsamples (a stored
    sketch with a larger lg_k), ``isEmpty()`` then reports the populated union as
    empty and the next sketch *replaces* it: the estimate collapses to one input's
    (measured: 4,121 instead of ~6,000; regression test in the unit tests). Reading
    the estimate performs the rebuild, costs O(k) and is harmless once fixed upstream.
    Doing it after every update also keeps the call sequence, hence the bytes, the
    same on every path.
    """
    union.update(sketch)
    union.get_estimate()


def _canonical(sketch: ds.hll_sketch, config: HllConfig) -> bytes:
    """Compact bytes of ``sketch`` in canonical form (see the module docstring).

    The first ``update`` into an empty union copies the sketch as is (HIP state
    included); the second merges it into itself, which sets the out-of-order flag
    in dense mode and changes nothing in sparse mode. ``lg_max_k = config.lg_k``
    also downsamples a stored sketch with a larger ``lg_k`` to the configured one.
    """
    union = ds.hll_union(config.lg_k)
    _union_add(union, sketch)
    _union_add(union, sketch)
    return bytes(union.get_result(config.ds_type).serialize_compact())


def _fold(serialised: bytes | None, values: Iterable[int], config: HllConfig) -> bytes:
    """The one update routine: ``serialised`` (or an empty sketch) plus ``values``, canonical."""
    sketch = (
        ds.hll_sketch(config.lg_k, config.ds_type)
        if serialised is None
        else ds.hll_sketch.deserialize(serialised)
    )
    update = sketch.update
    for value in values:
        update(value)
    return _canonical(sketch, config)


def update_hll(
    serialised: bytes | None, values: Iterable[int], config: HllConfig | SketchConfig
) -> bytes:
    """Online path: fold integer ``values`` into a stored sketch (None: a new one).

    Returns canonical compact bytes; equal in estimate (and in dense mode, bytes) to
    building from all the values at once. Values must be Python or NumPy integers:
    DataSketches hashes ``1`` and ``1.0`` differently.
    """
    return _fold(serialised, values, as_hll_config(config))


def hll_estimate(serialised: bytes | None) -> float:
    """Distinct-count estimate of one serialised sketch (None: 0.0)."""
    return (
        0.0 if serialised is None else float(ds.hll_sketch.deserialize(serialised).get_estimate())
    )


def merge_hll(sketches: Iterable[bytes | None], config: HllConfig | SketchConfig) -> bytes:
    """Union of serialised sketches (Nones skipped) in canonical form; none at all: empty sketch."""
    cfg = as_hll_config(config)
    union = ds.hll_union(cfg.lg_k)
    for serialised in sketches:
        if serialised is not None:
            _union_add(union, ds.hll_sketch.deserialize(serialised))
    return _canonical(union.get_result(cfg.ds_type), cfg)


def _columns(name: str) -> tuple[str, str]:
    return f"{name}_hll", f"{name}_estimate"


def _empty(entity: str, dtype: pl.DataType, name: str) -> pl.DataFrame:
    hll, estimate = _columns(name)
    return pl.DataFrame(schema={entity: dtype, hll: pl.Binary(), estimate: pl.Float64()})


def _frame(
    entity: str, dtype: pl.DataType, name: str, keys: Sequence[object], blobs: list[bytes]
) -> pl.DataFrame:
    hll, estimate = _columns(name)
    return pl.DataFrame(
        {
            entity: pl.Series(entity, keys, dtype=dtype),
            hll: pl.Series(hll, blobs, dtype=pl.Binary()),
            estimate: pl.Series(estimate, [hll_estimate(b) for b in blobs], dtype=pl.Float64()),
        }
    )


def distinct_per_entity(
    events: pl.DataFrame,
    entity: str,
    of: str,
    config: HllConfig | SketchConfig,
    name: str | None = None,
) -> pl.DataFrame:
    """One HLL sketch per ``entity`` value of the distinct integer values of column ``of``.

    Returns ``[entity, "<name>_hll" (Binary), "<name>_estimate" (f64)]``, one row per
    entity, sorted by entity; ``name`` defaults to ``"distinct_<of>"``. Rows with a
    null entity or value are skipped (a null id is no entity and no item). Empty
    input gives an empty frame of that schema.
    """
    require_columns(events, [entity, of], "distinct_per_entity")
    require_integer(events, of, "distinct_per_entity")
    cfg = as_hll_config(config)
    name = name or f"distinct_{of}"
    dtype = events.schema[entity]
    # Polars dedupes and sorts each entity's values, so each distinct pair costs one
    # Python-level update, and the update order (hence sparse-mode bytes) is fixed.
    grouped = (
        events.lazy()
        .select(entity, of)
        .drop_nulls()
        .group_by(entity)
        .agg(pl.col(of).unique().sort())
        .sort(entity)
        .collect()
    )
    if grouped.height == 0:
        return _empty(entity, dtype, name)
    keys = grouped.get_column(entity).to_list()
    blobs = [_fold(None, values, cfg) for values in grouped.get_column(of).to_list()]
    return _frame(entity, dtype, name, keys, blobs)


def merge_hll_columns(
    *frames: pl.DataFrame, entity: str, name: str, config: HllConfig | SketchConfig
) -> pl.DataFrame:
    """Merge frames of ``[entity, "<name>_hll", ...]`` by entity (HLL union), re-estimating.

    Used to reduce per-block / per-partition builds and to fold a day's sketches
    into stored ones. An entity in one frame only keeps its set. Output schema and
    order as :func:`distinct_per_entity`; extra columns of the inputs are dropped.
    """
    cfg = as_hll_config(config)
    hll, _ = _columns(name)
    for frame in frames:
        require_columns(frame, [entity, hll], "merge_hll_columns")
    if not frames:
        raise ValueError("merge_hll_columns needs at least one frame")
    dtype = frames[0].schema[entity]
    grouped = (
        pl.concat([f.select(entity, hll) for f in frames], how="vertical_relaxed")
        .drop_nulls(entity)
        .group_by(entity)
        .agg(pl.col(hll))
        .sort(entity)
    )
    if grouped.height == 0:
        return _empty(entity, dtype, name)
    keys = grouped.get_column(entity).to_list()
    blobs = [merge_hll(parts, cfg) for parts in grouped.get_column(hll).to_list()]
    return _frame(entity, dtype, name, keys, blobs)


# --------------------------------------------------------------------------- the three features


def user_diversity(events: pl.DataFrame, config: HllConfig | SketchConfig) -> pl.DataFrame:
    """Distinct items per user: ``[user_id, items_hll, items_estimate]``."""
    return distinct_per_entity(events, "user_id", "item_id", config, name="items")


def item_reach(events: pl.DataFrame, config: HllConfig | SketchConfig) -> pl.DataFrame:
    """Distinct users per item: ``[item_id, users_hll, users_estimate]``."""
    return distinct_per_entity(events, "item_id", "user_id", config, name="users")


def daily_active_users(events: pl.DataFrame, config: HllConfig | SketchConfig) -> pl.DataFrame:
    """Distinct users per UTC day of ``ts``: ``[day (date), dau_hll, dau_estimate]``.

    A window's active users is :func:`merge_hll` of its days' sketches.
    """
    require_columns(events, ["ts", "user_id"], "daily_active_users")
    with_day = events.select(pl.col("ts").dt.date().alias("day"), "user_id")
    return distinct_per_entity(with_day, "day", "user_id", config, name="dau")
