"""The online store on SQLite: streaming equals batch, reads, defaults, failures.

The oracle everywhere is the batch path computed directly with Polars:
``aggregate_events`` over the whole log, then ``entity_features`` at ``T``, and
the last N positive items per user in ``(ts, row)`` order; for the sketch
columns, the ``features`` step's sketch tables (``build_sketch_tables``) of
the whole log: HLL estimates equal exactly (canonical form), Count-Min window
popularity is the sum of the per-day sketches' estimates over the item's days.
"""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
import threading
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from features.aggregates import (
    CtrPrior,
    aggregate_events,
    compact,
    entity_features,
    global_prior,
)
from features.online_store import (
    BACKENDS,
    OnlineStore,
    OnlineStoreError,
    SqliteOnlineStore,
    make_online_store,
)
from features.online_store.state import entity_columns
from features.schemas import TS_DTYPE
from features.simulator import ClickLogSimulator
from features.sketches import (
    SketchTables,
    build_sketch_tables,
    cms_estimates,
    hll_relative_standard_error,
)
from infra.config import FeaturesConfig, load_config
from infra.errors import ConfigError


@pytest.fixture(scope="module")
def events() -> pl.DataFrame:
    config = load_config("tiny", environ={})
    return pl.concat(list(ClickLogSimulator(config.simulator).iter_event_chunks()))


def end_time(events: pl.DataFrame) -> dt.datetime:
    return events.get_column("ts").max() + dt.timedelta(seconds=1)


def batch_vectors(
    events: pl.DataFrame, config: FeaturesConfig, prior: CtrPrior, as_of: dt.datetime
) -> dict[str, pl.DataFrame]:
    return {
        e: entity_features(aggregate_events(events, e), as_of, config.windows_days, prior)
        for e in ("user", "item")
    }


def batch_histories(events: pl.DataFrame, length: int) -> dict[int, list[int]]:
    frame = (
        events.with_row_index("_order")
        .filter(pl.col("label").fill_null(0.0) > 0)
        .sort("ts", "_order")
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").tail(length))
    )
    return dict(frame.iter_rows())


def stream(store: OnlineStore, events: pl.DataFrame, seed: int = 0) -> int:
    """Feed ``events`` in log order: 40 one at a time, then 1–5 rows at the start
    and around the first midnight, larger batches elsewhere. Returns calls."""
    rng = random.Random(seed)
    days = events.get_column("ts").dt.date()
    midnight = int((days != days[0]).arg_true()[0]) if (days != days[0]).any() else 0
    i = calls = 0
    while i < events.height:
        if i < 40:
            size = 1
        elif i < 400 or abs(i - midnight) < 150:
            size = rng.randint(1, 5)
        else:
            size = rng.randint(100, 400)
            if i < midnight - 150:
                size = min(size, midnight - 150 - i)
        store.apply_events(events.slice(i, size))
        i += size
        calls += 1
    return calls


def read_all(store: OnlineStore, entity: str, ids: list[int]) -> pl.DataFrame:
    """Vectors of ``ids`` (with ``features_as_of``), every one found."""
    key = f"{entity}_id"
    if entity == "item":
        frame = store.read_items(ids)
        assert frame.get_column("found").all()
        return frame.select(key, "features_as_of", *store.item_columns)
    reads = [store.read_user(i) for i in ids]
    assert all(r.found and not r.degraded for r in reads)
    return pl.DataFrame(
        [{key: r.entity_id, "features_as_of": r.features_as_of, **r.values} for r in reads],
        schema={
            key: pl.Int64,
            "features_as_of": pl.Datetime("us", "UTC"),
            **{c: pl.Float64 for c in store.user_columns},
        },
        strict=False,
    )


def batch_sketches(events: pl.DataFrame, config: FeaturesConfig) -> SketchTables:
    return build_sketch_tables(events.select("user_id", "item_id", "ts"), config.sketches)


