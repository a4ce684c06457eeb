"""ScanRows: the rows of a scan that match a filter, sampled and read back by position."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl

from monitoring.columns import ScanRows, sample_positions, sample_rows

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _table(tmp_path: Path, n: int = 600) -> tuple[pl.DataFrame, pl.LazyFrame]:
    """Two Parquet files of rows with tied hours, as a scan and as the frame they hold."""
    rng = np.random.default_rng(4)
    frame = pl.DataFrame(
        {
            "ts": [START + dt.timedelta(hours=int(h)) for h in rng.integers(0, 72, n)],
            "request_id": rng.integers(0, 40, n),
            "value": np.arange(n),
        }
    )
    frame.head(n // 2).write_parquet(tmp_path / "a.parquet")
    frame.tail(n - n // 2).write_parquet(tmp_path / "b.parquet")
    return frame, pl.scan_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"])


def test_a_sample_is_the_one_sample_rows_draws_from_the_collected_rows(tmp_path: Path) -> None:
    frame, scan = _table(tmp_path)
    later = pl.col("ts") >= START + dt.timedelta(days=1)
    # Sorted by time (ties in table order), as split_examples orders the held-out part.
    by_time = frame.filter(later).sort("ts", maintain_order=True)
    rows = ScanRows.of(scan, later, by="ts")
    assert rows.height == by_time.height
    assert rows.columns == frame.columns
    assert rows.take(None).equals(by_time)
    assert rows.sample(50, [3, 1]).equals(sample_rows(by_time, 50, [3, 1]))
    # In table order, and with fewer rows than asked: all of them.
    assert ScanRows.of(scan, later).sample(40, 0).equals(sample_rows(frame.filter(later), 40, 0))
    assert ScanRows.of(scan, later).sample(10_000, 0).equals(frame.filter(later))


def test_first_of_keeps_the_first_row_of_each_key_in_order(tmp_path: Path) -> None:
    frame, scan = _table(tmp_path)
    ordered = frame.sort("ts", maintain_order=True)
    firsts = ordered.filter(pl.int_range(pl.len()).over("request_id") == 0)
    rows = ScanRows.of(scan, pl.lit(True), by="ts").first_of(["request_id"])
    assert rows.take(None).equals(firsts)
    assert rows.sample(7, 2).equals(sample_rows(firsts, 7, 2))


def test_sample_positions_by_hand() -> None:
    assert sample_positions(5, 5, 0) is None
    picked = sample_positions(100, 10, 1)
    assert picked is not None and picked.size == 10 and np.all(np.diff(picked) > 0)
    assert np.array_equal(picked, sample_positions(100, 10, 1))  # type: ignore[arg-type]
