"""The online store on a real Redis (127.0.0.1:6379): batch == stream, reads, outages.

Each test uses its own key prefix and deletes its keys. Outages are real: a
port where nothing listens, a Redis server of our own that we stop and start,
and ``CLIENT KILL`` of the store's own connection. Skips where no Redis
answers on 127.0.0.1:6379.
"""

from __future__ import annotations

import datetime as dt
import random
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
import redis
from polars.testing import assert_frame_equal

from features.aggregates import CtrPrior, aggregate_events, entity_features, global_prior
from features.online_store import OnlineStore, OnlineStoreError, RedisOnlineStore, make_online_store
from features.simulator import ClickLogSimulator
from features.sketches import (
    SketchTables,
    build_sketch_tables,
    cms_estimates,
    hll_relative_standard_error,
)
from infra.config import FeaturesConfig, load_config

HOST, PORT = "127.0.0.1", 6379
RATES = ["ctr_smoothed", "positive_rate"]
SECONDS = ["seconds_since_last", "seconds_since_first"]
# A narrow Count-Min (272 x 5 counters) so that the items collide and the bound is exercised.
NARROW_CMS = {"cms_epsilon": 0.01}


def _reachable(port: int) -> bool:
    try:
        return bool(redis.Redis(host=HOST, port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


pytestmark = pytest.mark.skipif(
    not _reachable(PORT),
    reason=f"no Redis answers on {HOST}:{PORT} (start one: `redis-server` or docker run redis)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_config(url: str, **features: object) -> FeaturesConfig:
    prefix = f"rayrec-test-{uuid.uuid4().hex[:12]}"
    return FeaturesConfig.model_validate(
        {**features, "online_store": {"kind": "redis", "url": url, "key_prefix": prefix}}
    )


def leftover_keys(prefix: str, port: int = PORT) -> list[bytes]:
    return list(redis.Redis(host=HOST, port=port).scan_iter(match=f"{prefix}:*"))


@pytest.fixture()
def open_store() -> Iterator:
    opened: list[RedisOnlineStore] = []

    def open_(url: str = f"redis://{HOST}:{PORT}/0", **features: object) -> RedisOnlineStore:
        store = make_online_store(make_config(url, **features), "unused")
        assert isinstance(store, RedisOnlineStore)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        if store.url.endswith(f":{PORT}/0"):
            store.clear()
            assert leftover_keys(store.prefix) == []
        store.close()


@pytest.fixture(scope="module")
def events() -> pl.DataFrame:
    config = load_config("tiny", environ={})
    return pl.concat(list(ClickLogSimulator(config.simulator).iter_event_chunks()))


def end_time(events: pl.DataFrame) -> dt.datetime:
    return events.get_column("ts").max() + dt.timedelta(seconds=1)


def batch_histories(events: pl.DataFrame, length: int) -> dict[int, list[int]]:
    frame = (
        events.with_row_index("_order")
        .filter(pl.col("label").fill_null(0.0) > 0)
        .sort("ts", "_order")
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").tail(length))
    )
    return dict(frame.iter_rows())


def history_frame(events: pl.DataFrame, length: int) -> pl.DataFrame:
    rows = batch_histories(events, length)
    return pl.DataFrame(
        {"user_id": list(rows), "history": list(rows.values())},
        schema={"user_id": pl.Int64, "history": pl.List(pl.Int64)},
    )


def batch_sketches(events: pl.DataFrame, config: FeaturesConfig) -> SketchTables:
    return build_sketch_tables(events.select("user_id", "item_id", "ts"), config.sketches)


def popularity(tables: SketchTables, events: pl.DataFrame, w: int, as_of: dt.datetime) -> dict:
    """item -> sum over the window's days on which it had events of that day's CMS estimate."""
    day_cms = dict(tables.item_frequency.select("day", "cms").iter_rows())
    pairs = events.select("item_id", pl.col("ts").dt.date().alias("day")).unique()
    out: dict[int, float] = {}
    for item, day in pairs.filter(pl.col("day") > as_of.date() - dt.timedelta(w)).iter_rows():
        out[item] = out.get(item, 0.0) + float(cms_estimates(day_cms[day], [item])[0])
    return out


def assert_sketches_equal_batch(
    store: OnlineStore, events: pl.DataFrame, as_of: dt.datetime | None
) -> None:
    """HLL estimates equal the batch tables'; Count-Min popularity equals the batch's
    (``as_of``: after a refresh) or lies in [exact, exact + epsilon * N] (None)."""
    tables = batch_sketches(events, store.config)
    for user, estimate in tables.user_diversity.select("user_id", "items_estimate").iter_rows():
        assert store.read_user(user).values["distinct_items"] == estimate
    items = store.read_items(tables.item_reach.get_column("item_id").to_list())
    assert items.get_column("distinct_users").to_list() == (
        tables.item_reach.get_column("users_estimate").to_list()
    )
    epsilon_n = store.config.sketches.cms_epsilon * events.height
    for w in store.windows_days:
        got = items.select("item_id", f"popularity_cms_{w}d", f"events_{w}d").rows()
        if as_of is not None:
            want = popularity(tables, events, w, as_of)
            assert [(i, p) for i, p, _ in got] == [(i, round(want.get(i, 0))) for i, _, _ in got]
        else:
            assert all(e <= p <= e + epsilon_n for _, p, e in got), w
    big = events.group_by("user_id").agg(pl.col("item_id").n_unique().alias("n"))
    bound = 3 * hll_relative_standard_error(store.config.sketches.hll_lg_k)
    for user, n in big.filter(pl.col("n") >= 100).iter_rows():
        assert abs(store.read_user(user).values["distinct_items"] - n) <= bound * n


def assert_store_equals_batch(
    store: OnlineStore,
    events: pl.DataFrame,
    prior: CtrPrior,
    as_of: dt.datetime,
    history_order: bool = True,
) -> None:
    assert_sketches_equal_batch(store, events, as_of)
    for entity in ("user", "item"):
        key = f"{entity}_id"
        want = entity_features(
            aggregate_events(events, entity), as_of, store.config.windows_days, prior
        )
        ids = want.get_column(key).to_list()
        if entity == "item":
            got = store.read_items(ids)
        else:
            reads = [store.read_user(i) for i in ids]
            got = pl.DataFrame(
                [{key: r.entity_id, "found": r.found, **r.values} for r in reads],
                schema={
                    key: pl.Int64,
                    "found": pl.Boolean,
                    **want.drop(key).schema,
                    "distinct_items": pl.Float64,
                },
            )
        assert got.get_column("found").all()
        counters = [c for c in store.columns if c not in RATES + SECONDS]
        assert_frame_equal(
            got.select(key, *counters), want.select(key, *counters), check_exact=True
        )
        assert_frame_equal(got.select(RATES), want.select(RATES), rel_tol=0, abs_tol=1e-12)
        assert_frame_equal(got.select(SECONDS), want.select(SECONDS), rel_tol=1e-12, abs_tol=0)
    histories = batch_histories(events, store.history_length)
    for user_id in events.get_column("user_id").unique().to_list():
        got, want = store.read_history(user_id), histories.get(user_id, [])
        if history_order:
            assert got == want
        else:  # concurrent writers: ties in ts land in arrival order, not row order
            assert len(got) == len(want)


def stream(store: OnlineStore, events: pl.DataFrame, seed: int = 0) -> None:
    """30 events one at a time, 300 in batches of 1–5, the rest in batches of 100–400."""
    rng = random.Random(seed)
    i = 0
    while i < events.height:
        size = 1 if i < 30 else rng.randint(1, 5) if i < 330 else rng.randint(100, 400)
        store.apply_events(events.slice(i, size))
        i += size


def test_streaming_equals_batch(open_store, events: pl.DataFrame) -> None:
    store = open_store(windows_days=(1, 2), history_length=5, sketches=NARROW_CMS)
    prior = global_prior(events, store.config.ctr_prior_strength)
    store.set_prior(prior)
    stream(store, events)
    assert_sketches_equal_batch(store, events, None)  # before refresh: within the bounds
    as_of = end_time(events)
    store.refresh(as_of)
    assert_store_equals_batch(store, events, prior, as_of)
    users = events.get_column("user_id").unique().to_list()
    assert max(store.bucket_rows("user", u) for u in users[:50]) == 3  # 2 days + lifetime
    # Two day sketches kept (the longest window), equal to the batch's byte for byte.
    tables = batch_sketches(events, store.config)
    days = tables.item_frequency.get_column("day").to_list()
    assert len(leftover_keys(store.prefix + ":cms")) == 2
    for day, cms in tables.item_frequency.select("day", "cms").iter_rows():
        assert store.cms_sketch(day) == (cms if day in days[-2:] else None)


def test_materialize_then_stream_equals_stream_everything(open_store, events) -> None:
    split = dt.datetime.combine(
        events.get_column("ts").dt.date().unique().sort()[3], dt.time(), dt.UTC
    )
    head = events.filter(pl.col("ts") < split)
    lambda_store, everything = open_store(), open_store()
    prior = global_prior(events, lambda_store.config.ctr_prior_strength)
    lambda_store.materialize(
        aggregate_events(head, "user"),
        aggregate_events(head, "item"),
        history_frame(head, lambda_store.history_length),
        prior,
        split,
        sketches=batch_sketches(head, lambda_store.config),
    )
    tail = events.filter(pl.col("ts") >= split)
    for i in range(0, tail.height, 300):
        lambda_store.apply_events(tail.slice(i, 300))
    everything.set_prior(prior)
    for i in range(0, events.height, 700):
        everything.apply_events(events.slice(i, 700))
    as_of = end_time(events)
    for store in (lambda_store, everything):
        store.refresh(as_of)
    assert_store_equals_batch(lambda_store, events, prior, as_of)
    ids = events.get_column("item_id").unique().sort().to_list()
    assert_frame_equal(lambda_store.read_items(ids), everything.read_items(ids))
    for user in events.get_column("user_id").unique().to_list():
        assert lambda_store.read_user(user) == everything.read_user(user)


@pytest.fixture()
def loaded(open_store, events: pl.DataFrame) -> tuple[RedisOnlineStore, CtrPrior]:
    store = open_store()
    prior = global_prior(events, store.config.ctr_prior_strength)
    store.materialize(
        aggregate_events(events, "user"),
        aggregate_events(events, "item"),
        history_frame(events, store.history_length),
        prior,
        end_time(events),
        sketches=batch_sketches(events, store.config),
    )
    return store, prior


def test_materialize_then_read_and_idempotent(loaded, events: pl.DataFrame) -> None:
    store, prior = loaded
    assert_store_equals_batch(store, events, prior, end_time(events))
    client = redis.Redis(host=HOST, port=PORT)

    def dump() -> dict[bytes, object]:
        keys = sorted(leftover_keys(store.prefix))
        return {k: client.hgetall(k) if client.type(k) == b"hash" else client.get(k) for k in keys}

    first = dump()
    n_users = events.get_column("user_id").n_unique()
    n_items = events.get_column("item_id").n_unique()
    n_days = events.get_column("ts").dt.date().n_unique()  # all within the 30-day window
    assert len(first) == n_users + n_items + n_days + 1
    store.materialize(
        aggregate_events(events, "user"),
        aggregate_events(events, "item"),
        history_frame(events, store.history_length),
        prior,
        end_time(events),
        sketches=batch_sketches(events, store.config),
    )
    assert dump() == first


def test_read_items_order_and_missing(loaded, events: pl.DataFrame) -> None:
    store, prior = loaded
    known = events.get_column("item_id").unique().sort().to_list()
    asked = [known[3], 10**9, known[0], known[3]]
    frame = store.read_items(asked)
    assert frame.get_column("item_id").to_list() == asked
    assert frame.get_column("found").to_list() == [True, False, True, True]
    missing = frame.row(1, named=True)
    assert missing["clicks_total"] == 0 and missing["ctr_smoothed"] == prior.rate
    assert missing["distinct_users"] == 0.0 and missing["popularity_cms_7d"] == 0
    assert missing["seconds_since_first"] is None


def test_concurrent_writers_lose_nothing(open_store, events: pl.DataFrame) -> None:
    """Two handles interleave apply_events on the same users: WATCH/EXEC retries."""
    part = events.head(1500)
    first = open_store()
    second = RedisOnlineStore(first.config)
    prior = global_prior(part, first.config.ctr_prior_strength)
    first.set_prior(prior)
    halves = [part.gather(range(k, part.height, 2)) for k in (0, 1)]

    def run(store: OnlineStore, half: pl.DataFrame) -> None:
        for i in range(0, half.height, 25):
            store.apply_events(half.slice(i, 25))

    threads = [
        threading.Thread(target=run, args=a) for a in ((first, halves[0]), (second, halves[1]))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    second.close()
    as_of = end_time(part)
    first.refresh(as_of)
    assert_store_equals_batch(first, part, prior, as_of, history_order=False)


# --------------------------------------------------------------------------- outages


def test_nothing_listening_degrades_reads_and_fails_writes(open_store, events) -> None:
    store = open_store(f"redis://{HOST}:{free_port()}/0")
    started = time.perf_counter()
    read = store.read_user(1)
    assert read.degraded and not read.found and read.values["events_total"] == 0
    frame = store.read_items([1, 2, 3])
    assert frame.get_column("degraded").all() and not frame.get_column("found").any()
    assert store.read_history(1) == []
    assert time.perf_counter() - started < 2.0
    with pytest.raises(OnlineStoreError, match=r"\(redis\).*set_prior"):
        store.set_prior(CtrPrior(0.1, 1.0))
    with pytest.raises(OnlineStoreError, match=r"\(redis\).*apply_events.*ConnectionError"):
        store.apply_events(events.head(3))


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator:
    """A redis-server of our own on a free port, which the test may stop and restart."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not found: cannot stop and restart a server")
    port = free_port()
    procs: list[subprocess.Popen] = []

    def start() -> None:
        args = [binary, "--port", str(port), "--bind", HOST, "--dir", str(tmp_path)]
        args += ["--save", "3600 1", "--appendonly", "no"]
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while not _reachable(port):
            assert time.monotonic() < deadline, "own redis-server did not start"
            time.sleep(0.05)

    def stop() -> None:
        procs[-1].terminate()  # SIGTERM: redis saves its RDB (save points set) and exits
        procs[-1].wait(timeout=10)

    start()
    yield port, start, stop
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def test_reads_degrade_while_server_is_down_and_recover(open_store, own_redis, events) -> None:
    port, start, stop = own_redis
    store = open_store(f"redis://{HOST}:{port}/0")
    prior = global_prior(events, store.config.ctr_prior_strength)
    head = events.head(500)
    store.materialize(
        aggregate_events(head, "user"),
        aggregate_events(head, "item"),
        history_frame(head, store.history_length),
        prior,
        end_time(head),
    )
    user = head.get_column("user_id")[0]
    healthy = store.read_user(user)
    assert healthy.found and not healthy.degraded
    stop()
    down = store.read_user(user)
    assert down.degraded and not down.found
    assert down.values["ctr_smoothed"] == prior.rate  # the last prior this handle saw
    with pytest.raises(OnlineStoreError, match="redis"):
        store.apply_events(events.slice(500, 5))
    start()  # same port, data back from the RDB
    assert store.read_user(user) == healthy
    assert store.read_items([int(head.get_column("item_id")[0])]).get_column("found").all()


def test_killed_connection_reconnects(loaded, events: pl.DataFrame) -> None:
    store, _ = loaded
    user = events.get_column("user_id")[0]
    before = store.read_user(user)
    admin = redis.Redis(host=HOST, port=PORT)
    reader_id = store._reads.client_id()  # the pooled connection the reads use
    assert admin.client_kill_filter(_id=reader_id) == 1
    after = store.read_user(user)  # the stale socket fails; redis-py reconnects and retries
    assert after == before and not after.degraded