def sketch_oracle(
    tables: SketchTables, events: pl.DataFrame, windows: tuple[int, ...], as_of: dt.datetime
) -> dict[str, pl.DataFrame]:
    """The sketch columns from the batch tables: HLL estimates, and per window the sum
    over the window's days on which the item had events of that day's CMS estimate."""
    day_cms = dict(tables.item_frequency.select("day", "cms").iter_rows())
    item_days = events.select("item_id", pl.col("ts").dt.date().alias("day")).unique()
    estimates: dict[tuple[int, dt.date], float] = {}
    for (day,), part in item_days.partition_by("day", as_dict=True).items():
        ids = part.get_column("item_id").to_list()
        found = cms_estimates(day_cms[day], ids)
        estimates.update(zip(((i, day) for i in ids), found, strict=True))
    today = as_of.date()
    items = tables.item_reach.get_column("item_id").to_list()
    popularity = {
        f"popularity_cms_{w}d": [
            round(
                sum(
                    v
                    for (i, d), v in estimates.items()
                    if i == item and d > today - dt.timedelta(w)
                )
            )
            for item in items
        ]
        for w in windows
    }
    return {
        "user": tables.user_diversity.select(
            "user_id", pl.col("items_estimate").alias("distinct_items")
        ),
        "item": tables.item_reach.select(
            "item_id", pl.col("users_estimate").alias("distinct_users")
        ).with_columns(pl.Series(k, v, dtype=pl.Int64) for k, v in popularity.items()),
    }


SKETCH_COLUMNS = {"user": ["distinct_items"], "item": ["distinct_users"]}


def assert_store_equals_batch(
    store: OnlineStore, events: pl.DataFrame, prior: CtrPrior, as_of: dt.datetime
) -> None:
    want = batch_vectors(events, store.config, prior, as_of)
    sketches = sketch_oracle(
        batch_sketches(events, store.config), events, store.windows_days, as_of
    )
    for entity, frame in want.items():
        got = read_all(store, entity, frame.get_column(f"{entity}_id").to_list())
        # Sketch estimates: equal, not within the error (canonical HLL; refreshed CMS).
        key = f"{entity}_id"
        assert_frame_equal(
            got.select(sketches[entity].columns),
            sketches[entity],
            check_dtypes=False,
            check_exact=True,
        )
        counters = [c for c in store.columns if c not in RATES_AND_SECONDS]
        assert_frame_equal(
            got.select(key, *counters),
            frame.select(f"{entity}_id", *counters),
            check_dtypes=False,
            check_exact=True,
        )
        assert_frame_equal(
            got.select(RATES), frame.select(RATES), check_dtypes=False, rel_tol=0, abs_tol=1e-12
        )
        # Relative: Polars' own division differs by one ulp (1.5e-11 at 7e4 s) between
        # a frame of one entity and one of many, so exact equality is not Polars'.
        assert_frame_equal(
            got.select(SECONDS), frame.select(SECONDS), check_dtypes=False, rel_tol=1e-12, abs_tol=0
        )
    histories = batch_histories(events, store.history_length)
    for user_id in want["user"].get_column("user_id").to_list():
        assert store.read_history(user_id) == histories.get(user_id, []), user_id
        assert store.read_user(user_id).history == histories.get(user_id, [])


RATES = ["ctr_smoothed", "positive_rate"]
SECONDS = ["seconds_since_last", "seconds_since_first"]
RATES_AND_SECONDS = RATES + SECONDS


def assert_sketches_within_bounds(
    store: OnlineStore, events: pl.DataFrame, tables: SketchTables
) -> None:
    """Streamed, before any refresh: HLL estimates equal the batch's and lie within
    3 standard errors of the exact distinct count (entities with >= 100 values);
    each item's window popularity lies in [exact, exact + epsilon * N_window],
    exact being the vector's own ``events_{w}d`` (same as_of) and N_window the
    events of the window's days. The stored day sketches equal the batch's."""
    config = store.config.sketches
    bound = 3 * hll_relative_standard_error(config.hll_lg_k)
    checked = 0
    for entity, other, table, column in (
        ("user", "item_id", tables.user_diversity, "items_estimate"),
        ("item", "user_id", tables.item_reach, "users_estimate"),
    ):
        key = f"{entity}_id"
        exact = events.group_by(key).agg(pl.col(other).n_unique().alias("exact"))
        got = read_all(store, entity, exact.get_column(key).to_list())
        joined = got.join(exact, on=key).join(table, on=key)
        distinct = SKETCH_COLUMNS[entity][0]
        assert (joined.get_column(distinct) == joined.get_column(column)).all()
        big = joined.filter(pl.col("exact") >= 100)
        checked += big.height
        assert (
            ((big.get_column(distinct) - big.get_column("exact")).abs() / big.get_column("exact"))
            <= bound
        ).all()
    assert checked >= 1  # the tiny log has entities in dense mode
    totals = dict(tables.item_frequency.select("day", "total_weight").iter_rows())
    items = read_all(store, "item", events.get_column("item_id").unique().to_list())
    above = 0
    for row in items.iter_rows(named=True):
        today = row["features_as_of"].date()
        for w in store.windows_days:
            n = sum(v for d, v in totals.items() if today - dt.timedelta(w) < d <= today)
            exact, popularity = row[f"events_{w}d"], row[f"popularity_cms_{w}d"]
            assert exact <= popularity <= exact + config.cms_epsilon * n, (row["item_id"], w)
            above += popularity > exact
    if config.cms_epsilon >= 0.01:
        assert above > 0  # a narrow sketch collides: the bound was exercised
    kept = sorted(totals)[-max(store.windows_days) :]
    for day, cms in tables.item_frequency.select("day", "cms").iter_rows():
        assert store.cms_sketch(day) == (cms if day in kept else None), day


