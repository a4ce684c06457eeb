"""The two-stage step's held-out protocol on hand-made logs: requests, judged items, exclusions."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl

from pipelines.steps.retrieval import positives
from pipelines.steps.two_stage import held_out_requests, top_k_overlap, user_histories

DAY1 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
START = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)


def _at(hour: int, minute: int = 0, day: dt.datetime = START) -> dt.datetime:
    return day + dt.timedelta(hours=hour, minutes=minute)


def _events(rows: list[tuple[int, int, dt.datetime, str, float]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "ts": pl.Datetime("us", "UTC"),
            "event_type": pl.String,
            "label": pl.Float64,
        },
        orient="row",
    )


def _pairs(rows: list[tuple[int, int, dt.datetime]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "ts": pl.Datetime("us", "UTC")},
        orient="row",
    )


def _items(late: dict[int, dt.datetime]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": np.arange(10, dtype=np.int64),
            "first_seen": [late.get(i, DAY1) for i in range(10)],
        },
        schema={"item_id": pl.Int64, "first_seen": pl.Datetime("us", "UTC")},
    )


def test_click_log_requests_judge_only_what_retrieval_did_not_learn_from_the_future() -> None:
    events = _events(
        [
            (1, 5, _at(10, day=DAY1), "impression", 1.0),  # before the period: history
            (1, 5, _at(8), "impression", 1.0),  # a re-click: judged
            (1, 6, _at(8), "impression", 0.0),
            (1, 7, _at(9), "impression", 1.0),  # retrieval trained on it (below): not judged
            (2, 8, _at(12), "impression", 0.0),  # no click in the period: no request
            (3, 9, _at(7), "impression", 1.0),  # trained on at the request time: not judged
            (3, 4, _at(7, 30), "impression", 1.0),
        ]
    )
    # The two-tower's train/valid positives: (1, 5) before user 1's request stays judged.
    trained = _pairs([(1, 5, _at(10, day=DAY1)), (1, 7, _at(9)), (3, 9, _at(7))])
    # Item 3 appears at 07:45: after user 3's request (07:00), before user 1's (08:00).
    items = _items({3: _at(7, 45)})
    held = held_out_requests(events, positives(events.lazy()), trained, items, START)

    assert held.requests.get_column("user_id").to_list() == [1, 3]
    assert held.requests.get_column("ts").to_list() == [_at(8), _at(7)]
    assert held.eligible == 2
    assert [held.clicked.items_of(r).tolist() for r in range(2)] == [[5], [4]]
    assert [sorted(e.tolist()) for e in held.exclude] == [[7], [3, 9]]
    assert held.shown is not None
    assert [sorted(held.shown.items_of(r).tolist()) for r in range(2)] == [[5, 6, 7], [4, 9]]

    # At most max_requests, drawn reproducibly from the eligible users.
    one = held_out_requests(events, positives(events.lazy()), trained, items, START, 1, seed=3)
    again = held_out_requests(events, positives(events.lazy()), trained, items, START, 1, seed=3)
    assert one.requests.height == 1 and one.eligible == 2
    assert one.requests.equals(again.requests)


def test_rating_log_requests_start_at_the_first_rating_and_show_nothing() -> None:
    # A rating log (MovieLens): no impressions; every rating is an example row.
    events = _events(
        [
            (1, 2, _at(1), "rating", 0.0),  # the request: the first rating in the period
            (1, 3, _at(2), "rating", 1.0),
            (2, 4, _at(3), "rating", 1.0),  # the request's own positive is judged
        ]
    )
    items = pl.DataFrame({"item_id": np.arange(5, dtype=np.int64)})
    held = held_out_requests(events, positives(events.lazy()), _pairs([]), items, START)
    assert held.requests.get_column("user_id").to_list() == [1, 2]
    assert held.requests.get_column("ts").to_list() == [_at(1), _at(3)]
    assert [held.clicked.items_of(r).tolist() for r in range(2)] == [[3], [4]]
    assert held.shown is None
    assert all(e.size == 0 for e in held.exclude)


def test_top_k_overlap_by_hand() -> None:
    baseline = np.array([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    assert top_k_overlap(baseline, baseline, 2) == 1.0
    reversed_order = baseline[:, ::-1].copy()
    assert top_k_overlap(reversed_order, baseline, 2) == 0.0
    # Row 0 keeps one of the two, row 1 both (in another order): (1/2 + 2/2) / 2.
    mixed = np.array([[4.0, 0.0, 5.0, 1.0], [3.0, 4.0, 2.0, 1.0]])
    assert top_k_overlap(mixed, baseline, 2) == 0.75


def test_histories_are_the_positives_before_each_request_most_recent_last() -> None:
    events = _events(
        [
            (1, 4, _at(1), "impression", 1.0),
            (1, 5, _at(2), "impression", 0.0),  # not a positive
            (1, 6, _at(3), "impression", 1.0),
            (1, 7, _at(4), "impression", 1.0),  # the request's own time: not before it
            (3, 2, _at(1), "impression", 1.0),
            (3, 8, _at(2), "impression", 1.0),  # unknown to a model of 8 items: left out
        ]
    )
    requests = pl.DataFrame(
        {"user_id": [3, 1], "ts": [_at(5), _at(4)]},
        schema={"user_id": pl.Int64, "ts": pl.Datetime("us", "UTC")},
    )
    history, users = user_histories(events.lazy(), requests, length=3, n_items=8)
    assert users.tolist() == [3, 1]
    # Rows by user id, item embedding rows (id + 1), 0 pads the end; user 2 has none.
    assert history.tolist() == [[0, 0, 0], [5, 7, 0], [0, 0, 0], [3, 0, 0]]


def test_scans_and_the_period_positives_give_the_same_requests() -> None:
    """The step hands held_out_requests scans and only the period's positives (and trained
    pairs): the same requests, judged items and exclusions as the whole frames give."""
    events = _events(
        [
            (1, 5, _at(10, day=DAY1), "impression", 1.0),
            (1, 5, _at(8), "impression", 1.0),
            (1, 6, _at(8), "impression", 0.0),
            (1, 7, _at(9), "impression", 1.0),
            (2, 3, _at(9, day=DAY1), "impression", 1.0),
            (2, 8, _at(12), "impression", 1.0),
            (3, 9, _at(7), "impression", 1.0),
            (3, 4, _at(7, 30), "impression", 1.0),
        ]
    )
    items = _items({3: _at(7, 45)})
    clicks = positives(events.lazy())
    trained = _pairs([(1, 5, _at(10, day=DAY1)), (1, 7, _at(9)), (2, 3, _at(9, day=DAY1))])
    whole = held_out_requests(events, clicks, trained, items, START)
    period = held_out_requests(
        events.lazy(),
        clicks.filter(pl.col("ts") >= START).lazy(),
        trained.filter(pl.col("ts") >= START).lazy(),
        items,
        START,
    )
    assert period.requests.equals(whole.requests) and period.eligible == whole.eligible == 3
    rows = range(whole.requests.height)
    for got, want in ((period.clicked, whole.clicked), (period.shown, whole.shown)):
        assert got is not None and want is not None
        assert [got.items_of(r).tolist() for r in rows] == [want.items_of(r).tolist() for r in rows]
    assert [sorted(e.tolist()) for e in period.exclude] == [
        sorted(e.tolist()) for e in whole.exclude
    ]
