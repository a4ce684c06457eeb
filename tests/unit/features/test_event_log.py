"""The event log: date partitions, atomic commit, abort, crash debris, contract checks, ranges."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features.event_log import COMMIT_MARKER, STAGING, EventLog
from features.schemas import EVENTS
from infra.errors import ConfigError, DataValidationError

T0 = dt.datetime(2026, 1, 2, 23, 59, 58, 123456, tzinfo=dt.UTC)


def events(seconds: list[float], user: int = 1) -> pl.DataFrame:
    """One click per offset (seconds after ``T0``), items 10, 11, ... in order."""
    n = len(seconds)
    return pl.DataFrame(
        {
            "user_id": [user] * n,
            "item_id": list(range(10, 10 + n)),
            "ts": [T0 + dt.timedelta(seconds=s) for s in seconds],
            "event_type": ["click"] * n,
            "label": [1.0] * n,
            "position": [None] * n,
            "request_id": [7] * n,
            "propensity": [None] * n,
            "value": [None] * n,
        },
        schema=EVENTS.polars_schema,
    )


def test_a_batch_across_midnight_gives_one_part_per_utc_date(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    batch = events([0.0, 1.0, 2.0, 3.0])  # 23:59:58, :59, then 00:00:00, :01 next day
    parts = log.append(batch)
    assert [p.parent.name for p in parts] == ["date=2026-01-02", "date=2026-01-03"]
    assert parts[0].name == parts[1].name  # one batch, one name
    assert parts[0].name.startswith("part-") and parts[0].name.endswith(".parquet")
    assert [pl.read_parquet(p).height for p in parts] == [2, 2]
    assert log.dates() == [dt.date(2026, 1, 2), dt.date(2026, 1, 3)]
    assert_frame_equal(log.read(), batch)
    assert not any((tmp_path / STAGING).iterdir())


def test_staged_parts_are_invisible_until_commit(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.append(events([-10.0]))
    staged = log.stage(events([0.0, 5.0], user=2))
    assert all(source.is_file() for source, _ in staged.parts)
    assert not any(target.exists() for target in staged.targets)
    assert log.read().get_column("user_id").to_list() == [1]
    assert log.dates() == [dt.date(2026, 1, 2)]
    assert staged.commit() == staged.targets
    assert log.read().get_column("user_id").to_list() == [1, 2, 2]
    assert log.dates() == [dt.date(2026, 1, 2), dt.date(2026, 1, 3)]
    with pytest.raises(RuntimeError, match="committed"):
        staged.commit()
    with pytest.raises(RuntimeError, match="committed"):
        staged.abort()


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    staged = log.stage(events([0.0, 5.0]))
    staged.abort()
    staged.abort()  # idempotent
    assert log.read().height == 0 and log.dates() == []
    assert not any((tmp_path / STAGING).iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == [STAGING]
    with pytest.raises(RuntimeError, match="aborted"):
        staged.commit()


def test_read_range_and_the_empty_log(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "log")
    empty = log.read()
    assert empty.height == 0 and empty.schema == EVENTS.polars_schema
    assert log.dates() == [] and log.parts() == []
    for day in range(4):  # one event per day, 2026-01-03 .. 2026-01-06
        log.append(events([3.0 + 86_400 * day], user=day))
    jan = [dt.date(2026, 1, d) for d in (3, 4, 5, 6)]
    assert log.dates() == jan
    assert log.read(jan[1], jan[2]).get_column("user_id").to_list() == [1, 2]
    assert log.read(start=jan[2]).get_column("user_id").to_list() == [2, 3]
    assert log.read(end=jan[0]).get_column("user_id").to_list() == [0]
    none = log.read(dt.date(2025, 1, 1), dt.date(2025, 12, 31))
    assert none.height == 0 and none.schema == EVENTS.polars_schema
    assert log.read().schema == EVENTS.polars_schema


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.drop("label"), r"column 'label' is missing"),
        (lambda f: f.drop("propensity"), r"column 'propensity' is missing"),
        (lambda f: f.with_columns(pl.col("position").cast(pl.Int64)), r"column 'position'.*Int64"),
        (lambda f: f.with_columns(pl.col("ts").dt.replace_time_zone(None)), r"column 'ts'"),
        (lambda f: f.with_columns(pl.lit(1).alias("extra")), r"unexpected column.*'extra'"),
        (lambda f: f.with_columns(pl.lit(-1, pl.Int64).alias("user_id")), r"user_id: below 0"),
        (lambda f: f.with_columns(pl.lit("like").alias("event_type")), r"event_type: not one"),
        (lambda f: f.with_columns(pl.lit(None, pl.Int64).alias("item_id")), r"item_id: null"),
    ],
)
def test_a_frame_off_the_contract_is_refused_naming_the_column(
    tmp_path: Path, change, message: str
) -> None:
    log = EventLog(tmp_path)
    with pytest.raises(DataValidationError, match=message):
        log.stage(change(events([0.0, 1.0])))
    assert log.dates() == [] and not (tmp_path / STAGING).exists()


def test_columns_in_any_order_are_stored_in_contract_order(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    batch = events([0.0])
    log.append(batch.select(reversed(batch.columns)))
    assert_frame_equal(log.read(), batch)


def test_clean_staging_completes_begun_commits_and_drops_stale_batches(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    # A crash half-way through a commit: marker written, first part moved, second not.
    begun = log.stage(events([0.0, 3.0], user=1))
    (begun.folder / COMMIT_MARKER).touch()
    first_source, first_target = begun.parts[0]
    first_target.parent.mkdir(parents=True)
    os.replace(first_source, first_target)
    # A crash before the commit, long ago; and a batch staged just now (in flight).
    stale = log.stage(events([1.0], user=2))
    old = stale.folder.stat().st_mtime - 7_200
    os.utime(stale.folder, (old, old))
    fresh = log.stage(events([1.0], user=3))
    assert log.read().get_column("user_id").to_list() == [1]
    assert log.clean_staging() == {"completed": 1, "deleted": 1}
    assert sorted(log.read().get_column("user_id").to_list()) == [1, 1]
    assert not begun.folder.exists() and not stale.folder.exists()
    assert fresh.folder.exists()
    fresh.commit()
    assert sorted(log.read().get_column("user_id").to_list()) == [1, 1, 3]


def test_empty_batch_and_object_store_roots(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    assert log.append(events([]).head(0)) == []
    assert log.dates() == []
    with pytest.raises(ConfigError, match="only local folders"):
        EventLog("s3://bucket/events")