def open_store(tmp_path: Path, **features: object) -> SqliteOnlineStore:
    config = FeaturesConfig.model_validate(features)
    store = make_online_store(config, tmp_path)
    assert isinstance(store, SqliteOnlineStore)
    return store


# --------------------------------------------------------------------------- batch == stream


# A narrow Count-Min (272 x 5 counters, 11 kB a day) so that 181 items collide and the
# epsilon * N bound is exercised (and tests stay fast); the concurrency test keeps the
# default width (1.1 MB a day).
NARROW_CMS = {"cms_epsilon": 0.01}


@pytest.mark.parametrize("windows", [(1, 7, 30), (1, 2)], ids=["windows-1-7-30", "windows-1-2"])
def test_streaming_equals_batch(tmp_path: Path, events: pl.DataFrame, windows) -> None:
    """The key property: events one (or a few) at a time give the batch features exactly.

    (1, 2) keeps two days on a five-day log, so compaction folds for real and
    day sketches are dropped.
    """
    store = open_store(tmp_path, windows_days=windows, history_length=5, sketches=NARROW_CMS)
    prior = global_prior(events, store.config.ctr_prior_strength)
    store.set_prior(prior)
    assert stream(store, events) > 200
    assert_sketches_within_bounds(store, events, batch_sketches(events, store.config))
    as_of = end_time(events)
    assert store.refresh(as_of) == (
        events.get_column("user_id").n_unique() + events.get_column("item_id").n_unique()
    )
    assert_store_equals_batch(store, events, prior, as_of)
    # Bounded state: at most the longest window + the lifetime row per entity.
    limit = max(windows) + 1
    for entity in ("user", "item"):
        rows = [
            store.bucket_rows(entity, i)
            for i in events.get_column(f"{entity}_id").unique().to_list()[:50]
        ]
        assert max(rows) <= limit
        if windows == (1, 2):
            assert max(rows) == limit  # folded: lifetime row + 2 days


@st.composite
def small_logs(draw: st.DrawFn) -> pl.DataFrame:
    """Tiny logs with ties in ts, events around midnight, clicks and unlabelled rows."""
    n = draw(st.integers(1, 15))
    start = dt.datetime(2026, 3, 1, 22, tzinfo=dt.UTC)
    hours = sorted(draw(st.lists(st.integers(0, 5 * 24), min_size=n, max_size=n)))
    # A few rows out of order (late events), as a real stream has.
    hours = [h - 30 if draw(st.booleans()) and h > 40 else h for h in hours]
    return pl.DataFrame(
        {
            "user_id": draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)),
            "item_id": draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)),
            "ts": [start + dt.timedelta(hours=h) for h in hours],
            "event_type": draw(
                st.lists(st.sampled_from(["impression", "click", "rating"]), min_size=n, max_size=n)
            ),
            "label": draw(st.lists(st.sampled_from([0.0, 1.0, None]), min_size=n, max_size=n)),
            "value": draw(st.lists(st.sampled_from([None, 4.0]), min_size=n, max_size=n)),
        },
        schema_overrides={"ts": TS_DTYPE, "value": pl.Float64, "label": pl.Float64},
    )


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(log=small_logs())
def test_one_event_at_a_time_equals_batch(tmp_path_factory, log: pl.DataFrame) -> None:
    store = open_store(
        tmp_path_factory.mktemp("s"), windows_days=(1, 3), history_length=3, sketches=NARROW_CMS
    )
    prior = CtrPrior(rate=0.1, strength=4.0)
    store.set_prior(prior)
    for i in range(log.height):
        store.apply_events(log.slice(i, 1))
    as_of = end_time(log)
    store.refresh(as_of)
    assert_store_equals_batch(store, log, prior, as_of)
    store.close()


