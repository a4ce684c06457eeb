"""Point-in-time features: no leakage, and equal to the aggregates at the log's end."""

from __future__ import annotations

import datetime as dt

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.aggregates import CtrPrior, aggregate_events, entity_features
from features.pit import as_of_rows, distinct_counts_at, entity_counters_at, recent_positives_at
from features.schemas import TS_DTYPE
from features.training_frame import build_training_frame, example_rows
from infra.config import FeaturesConfig

START = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
PRIOR = CtrPrior(rate=0.1, strength=4.0)
CONFIG = FeaturesConfig(windows_days=(1, 3), history_length=3)


@st.composite
def event_logs(draw: st.DrawFn) -> pl.DataFrame:
    """Small logs with many ties in ts (slates) and events around midnight."""
    n = draw(st.integers(1, 40))
    # Hours on a coarse grid over 6 days: ties are common, as in real slates.
    hours = draw(st.lists(st.integers(0, 6 * 24 - 1), min_size=n, max_size=n))
    return pl.DataFrame(
        {
            "user_id": draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)),
            "item_id": draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)),
            "ts": [START + dt.timedelta(hours=h) for h in hours],
            "event_type": draw(
                st.lists(st.sampled_from(["impression", "click", "rating"]), min_size=n, max_size=n)
            ),
            "label": draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n)),
            "value": [None] * n,
        },
        schema_overrides={"ts": TS_DTYPE, "value": pl.Float64},
    )


def _brute_force(
    events: pl.DataFrame, user: int, t: dt.datetime, windows: tuple[int, ...]
) -> dict[str, object]:
    """Features of one (user, t) straight from the definition: a filter on ts < t."""
    seen = events.with_row_index("order").filter((pl.col("user_id") == user) & (pl.col("ts") < t))
    impression = pl.col("event_type") == "impression"
    positive = pl.col("label") > 0
    click = (impression & positive) | (pl.col("event_type") == "click")
    out: dict[str, object] = {}
    for w in windows:
        first_day = t.date() - dt.timedelta(days=w - 1)
        in_window = seen.filter(pl.col("ts").dt.date() >= first_day)
        out[f"events_{w}d"] = in_window.height
        out[f"clicks_{w}d"] = in_window.filter(click).height
    out["events_total"] = seen.height
    out["impressions_total"] = seen.filter(impression).height
    out["clicks_total"] = seen.filter(click).height
    out["distinct"] = seen.get_column("item_id").n_unique()
    positives = seen.filter(positive).sort("ts", "order")
    out["history"] = positives.get_column("item_id").tail(CONFIG.history_length).to_list()
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=event_logs())
def test_rows_see_only_events_strictly_before_them(events: pl.DataFrame) -> None:
    rows = events.select("user_id", "item_id", "ts").with_row_index("_row")
    counters = entity_counters_at(rows, events.lazy(), "user", CONFIG.windows_days, PRIOR)
    history = recent_positives_at(rows, events.lazy(), CONFIG.history_length)
    distinct = distinct_counts_at(rows, events.lazy(), "user_id", "item_id")
    got = (
        rows.join(counters, on="_row")
        .join(history, on="_row")
        .join(distinct, on="_row")
        .sort("_row")
    )
    for row in got.iter_rows(named=True):
        expected = _brute_force(events, row["user_id"], row["ts"], CONFIG.windows_days)
        for name, value in expected.items():
            assert row[name] == value, (name, row, expected)


@settings(max_examples=30, deadline=None)
@given(events=event_logs(), future=event_logs())
def test_appending_later_events_changes_no_earlier_row(
    events: pl.DataFrame, future: pl.DataFrame
) -> None:
    """Leakage is the future reaching the past: shifting extra events after every row changes nothing."""
    later = future.with_columns(pl.col("ts") + pl.duration(days=30))
    rows = events.select("user_id", "item_id", "ts")
    users = pl.DataFrame({"user_id": [0, 1, 2]})
    items = pl.DataFrame({"item_id": [0, 1, 2, 3, 4], "category": [0, 0, 1, 1, 2]})
    before = build_training_frame(rows, events.lazy(), users, items, CONFIG, PRIOR)
    after = build_training_frame(
        rows, pl.concat([events, later]).lazy(), users, items, CONFIG, PRIOR
    )
    assert before.equals(after)


