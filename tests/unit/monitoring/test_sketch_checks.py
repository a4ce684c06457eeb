"""Sketch checks: DAU (HLL) against its trend, the popularity head (Count-Min) against the reference."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl

from infra.config import SketchConfig
from infra.storage import StoragePath
from monitoring.sketch_checks import (
    dau_check,
    day_sketches,
    head_check,
    load_sketches,
    save_sketches,
)

SKETCHES = SketchConfig(cms_epsilon=1e-3)
START = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def _events(
    days: range, users: int, rng: np.random.Generator, boosted: np.ndarray | None = None
) -> pl.DataFrame:
    """3,000 item events a day from ``users`` users; Zipf items over 500, optionally with
    ``boosted`` items taking 30% of the traffic."""
    frames = []
    weights = 1.0 / np.arange(1, 501)
    weights /= weights.sum()
    for day in days:
        n = 3_000
        items = rng.choice(500, size=n, p=weights)
        if boosted is not None:
            swap = rng.random(n) < 0.3
            items[swap] = rng.choice(boosted, size=int(swap.sum()))
        frames.append(
            pl.DataFrame(
                {
                    "user_id": rng.integers(0, users, n),
                    "item_id": items.astype(np.int64),
                    "ts": [
                        START + dt.timedelta(days=day, seconds=int(s))
                        for s in rng.integers(0, 86_400, n)
                    ],
                }
            )
        )
    return pl.concat(frames)


def test_day_sketches_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frame = day_sketches(_events(range(3), 800, rng), SKETCHES)
    assert frame.height == 3 and frame.get_column("total_weight").to_list() == [3000.0] * 3
    # ~3000 draws from 800 users leave ~780 active: HLL within a few percent.
    assert all(700 < d < 850 for d in frame.get_column("dau").to_list())
    save_sketches(frame, StoragePath.from_uri(str(tmp_path)))
    loaded = load_sketches(StoragePath.from_uri(str(tmp_path)))
    assert loaded is not None and loaded.equals(frame)
    assert load_sketches(StoragePath.from_uri(str(tmp_path / "none"))) is None


def test_dau_flags_a_jump_not_the_trend_days_noise() -> None:
    rng = np.random.default_rng(1)
    trend = day_sketches(_events(range(10), 800, rng), SKETCHES)
    same = day_sketches(_events(range(10, 11), 800, rng), SKETCHES)
    more = day_sketches(_events(range(10, 11), 2_000, rng), SKETCHES)
    quiet = dau_check(same, trend, margin=1.5, floor=0.1, min_days=3)
    assert quiet.judged and not quiet.drifted and quiet.statistic < quiet.threshold
    jump = dau_check(more, trend, margin=1.5, floor=0.1, min_days=3)
    assert jump.drifted and jump.details["change"] > 0.5
    short = dau_check(same, trend.head(2), margin=1.5, floor=0.1, min_days=3)
    assert not short.judged and "2 trend days" in short.reason


def test_popularity_head_flags_a_shock_and_names_the_new_items() -> None:
    rng = np.random.default_rng(2)
    reference = day_sketches(_events(range(5), 800, rng), SKETCHES)
    calm = day_sketches(_events(range(5, 6), 800, rng), SKETCHES)
    boosted = np.arange(400, 410)
    shocked = day_sketches(_events(range(5, 6), 800, rng, boosted), SKETCHES)
    quiet = head_check(calm, reference, SKETCHES, k=20, margin=1.5, floor=0.05, min_days=3)
    assert quiet.judged and not quiet.drifted
    shock = head_check(shocked, reference, SKETCHES, k=20, margin=1.5, floor=0.05, min_days=3)
    assert shock.drifted and shock.statistic > 2 * shock.threshold
    assert set(boosted) <= set(shock.details["new_in_head"])
    assert not head_check(calm.clear(), reference, SKETCHES, 20, 1.5, 0.05, 3).judged