def test_materialize_then_stream_equals_batch(tmp_path: Path, events: pl.DataFrame) -> None:
    """Lambda path: bulk load the first days (sketch tables included), stream the rest:
    equal to batch on all, and to a store that streamed everything."""
    store = open_store(tmp_path / "a", sketches=NARROW_CMS)
    config = store.config
    split = dt.datetime.combine(
        events.get_column("ts").dt.date().unique().sort()[3], dt.time(), dt.UTC
    )
    head = events.filter(pl.col("ts") < split)
    prior = global_prior(events, config.ctr_prior_strength)
    store.materialize(
        aggregate_events(head, "user"),
        aggregate_events(head, "item"),
        history_frame(head, config.history_length),
        prior,
        split,
        sketches=batch_sketches(head, config),
    )
    stream(store, events.filter(pl.col("ts") >= split), seed=1)
    everything = open_store(tmp_path / "b", sketches=NARROW_CMS)
    everything.set_prior(prior)
    for i in range(0, events.height, 700):
        everything.apply_events(events.slice(i, 700))
    as_of = end_time(events)
    store.refresh(as_of)
    everything.refresh(as_of)
    assert_store_equals_batch(store, events, prior, as_of)
    for entity in ("user", "item"):
        ids = events.get_column(f"{entity}_id").unique().sort().to_list()
        assert_frame_equal(read_all(store, entity, ids), read_all(everything, entity, ids))
    for day in events.get_column("ts").dt.date().unique().to_list():
        assert store.cms_sketch(day) == everything.cms_sketch(day) is not None


def history_frame(events: pl.DataFrame, length: int) -> pl.DataFrame:
    rows = batch_histories(events, length)
    return pl.DataFrame(
        {"user_id": list(rows), "history": list(rows.values())},
        schema={"user_id": pl.Int64, "history": pl.List(pl.Int64)},
    )


# --------------------------------------------------------------------------- materialize and reads


@pytest.fixture()
def loaded(tmp_path: Path, events: pl.DataFrame) -> tuple[SqliteOnlineStore, CtrPrior]:
    store = open_store(tmp_path, sketches=NARROW_CMS)
    prior = global_prior(events, store.config.ctr_prior_strength)
    counts = store.materialize(
        aggregate_events(events, "user"),
        aggregate_events(events, "item"),
        history_frame(events, store.history_length),
        prior,
        end_time(events),
        sketches=batch_sketches(events, store.config),
    )
    assert counts == {
        "users": events.get_column("user_id").n_unique(),
        "items": events.get_column("item_id").n_unique(),
    }
    return store, prior


def test_materialize_then_read(loaded, events: pl.DataFrame) -> None:
    store, prior = loaded
    as_of = end_time(events)
    assert_store_equals_batch(store, events, prior, as_of)
    read = store.read_user(events.get_column("user_id")[0])
    assert read.found and not read.degraded and read.features_as_of == as_of
    assert store.prior() == prior


def test_read_items_keeps_order_and_fills_missing(loaded, events: pl.DataFrame) -> None:
    store, prior = loaded
    known = events.get_column("item_id").unique().sort().to_list()
    missing = max(known) + 1000
    asked = [known[5], missing, known[0], known[5], known[-1]]
    frame = store.read_items(asked)
    assert frame.get_column("item_id").to_list() == asked
    assert frame.get_column("found").to_list() == [True, False, True, True, True]
    assert not frame.get_column("degraded").any()
    want = batch_vectors(events, store.config, prior, end_time(events))["item"]
    row = frame.row(0, named=True)
    assert row["events_total"] == want.filter(pl.col("item_id") == known[5])["events_total"][0]
    assert row["distinct_users"] > 0 and row["popularity_cms_30d"] >= row["events_30d"] > 0
    miss = frame.row(1, named=True)
    assert miss["events_total"] == 0 and miss["ctr_smoothed"] == prior.rate
    assert miss["distinct_users"] == 0.0 and miss["popularity_cms_7d"] == 0
    assert miss["seconds_since_last"] is None and miss["features_as_of"] is None
    assert store.read_items([]).height == 0
    assert store.read_items([]).columns == frame.columns


