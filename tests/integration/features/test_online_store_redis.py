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
from infra.config import FeaturesConfig, load_config

HOST, PORT = "127.0.0.1", 6379
RATES = ["ctr_smoothed", "positive_rate"]
SECONDS = ["seconds_since_last", "seconds_since_first"]


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


def assert_store_equals_batch(
    store: OnlineStore,
    events: pl.DataFrame,
    prior: CtrPrior,
    as_of: dt.datetime,
    history_order: bool = True,
) -> None:
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
                schema={key: pl.Int64, "found": pl.Boolean, **want.drop(key).schema},
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
    store = open_store(windows_days=(1, 2), history_length=5)
    prior = global_prior(events, store.config.ctr_prior_strength)
    store.set_prior(prior)
    stream(store, events)
    as_of = end_time(events)
    store.refresh(as_of)
    assert_store_equals_batch(store, events, prior, as_of)
    users = events.get_column("user_id").unique().to_list()
    assert max(store.bucket_rows("user", u) for u in users[:50]) == 3  # 2 days + lifetime


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
    assert len(first) == n_users + n_items + 1
    store.materialize(
        aggregate_events(events, "user"),
        aggregate_events(events, "item"),
        history_frame(events, store.history_length),
        prior,
        end_time(events),
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
