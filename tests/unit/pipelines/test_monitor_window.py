"""Which rows a monitoring window holds: [end - days, end), end at midnight UTC by default."""

from __future__ import annotations

import datetime as dt

import pytest

from monitoring.alerts import Window
from pipelines.monitor import window_bounds, window_key

UTC = dt.UTC


def test_default_end_is_the_midnight_after_the_newest_row() -> None:
    window = window_bounds(dt.datetime(2026, 1, 5, 17, 30, tzinfo=UTC), None, 1)
    assert window.start == dt.datetime(2026, 1, 5, tzinfo=UTC)
    assert window.end == dt.datetime(2026, 1, 6, tzinfo=UTC)
    # A row at midnight exactly opens a new day: it is the newest day's first row.
    window = window_bounds(dt.datetime(2026, 1, 6, tzinfo=UTC), None, 2)
    assert (window.start, window.end) == (
        dt.datetime(2026, 1, 5, tzinfo=UTC),
        dt.datetime(2026, 1, 7, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    "end",
    [dt.date(2026, 1, 6), dt.datetime(2026, 1, 6), dt.datetime(2026, 1, 6, tzinfo=UTC)],
)
def test_a_given_end_is_utc_and_a_date_means_its_midnight(end: dt.date | dt.datetime) -> None:
    window = window_bounds(dt.datetime(2030, 1, 1, tzinfo=UTC), end, 3)
    assert window.end == dt.datetime(2026, 1, 6, tzinfo=UTC)
    assert window.start == dt.datetime(2026, 1, 3, tzinfo=UTC)


def test_window_key_is_a_folder_name() -> None:
    window = Window(
        start=dt.datetime(2026, 1, 5, tzinfo=UTC), end=dt.datetime(2026, 1, 6, tzinfo=UTC)
    )
    assert window_key(window) == "20260105T0000-20260106T0000"
