"""Cheap checks on sketches, run on every window: DAU against its trend, the popularity head
against the reference.

Both read only mergeable sketches (:mod:`features.sketches`), so they cost the
same on a day of a thousand events as on a day of a billion, and the online
store's per-day sketches could feed them as well as the event log.

**DAU** (HyperLogLog): distinct users per UTC day. The window's mean daily
estimate against the median of the ``trend_days`` days before it; the
statistic is ``|ln(window / median)|`` (symmetric: doubling and halving
weigh the same). **Popularity head** (Count-Min): the reference period's
``head_k`` heavy hitters and the window's (among the items each saw), and
the total variation distance between the window's and the reference's item
shares over the union of both heads (0: same head, same shares; 1: disjoint).

Thresholds come from the data's own noise, not from a constant: each day of
the baseline (the trend days, the reference days) is judged against the
others the same way (leave one out), and a window drifts when its statistic
exceeds ``margin`` times the largest of those (and ``floor``, so a baseline of
identical days does not alert on noise). A check with fewer than
``min_days`` baseline days is not judged and says so.
"""

from __future__ import annotations

import io
import math
import statistics

import numpy as np
import polars as pl

from features.sketches import (
    cms_by_day,
    cms_estimates,
    cms_total_weight,
    daily_active_users,
    merge_cms_many,
    top_items,
)
from infra.config import SketchConfig
from infra.storage import StoragePath
from monitoring.verdict import Verdict, above, not_judged

SKETCH_FILE = "sketches.parquet"
DAU_TEST = "hll_log_ratio_vs_trend"
HEAD_TEST = "cms_head_tvd"
# Columns of one baseline day: its Count-Min of item events, their weight, the
# items it saw (the heavy-hitter candidates) and its distinct users.
SKETCH_SCHEMA = {
    "day": pl.Date(),
    "cms": pl.Binary(),
    "total_weight": pl.Float64(),
    "items": pl.List(pl.Int64()),
    "dau": pl.Float64(),
}


def day_sketches(events: pl.DataFrame, sketches: SketchConfig) -> pl.DataFrame:
    """Per UTC day of ``events`` (``user_id, item_id, ts``): :data:`SKETCH_SCHEMA`."""
    if events.height == 0:
        return pl.DataFrame(schema=SKETCH_SCHEMA)
    counts = cms_by_day(events.select("item_id", "ts"), sketches)
    dau = daily_active_users(events.select("user_id", "ts"), sketches).select(
        "day", pl.col("dau_estimate").alias("dau")
    )
    items = (
        events.select(pl.col("ts").dt.date().alias("day"), "item_id")
        .unique()
        .group_by("day")
        .agg(pl.col("item_id").sort().alias("items"))
    )
    frame = counts.join(items, on="day").join(dau, on="day").sort("day")
    return frame.select([pl.col(c).cast(t) for c, t in SKETCH_SCHEMA.items()])


def save_sketches(frame: pl.DataFrame, folder: StoragePath) -> StoragePath:
    buffer = io.BytesIO()
    frame.select(list(SKETCH_SCHEMA)).write_parquet(buffer, compression="zstd")
    path = folder.join(SKETCH_FILE)
    path.write_bytes_atomic(buffer.getvalue())
    return path


def load_sketches(folder: StoragePath) -> pl.DataFrame | None:
    """The baseline days saved beside a reference profile; None for a profile without them."""
    path = folder.join(SKETCH_FILE)
    if not path.exists():
        return None
    return pl.read_parquet(io.BytesIO(path.read_bytes()))


def dau_check(
    window: pl.DataFrame, trend: pl.DataFrame, margin: float, floor: float, min_days: int
) -> Verdict:
    """DAU of the window's days against the median of the trend days before it."""
    name = "dau"
    trend_dau = trend.get_column("dau").to_list()
    window_dau = window.get_column("dau").to_list()
    if not window_dau:
        return not_judged(name, DAU_TEST, "no events in the window")
    if len(trend_dau) < min_days:
        return not_judged(
            name, DAU_TEST, f"{len(trend_dau)} trend days before the window (needs {min_days})"
        )
    current = statistics.fmean(window_dau)
    median = statistics.median(trend_dau)
    baseline = [
        abs(math.log(day / statistics.median(trend_dau[:i] + trend_dau[i + 1 :])))
        for i, day in enumerate(trend_dau)
    ]
    details = {
        "current": round(current, 1),
        "trend_median": round(median, 1),
        "trend_days": [str(d) for d in trend.get_column("day").to_list()],
        "change": round(current / median - 1.0, 4),
    }
    note = f"DAU {current:,.0f} vs trend median {median:,.0f} ({details['change']:+.1%})"
    statistic = abs(math.log(current / median))
    return above(name, DAU_TEST, statistic, baseline, margin, floor, note, details)


def _shares(cms: bytes, ids: np.ndarray) -> np.ndarray:
    total = cms_total_weight(cms)
    if total <= 0:
        return np.zeros(len(ids))
    return cms_estimates(cms, ids) / total


def _items(frame: pl.DataFrame) -> np.ndarray:
    lists = frame.get_column("items").to_list()
    return np.unique(np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]))


def head_distance(
    current: bytes, current_items: np.ndarray, reference: bytes, reference_items: np.ndarray, k: int
) -> tuple[float, list[int], list[int]]:
    """Total variation distance of item shares over the union of both top-``k`` heads,
    and the two heads."""
    head_now = top_items(current, current_items, k).item_ids
    head_ref = top_items(reference, reference_items, k).item_ids
    union = np.union1d(head_now, head_ref)
    distance = 0.5 * float(np.abs(_shares(current, union) - _shares(reference, union)).sum())
    return distance, head_now.tolist(), head_ref.tolist()


def head_check(
    window: pl.DataFrame,
    reference: pl.DataFrame,
    cms_config: SketchConfig,
    k: int,
    margin: float,
    floor: float,
    min_days: int,
) -> Verdict:
    """The window's popularity head against the reference period's (module docstring)."""
    name = "popularity_head"
    if window.height == 0:
        return not_judged(name, HEAD_TEST, "no events in the window")
    if reference.height < min_days:
        return not_judged(
            name, HEAD_TEST, f"{reference.height} reference days with sketches (needs {min_days})"
        )
    ref_sketches = reference.get_column("cms").to_list()
    ref_cms = merge_cms_many(ref_sketches, cms_config)
    ref_items = _items(reference)
    now_cms = merge_cms_many(window.get_column("cms").to_list(), cms_config)
    distance, head_now, head_ref = head_distance(now_cms, _items(window), ref_cms, ref_items, k)
    baseline = []
    for i in range(reference.height):
        rest = reference.filter(pl.int_range(pl.len()) != i)
        day = reference.slice(i, 1)
        baseline.append(
            head_distance(
                day.item(0, "cms"),
                _items(day),
                merge_cms_many(rest.get_column("cms").to_list(), cms_config),
                _items(rest),
                k,
            )[0]
        )
    new = [i for i in head_now if i not in set(head_ref)]
    details = {
        "k": k,
        "head": head_now,
        "reference_head": head_ref,
        "new_in_head": new,
        "reference_days": [str(d) for d in reference.get_column("day").to_list()],
    }
    note = f"{len(new)} of the top {k} items new to the reference's head"
    return above(name, HEAD_TEST, distance, baseline, margin, floor, note, details)