def test_materialize_is_idempotent(loaded, events: pl.DataFrame) -> None:
    store, prior = loaded

    def dump() -> list[tuple]:
        with sqlite3.connect(store.path) as conn:
            return [
                *conn.execute("SELECT * FROM user_features ORDER BY id"),
                *conn.execute("SELECT * FROM item_features ORDER BY id"),
                *conn.execute("SELECT * FROM cms_days ORDER BY day"),
                *conn.execute("SELECT * FROM meta"),
            ]

    first = dump()
    store.materialize(
        aggregate_events(events, "user"),
        aggregate_events(events, "item"),
        history_frame(events, store.history_length),
        prior,
        end_time(events),
        sketches=batch_sketches(events, store.config),
    )
    assert dump() == first


def test_missing_entity_gets_defaults(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    # Before any prior: rates unknown.
    assert store.read_user(7).values["ctr_smoothed"] is None
    store.set_prior(CtrPrior(rate=0.25, strength=10.0))
    read = store.read_user(7)
    assert not read.found and not read.degraded and read.features_as_of is None
    assert read.history == [] and store.read_history(7) == []
    assert read.values["events_7d"] == 0 and read.values["clicks_total"] == 0
    assert read.values["ctr_smoothed"] == read.values["positive_rate"] == 0.25
    assert read.values["seconds_since_last"] is None
    assert read.values["distinct_items"] == 0.0
    assert list(read.values) == entity_columns("user", (1, 7, 30))
    assert store.read_items([7]).columns[4:] == entity_columns("item", (1, 7, 30))
    assert store.read_item(7).values["popularity_cms_30d"] == 0


def test_refresh_rolls_windows_and_bounds_state(loaded, events: pl.DataFrame) -> None:
    store, prior = loaded
    later = end_time(events) + dt.timedelta(days=40)
    store.refresh(later)
    assert_store_equals_batch(store, events, prior, later)
    user = events.get_column("user_id")[0]
    assert store.read_user(user).values["events_30d"] == 0
    assert store.bucket_rows("user", user) == 1  # everything folded into the lifetime row
    # Day sketches left the longest window: deleted; HLLs (lifetime) kept.
    assert all(store.cms_sketch(d) is None for d in events.get_column("ts").dt.date().unique())
    item = int(events.get_column("item_id")[0])
    assert store.read_item(item).values["popularity_cms_30d"] == 0
    assert store.read_item(item).values["distinct_users"] > 0
    with pytest.raises(ValueError, match="precedes the store clock"):
        store.refresh(end_time(events))


def test_late_event_keeps_clock_and_history_order(tmp_path: Path) -> None:
    store = open_store(tmp_path, history_length=3)
    store.set_prior(CtrPrior(rate=0.1, strength=1.0))
    t0 = dt.datetime(2026, 1, 2, 12, tzinfo=dt.UTC)

    def event(item: int, minutes: int) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "user_id": [1],
                "item_id": [item],
                "ts": [t0 + dt.timedelta(minutes=minutes)],
                "event_type": ["impression"],
                "label": [1.0],
                "value": [None],
            },
            schema_overrides={"ts": TS_DTYPE, "value": pl.Float64},
        )

    store.apply_events(event(10, 10))
    store.apply_events(event(20, 0))  # arrives late
    read = store.read_user(1)
    assert read.history == [20, 10]
    assert read.features_as_of == t0 + dt.timedelta(minutes=10, microseconds=1)
    assert read.values["seconds_since_last"] == pytest.approx(1e-6)
    assert read.values["seconds_since_first"] == pytest.approx(600.000001)


# --------------------------------------------------------------------------- failures


def test_degraded_read_when_the_database_fails(loaded, events: pl.DataFrame) -> None:
    store, prior = loaded
    user = events.get_column("user_id")[0]
    assert store.read_user(user).found
    with sqlite3.connect(store.path) as other:  # another process breaks the schema
        other.execute("DROP TABLE user_features")
    read = store.read_user(user)
    assert read.degraded and not read.found
    assert read.values["events_total"] == 0 and read.values["ctr_smoothed"] == prior.rate
    assert store.read_history(user) == []
    with pytest.raises(OnlineStoreError, match=r"\(sqlite\).*apply_events"):
        store.apply_events(events.head(3))


def test_closed_store_reads_degrade_and_writes_raise(loaded, events: pl.DataFrame) -> None:
    store, _ = loaded
    store.close()
    read = store.read_user(events.get_column("user_id")[0])
    assert read.degraded and not read.found
    frame = store.read_items([1, 2])
    assert frame.get_column("degraded").all() and not frame.get_column("found").any()
    with pytest.raises(OnlineStoreError, match="sqlite"):
        store.apply_events(events.head(3))