@settings(max_examples=30, deadline=None)
@given(events=event_logs())
def test_at_the_end_of_the_log_pit_equals_the_day_bucket_aggregates(events: pl.DataFrame) -> None:
    t_end = events.get_column("ts").max() + dt.timedelta(seconds=1)  # type: ignore[operator]
    for entity, key in (("user", "user_id"), ("item", "item_id")):
        batch = entity_features(aggregate_events(events, entity), t_end, CONFIG.windows_days, PRIOR)
        rows = as_of_rows(batch.get_column(key), t_end, key)
        pit = rows.join(
            entity_counters_at(rows, events.lazy(), entity, CONFIG.windows_days, PRIOR), on="_row"
        )
        assert pit.drop("_row", "ts").sort(key).equals(batch)


def test_a_slate_does_not_see_its_own_clicks() -> None:
    """Two impressions shown together (same ts), one clicked: neither row counts that click."""
    events = pl.DataFrame(
        {
            "user_id": [0, 0, 0],
            "item_id": [1, 2, 3],
            "ts": [START, START + dt.timedelta(minutes=5), START + dt.timedelta(minutes=5)],
            "event_type": ["impression"] * 3,
            "label": [1.0, 1.0, 0.0],
            "value": [None, None, None],
        },
        schema_overrides={"ts": TS_DTYPE, "value": pl.Float64},
    )
    rows = events.select("user_id", "item_id", "ts").with_row_index("_row")
    got = rows.join(entity_counters_at(rows, events.lazy(), "user", (1,), PRIOR), on="_row").sort(
        "_row"
    )
    assert got.get_column("clicks_total").to_list() == [0, 1, 1]
    assert got.get_column("impressions_total").to_list() == [0, 1, 1]
    # Smoothed CTR of the second slate: (1 click + 4 * 0.1) / (1 impression + 4).
    assert got.get_column("ctr_smoothed")[1] == (1 + 0.4) / (1 + 4)


def test_example_rows_carry_the_rating_of_their_own_slate() -> None:
    """A rating answers the impression of the same user, item and request, and nothing else."""
    minute = dt.timedelta(minutes=1)
    events = pl.DataFrame(
        {
            "user_id": [0, 0, 0, 0, 1],
            "item_id": [1, 2, 1, 1, 1],
            "ts": [START, START, START + minute, START + 2 * minute, START + 3 * minute],
            "event_type": ["impression", "impression", "rating", "impression", "rating"],
            "label": [1.0, 0.0, 1.0, 0.0, 0.0],
            "value": [None, None, 4.0, None, 2.0],
            "request_id": [7, 7, 7, 8, 7],
        },
        schema_overrides={"ts": TS_DTYPE, "value": pl.Float64},
    )
    rows = example_rows(events.lazy()).collect()
    assert rows.get_column("event_type").to_list() == ["impression"] * 3
    # Item 1 of slate 7 was rated 4; item 2 of it was not; slate 8 is another showing;
    # user 1's rating of slate 7 is someone else's.
    assert rows.get_column("rating").to_list() == [4.0, None, None]


def test_rating_logs_rate_their_own_rows() -> None:
    events = pl.DataFrame(
        {
            "user_id": [0, 1],
            "item_id": [1, 1],
            "ts": [START, START],
            "event_type": ["rating", "rating"],
            "label": [1.0, 0.0],
            "value": [5.0, 2.0],
        },
        schema_overrides={"ts": TS_DTYPE},
    )
    assert example_rows(events.lazy()).collect().get_column("rating").to_list() == [5.0, 2.0]
    # A log without values still gets the column, empty.
    bare = example_rows(events.drop("value").lazy()).collect()
    assert bare.get_column("rating").null_count() == 2
