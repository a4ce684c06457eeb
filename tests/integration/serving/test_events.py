"""The ingest of ``POST /v1/events`` against a real SQLite online store and event log.

The store is materialized from the tiny simulator's log as the ``materialize``
step would (buckets, histories, sketches, the log's prior) at the log's end;
the ingest's clock is an hour later. No Ray, no models.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError

from features.aggregates import aggregate_events, global_prior
from features.event_log import STAGING, EventLog
from features.online_store import OnlineStore, OnlineStoreError, make_online_store
from features.schemas import EVENTS
from features.simulator import ClickLogSimulator
from features.sketches import build_sketch_tables
from infra.config import FeaturesConfig, load_config
from serving.events import (
    EventBatch,
    EventIngest,
    EventsAccepted,
    events_frame,
    request_id_code,
)
from serving.recommender import RequestError

MAX_EVENTS = 500


@pytest.fixture(scope="module")
def log_events() -> pl.DataFrame:
    config = load_config("tiny", environ={})
    return pl.concat(list(ClickLogSimulator(config.simulator).iter_event_chunks()))


@pytest.fixture(scope="module")
def features_config() -> FeaturesConfig:
    return load_config("tiny", environ={}).features


def end_time(events: pl.DataFrame) -> dt.datetime:
    return events.get_column("ts").max() + dt.timedelta(seconds=1)


def materialized_store(workdir: Path, events: pl.DataFrame, config: FeaturesConfig) -> OnlineStore:
    store = make_online_store(config, workdir)
    histories = (
        events.with_row_index("_order")
        .filter(pl.col("label").fill_null(0.0) > 0)
        .sort("ts", "_order")
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").tail(config.history_length).alias("history"))
    )
    store.materialize(
        aggregate_events(events, "user"),
        aggregate_events(events, "item"),
        histories,
        global_prior(events, config.ctr_prior_strength),
        end_time(events),
        sketches=build_sketch_tables(events.select("user_id", "item_id", "ts"), config.sketches),
    )
    return store


@pytest.fixture()
def setup(tmp_path: Path, log_events: pl.DataFrame, features_config: FeaturesConfig):
    store = materialized_store(tmp_path / "wd", log_events, features_config)
    log = EventLog(tmp_path / "wd" / "event_log")
    now = end_time(log_events) + dt.timedelta(hours=1)
    yield EventIngest(store, log, clock=lambda: now), store, log, now
    store.close()


def batch(*events: dict) -> EventBatch:
    return EventBatch.model_validate({"events": list(events)})


def test_a_click_batch_updates_the_users_features_and_lands_in_the_log(
    setup, log_events: pl.DataFrame
) -> None:
    ingest, store, log, now = setup
    user = int(log_events.get_column("user_id")[0])
    items = log_events.get_column("item_id").unique().sort().head(3).to_list()
    before = store.read_user(user)
    assert before.found
    clicks = batch(
        {"user_id": user, "item_id": items[0], "event_type": "click"},  # ts: receive time
        {
            "user_id": user,
            "item_id": items[1],
            "event_type": "click",
            "ts": (now - dt.timedelta(minutes=1)).astimezone(dt.timezone(dt.timedelta(hours=2))),
        },
        {"user_id": user, "item_id": items[2], "event_type": "click", "request_id": "ab12"},
    )
    answer = ingest.ingest(clicks, MAX_EVENTS)
    assert isinstance(answer, EventsAccepted)
    assert answer.accepted == 3 and not answer.degraded
    assert answer.entities_updated == 1 + 3  # the user and three items
    assert [Path(p).parent.name for p in answer.event_log_parts] == [f"date={now.date()}"]

    after = store.read_user(user)
    # The vector moved on to the receive time, an hour into the day after the log:
    # the 1-day window holds the batch alone, the longer ones the whole 5-day log too.
    assert store.windows_days == (1, 7, 30) and now.date() > before.features_as_of.date()
    assert after.values["clicks_1d"] == 3
    assert after.values["clicks_7d"] == before.values["clicks_7d"] + 3
    assert after.values["clicks_30d"] == before.values["clicks_30d"] + 3
    assert after.values["clicks_total"] == before.values["clicks_total"] + 3
    assert after.values["positives_total"] == before.values["positives_total"] + 3
    # Most recent last, by ts: the one a minute back, then the two at receive time.
    assert after.history[-3:] == [items[1], items[0], items[2]]
    assert after.features_as_of == now + dt.timedelta(microseconds=1)

    logged = log.read()
    assert logged.schema == EVENTS.polars_schema
    assert logged.get_column("item_id").to_list() == items
    assert logged.get_column("ts").to_list() == [now, now - dt.timedelta(minutes=1), now]
    assert logged.get_column("label").to_list() == [1.0, 1.0, 1.0]
    assert logged.get_column("request_id").to_list() == [None, None, request_id_code("ab12")]
    assert not any((log.root / STAGING).iterdir())


def test_labels_follow_the_event_type_and_a_slate_keeps_one_request_id(setup) -> None:
    ingest, _, log, _ = setup
    rid = "9f1c2d3e4b5a69788796a5b4c3d2e1f0"  # a recommendation answer's request_id
    ingest.ingest(
        batch(
            {"user_id": 3, "item_id": 5, "event_type": "impression", "position": 0,
             "request_id": rid, "propensity": 0.25},
            {"user_id": 3, "item_id": 6, "event_type": "impression", "position": 1,
             "request_id": rid, "propensity": 0.75, "label": 1},
            {"user_id": 3, "item_id": 5, "event_type": "rating", "value": 4.0, "request_id": rid},
            {"user_id": 3, "item_id": 6, "event_type": "rating", "value": 3.5, "request_id": "42"},
            {"user_id": 3, "item_id": 7, "event_type": "purchase", "value": 9.99},
            {"user_id": 3, "item_id": 8, "event_type": "view"},
        ),
        MAX_EVENTS,
    )  # fmt: skip
    logged = log.read()
    assert logged.get_column("label").to_list() == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    code = request_id_code(rid)
    assert 0 <= code < 2**63
    assert logged.get_column("request_id").to_list()[:4] == [code, code, code, 42]
    assert logged.get_column("position").to_list() == [0, 1, None, None, None, None]
    assert logged.get_column("propensity").to_list()[:3] == [0.25, 0.75, None]


def test_unknown_ids_become_new_store_entities(setup, log_events: pl.DataFrame) -> None:
    ingest, store, log, _ = setup
    new_user = int(log_events.get_column("user_id").max()) + 1_000
    new_item = int(log_events.get_column("item_id").max()) + 1_000
    assert not store.read_user(new_user).found and not store.read_item(new_item).found
    ingest.ingest(batch({"user_id": new_user, "item_id": new_item, "event_type": "click"}), 10)
    user, item = store.read_user(new_user), store.read_item(new_item)
    assert user.found and user.values["clicks_total"] == 1 and user.history == [new_item]
    assert item.found and item.values["events_total"] == 1
    assert log.read().get_column("user_id").to_list() == [new_user]


def test_a_store_failure_leaves_the_log_without_the_batch(
    tmp_path: Path, features_config: FeaturesConfig
) -> None:
    store = make_online_store(features_config, tmp_path)  # never materialized: no prior
    log = EventLog(tmp_path / "event_log")
    ingest = EventIngest(store, log, clock=lambda: dt.datetime(2026, 1, 2, tzinfo=dt.UTC))
    with pytest.raises(OnlineStoreError, match="no prior"):
        ingest.ingest(batch({"user_id": 1, "item_id": 2, "event_type": "click"}), MAX_EVENTS)
    assert log.read().height == 0 and log.dates() == []
    assert not any((log.root / STAGING).iterdir())
    assert store.entity_count("user") == store.entity_count("item") == 0
    store.close()


def test_bounds_are_refused_before_anything_is_written(setup) -> None:
    ingest, store, log, now = setup
    click = {"user_id": 1, "item_id": 2, "event_type": "click"}
    before = store.read_user(1)
    with pytest.raises(RequestError, match=r"at most 2 events.*max_events_per_batch"):
        ingest.ingest(batch(click, click, click), 2)
    future = {**click, "ts": (now + dt.timedelta(hours=1)).isoformat()}
    with pytest.raises(RequestError, match=r"events\[1\]\.ts .* after the server's time"):
        ingest.ingest(batch(click, future), MAX_EVENTS)
    with pytest.raises(RequestError, match="before 1990"):
        ingest.ingest(batch({**click, "ts": "1970-01-01T00:00:00Z"}), MAX_EVENTS)
    assert log.dates() == []
    assert store.read_user(1) == before


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ({"ts": "2026-01-02T12:00:00"}, "ts must carry a timezone"),
        ({"user_id": -1}, "greater than or equal to 0"),
        ({"event_type": "like"}, "'impression', 'click'"),
        ({"label": 2}, "0 or 1"),
        ({"propensity": 0.0}, "greater than 0"),
        ({"request_id": "x" * 65}, "at most 64 characters"),
        ({"event_type": "rating"}, "a rating needs its value"),
        ({"colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_malformed_events_are_refused_by_the_model(event: dict, message: str) -> None:
    body = {"events": [{"user_id": 1, "item_id": 2, "event_type": "click", **event}]}
    with pytest.raises(ValidationError, match=message):
        EventBatch.model_validate(body)
    with pytest.raises(ValidationError, match="at least 1 item"):
        EventBatch.model_validate({"events": []})


def test_the_frame_is_canonical_in_utc_microseconds() -> None:
    received = dt.datetime(2026, 1, 2, 12, 0, 0, 123456, tzinfo=dt.UTC)
    parsed = EventBatch.model_validate_json(
        '{"events": [{"user_id": 1, "item_id": 2, "event_type": "click",'
        ' "ts": "2026-01-02T13:30:00.000001+01:00"}, {"user_id": 1, "item_id": 3,'
        ' "event_type": "impression"}]}'
    )
    frame = events_frame(parsed.events, received)
    assert frame.schema == EVENTS.polars_schema
    assert frame.get_column("ts").to_list() == [
        dt.datetime(2026, 1, 2, 12, 30, 0, 1, tzinfo=dt.UTC),
        received,
    ]
    assert frame.get_column("label").to_list() == [1.0, 0.0]
