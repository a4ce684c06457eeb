"""The reference profile's held-out filter and period over a scan: the rows train_ranker held out."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from monitoring.columns import ScanRows
from pipelines.monitor import held_out_rows, reference_period
from pipelines.ranker.encoded import _part_of_rows
from pipelines.ranker.spec_data import split_examples

START = dt.datetime(2026, 1, 1, 6, tzinfo=dt.UTC)
RATIOS = (0.8, 0.1, 0.1)


@pytest.fixture()
def examples(tmp_path: Path) -> tuple[pl.DataFrame, pl.LazyFrame]:
    rng = np.random.default_rng(7)
    frame = pl.DataFrame(
        {
            "ts": [START + dt.timedelta(minutes=int(m)) for m in rng.integers(0, 10 * 1440, 2000)],
            "value": np.arange(2000),
        }
    )
    frame.head(900).write_parquet(tmp_path / "a.parquet")
    frame.tail(1100).write_parquet(tmp_path / "b.parquet")
    return frame, pl.scan_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"])


def test_temporal_held_out_rows_are_split_examples_valid_and_test(
    examples: tuple[pl.DataFrame, pl.LazyFrame],
) -> None:
    frame, scan = examples
    _, valid, test = split_examples(frame, "temporal", RATIOS)
    held = ScanRows.of(scan, held_out_rows(scan, "temporal", RATIOS, 0), by="ts")
    assert held.take(None).equals(pl.concat([valid, test]))


def test_random_held_out_rows_are_the_hash_split_train_ranker_makes(
    examples: tuple[pl.DataFrame, pl.LazyFrame],
) -> None:
    frame, scan = examples
    parts = _part_of_rows(frame, "random", RATIOS, 5, (None, None), 0)
    held = ScanRows.of(scan, held_out_rows(scan, "random", RATIOS, 5))
    assert held.take(None).equals(frame.filter(pl.Series(parts >= 1)))
    assert 0 < held.height < frame.height


def test_the_period_is_the_last_whole_days(examples: tuple[pl.DataFrame, pl.LazyFrame]) -> None:
    _, scan = examples
    log_start = START
    # The held-out part starts mid-day: its partial first day is left out.
    later = scan.filter(pl.col("ts") >= START + dt.timedelta(days=7, hours=3))
    period = reference_period(later, log_start, None)
    assert period is not None
    assert period.start == dt.datetime(2026, 1, 9, tzinfo=dt.UTC)
    assert period.log_age_days == 8.0
    last = later.select(pl.col("ts").max()).collect().item()
    assert period.end == last
    two = reference_period(later, log_start, 2)
    assert two is not None and two.start == dt.datetime(2026, 1, 10, tzinfo=dt.UTC)
    assert reference_period(later.filter(pl.lit(False)), log_start, 2) is None