def test_stream_without_prior_raises(tmp_path: Path, events: pl.DataFrame) -> None:
    store = open_store(tmp_path)
    with pytest.raises(OnlineStoreError, match="no prior"):
        store.apply_events(events.head(3))
    # Nothing was written.
    assert store.entity_count("user") == 0


def test_layout_mismatch_is_refused(tmp_path: Path, events: pl.DataFrame) -> None:
    store = open_store(tmp_path)
    store.set_prior(CtrPrior(rate=0.1, strength=1.0))
    store.apply_events(events.head(5))
    other = open_store(tmp_path, windows_days=(1, 2))
    with pytest.raises(OnlineStoreError, match="clear"):
        other.apply_events(events.slice(5, 5))
    other.clear()
    other.set_prior(CtrPrior(rate=0.1, strength=1.0))
    assert other.apply_events(events.slice(5, 5)) > 0
    # Other sketch shapes: an HLL or Count-Min merge would mix incompatible sketches.
    wider = open_store(tmp_path, windows_days=(1, 2), sketches={"hll_lg_k": 12})
    with pytest.raises(OnlineStoreError, match="sketches"):
        wider.apply_events(events.slice(10, 5))


def test_concurrent_writers_lose_nothing(tmp_path: Path, events: pl.DataFrame) -> None:
    """Two handles on one file (two serving replicas) interleave apply_events."""
    part = events.head(1200)
    first = open_store(tmp_path)
    second = open_store(tmp_path)
    prior = global_prior(part, first.config.ctr_prior_strength)
    first.set_prior(prior)
    halves = [part.gather(range(k, part.height, 2)) for k in (0, 1)]

    def run(store: OnlineStore, half: pl.DataFrame) -> None:
        for i in range(0, half.height, 30):
            store.apply_events(half.slice(i, 30))

    threads = [
        threading.Thread(target=run, args=a) for a in ((first, halves[0]), (second, halves[1]))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    as_of = end_time(part)
    first.refresh(as_of)
    want = batch_vectors(part, first.config, prior, as_of)
    got = read_all(second, "user", want["user"].get_column("user_id").to_list())
    assert_frame_equal(
        got.select("user_id", "events_total", "clicks_total"),
        want["user"].select("user_id", "events_total", "clicks_total"),
        check_dtypes=False,
    )


# --------------------------------------------------------------------------- factory


def test_factory_picks_backend_by_kind(tmp_path: Path) -> None:
    assert set(BACKENDS) == {"sqlite", "redis"}
    store = make_online_store(FeaturesConfig(), tmp_path)
    assert isinstance(store, SqliteOnlineStore)
    assert store.path == tmp_path / "online" / "features.sqlite"
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    explicit = FeaturesConfig.model_validate(
        {"online_store": {"url": str(tmp_path / "elsewhere.sqlite")}}
    )
    assert make_online_store(explicit, "unused").path == tmp_path / "elsewhere.sqlite"
    with pytest.raises(ConfigError, match="local"):
        make_online_store(FeaturesConfig(), "s3://bucket/workdir")


def test_compacted_materialize_equals_raw(tmp_path: Path, events: pl.DataFrame) -> None:
    """The batch path publishes compacted buckets; loading those or raw ones is the same."""
    store = open_store(tmp_path, windows_days=(1, 2))
    as_of = end_time(events)
    raw = aggregate_events(events, "user")
    prior = global_prior(events, 20.0)
    store.materialize(raw, raw.head(0), history_frame(events, 20), prior, as_of)
    first = store.read_user(raw.get_column("user_id")[0])
    store.materialize(compact(raw, as_of, 2), raw.head(0), history_frame(events, 20), prior, as_of)
    assert store.read_user(raw.get_column("user_id")[0]) == first


def test_undecodable_record_degrades_instead_of_raising(loaded, events: pl.DataFrame) -> None:
    store, _ = loaded
    item = int(events.get_column("item_id")[0])
    with sqlite3.connect(store.path) as other:  # a record of another layout or corrupted
        other.execute("UPDATE item_features SET v = ? WHERE id = ?", (b"\xc1garbage", item))
    frame = store.read_items([item])
    assert frame.get_column("degraded").all() and not frame.get_column("found").any()
