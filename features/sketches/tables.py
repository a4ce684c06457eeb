"""The sketch features of one dataset, built per block and merged.

:func:`build_sketch_tables` turns a block of events into four tables;
:func:`merge_sketch_tables` reduces the blocks' tables into the dataset's.
Both engines publish the reduced tables; the Ray engine builds one per
Parquet partition, the Polars engine one for the whole log (a single block).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from features.sketches.base import as_cms_config, as_hll_config
from features.sketches.cms import cms_by_day, merge_cms_many
from features.sketches.hll import daily_active_users, item_reach, merge_hll_columns, user_diversity
from infra.config import SketchConfig


@dataclass(frozen=True)
class SketchTables:
    """``user_diversity`` [user_id, items_hll, items_estimate];
    ``item_reach`` [item_id, users_hll, users_estimate];
    ``dau`` [day, dau_hll, dau_estimate];
    ``item_frequency`` [day, cms, total_weight] (Count-Min per UTC day)."""

    user_diversity: pl.DataFrame
    item_reach: pl.DataFrame
    dau: pl.DataFrame
    item_frequency: pl.DataFrame

    NAMES = ("user_diversity", "item_reach", "dau", "item_frequency")

    def as_dict(self) -> dict[str, pl.DataFrame]:
        return {name: getattr(self, name) for name in self.NAMES}


def build_sketch_tables(events: pl.DataFrame, config: SketchConfig) -> SketchTables:
    """Sketch tables of one block of canonical events (``user_id, item_id, ts``)."""
    hll, cms = as_hll_config(config), as_cms_config(config)
    return SketchTables(
        user_diversity=user_diversity(events, hll),
        item_reach=item_reach(events, hll),
        dau=daily_active_users(events, hll),
        item_frequency=cms_by_day(events, cms),
    )


def merge_sketch_tables(parts: Sequence[SketchTables], config: SketchConfig) -> SketchTables:
    """The reduce: HLL unions by entity or day, Count-Min sums by day."""
    if len(parts) == 1:
        return parts[0]
    hll, cms = as_hll_config(config), as_cms_config(config)
    by_day = (
        pl.concat([p.item_frequency for p in parts])
        .group_by("day", maintain_order=True)
        .agg(pl.col("cms"), pl.col("total_weight").sum())
    )
    frequency = by_day.sort("day").with_columns(
        pl.col("cms").map_elements(lambda blobs: merge_cms_many(blobs, cms), return_dtype=pl.Binary)
    )
    return SketchTables(
        user_diversity=merge_hll_columns(
            *[p.user_diversity for p in parts], entity="user_id", name="items", config=hll
        ),
        item_reach=merge_hll_columns(
            *[p.item_reach for p in parts], entity="item_id", name="users", config=hll
        ),
        dau=merge_hll_columns(*[p.dau for p in parts], entity="day", name="dau", config=hll),
        item_frequency=frequency.select("day", "cms", "total_weight"),
    )
