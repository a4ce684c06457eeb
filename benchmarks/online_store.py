"""Online store read latency, SQLite and Redis, against a raw lookup of each backend.

    python benchmarks/online_store.py --json out.json [--preset default] [--skip-redis]

Materialises the simulated world of ``--preset`` (``default``: 20,000 users,
5,000 items, 28 days) into each backend: buckets over the whole log
(``aggregate_events`` per chunk, merged), compacted at the log's end, vectors
and histories. Then, per backend, ``--reads`` single-user reads
(``read_user``: vector + history + meta, decoded) of random users and
``--batches`` batched reads of ``--batch-size`` random items (``read_items``,
a Polars frame), each timed alone. The baseline, measured in the same run on
the same connection settings, is the backend's raw lookup of a fixed small
value (SQLite ``SELECT v FROM t WHERE k = ?``, Redis ``GET``): the ratio is
the store's own overhead (decoding, defaults, the meta fetch). Also reported:
encoded sizes (msgpack, what the store uses, vs one-row Arrow IPC), bulk-load
time and streaming ``apply_events`` throughput. Redis keys live under a
unique prefix and are deleted at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name
# would shadow the `features` package: drop the folder before importing it.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import datetime as dt
import io
import json
import random
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable

import msgpack
import polars as pl
import redis

from features.aggregates import (
    aggregate_events,
    compact,
    entity_features,
    merge_aggregates,
    prior_from_buckets,
)
from features.online_store import OnlineStore, RedisOnlineStore, SqliteOnlineStore
from features.simulator import ClickLogSimulator
from infra.config import FeaturesConfig, load_config


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(fn: Callable[[], object], n: int, warmup: int = 100) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - start) / 1e6)
    return out


def build_world(preset: str, config: FeaturesConfig) -> dict[str, object]:
    """Batch-path outputs of the preset's simulated log (as the features step makes them)."""
    sim = load_config(preset, environ={}).simulator
    users, items, positives = [], [], []
    last = None
    n_events = 0
    tail: pl.DataFrame | None = None
    for chunk in ClickLogSimulator(sim).iter_event_chunks():
        n_events += chunk.height
        users.append(aggregate_events(chunk, "user"))
        items.append(aggregate_events(chunk, "item"))
        positives.append(
            chunk.filter(pl.col("label").fill_null(0.0) > 0).select("user_id", "item_id", "ts")
        )
        chunk_last = chunk.get_column("ts").max()
        last = chunk_last if last is None else max(last, chunk_last)
        tail = chunk
    as_of = last + dt.timedelta(microseconds=1)
    keep = max(config.windows_days)
    user_buckets = compact(merge_aggregates(*users), as_of, keep)
    item_buckets = compact(merge_aggregates(*items), as_of, keep)
    history = (
        pl.concat(positives)
        .with_row_index("_order")
        .sort("ts", "_order")
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").tail(config.history_length).alias("history"))
    )
    return {
        "user_buckets": user_buckets,
        "item_buckets": item_buckets,
        "history": history,
        "prior": prior_from_buckets(user_buckets, config.ctr_prior_strength),
        "as_of": as_of,
        "events": n_events,
        "tail": tail,
    }


def encoding_sizes(world: dict, config: FeaturesConfig) -> dict[str, float]:
    """Mean encoded bytes per entity, and a one-vector decode time: msgpack vs Arrow IPC."""
    from features.online_store import state

    as_of = world["as_of"]
    vectors = entity_features(world["user_buckets"], as_of, config.windows_days, world["prior"])
    columns = state.feature_columns(config.windows_days)
    packed = state.encode_vectors(vectors, as_of, columns)
    states = state.encode_states(world["user_buckets"])
    hist = [
        state.encode_history((h, [0] * len(h)))
        for h in world["history"].get_column("history").to_list()
    ]
    one = vectors.head(1)
    sink = io.BytesIO()
    one.write_ipc(sink, compression="uncompressed")
    ipc = sink.getvalue()
    blob = packed[0][1]
    msgpack_us = statistics.median(timed(lambda: state.decode_vector(blob), 2000)) * 1e3
    ipc_us = statistics.median(timed(lambda: pl.read_ipc(io.BytesIO(ipc)).row(0), 500)) * 1e3
    return {
        "vector_msgpack_bytes": statistics.mean(len(b) for _, b in packed),
        "vector_arrow_ipc_bytes": float(len(ipc)),
        "state_msgpack_bytes": statistics.mean(len(b) for _, b in states),
        "history_msgpack_bytes": statistics.mean(len(b) for b in hist) if hist else 0.0,
        "vector_msgpack_decode_us": msgpack_us,
        "vector_arrow_ipc_decode_us": ipc_us,
    }


def bench_backend(
    name: str,
    store: OnlineStore,
    baseline: Callable[[], object],
    world: dict,
    args: argparse.Namespace,
) -> dict[str, float]:
    start = time.perf_counter()
    counts = store.materialize(
        world["user_buckets"],
        world["item_buckets"],
        world["history"],
        world["prior"],
        world["as_of"],
    )
    load_s = time.perf_counter() - start
    rng = random.Random(0)
    user_ids = world["user_buckets"].get_column("user_id").unique().to_list()
    item_ids = world["item_buckets"].get_column("item_id").unique().to_list()
    users = iter([rng.choice(user_ids) for _ in range(args.reads + 100)])
    batches = iter([rng.sample(item_ids, args.batch_size) for _ in range(args.batches + 100)])
    single = timed(lambda: store.read_user(next(users)), args.reads)
    batch = timed(lambda: store.read_items(next(batches)), args.batches)
    base = timed(baseline, args.reads)
    assert store.read_user(user_ids[0]).found
    # Streaming: the tail chunk's events again, 50 at a time, after the load.
    tail: pl.DataFrame = world["tail"].head(5_000)
    start = time.perf_counter()
    for i in range(0, tail.height, 50):
        store.apply_events(tail.slice(i, 50), as_of=world["as_of"])
    stream_s = time.perf_counter() - start
    return {
        f"{name}_p50_ms": statistics.median(single),
        f"{name}_p99_ms": percentile(single, 0.99),
        f"{name}_batch{args.batch_size}_p50_ms": statistics.median(batch),
        f"{name}_batch{args.batch_size}_p99_ms": percentile(batch, 0.99),
        f"{name}_baseline_p50_ms": statistics.median(base),
        f"{name}_baseline_p99_ms": percentile(base, 0.99),
        f"{name}_ratio_p50": statistics.median(single) / statistics.median(base),
        f"{name}_materialize_s": load_s,
        f"{name}_materialized_entities": float(counts["users"] + counts["items"]),
        f"{name}_apply_events_per_s": tail.height / stream_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--skip-redis", action="store_true")
    args = parser.parse_args(argv)

    base_config = load_config(args.preset, environ={}).features
    start = time.perf_counter()
    world = build_world(args.preset, base_config)
    build_s = time.perf_counter() - start
    result: dict[str, object] = {
        "preset": args.preset,
        "events": world["events"],
        "users": world["user_buckets"].get_column("user_id").n_unique(),
        "items": world["item_buckets"].get_column("item_id").n_unique(),
        "world_build_s": build_s,
        "timeout_s": base_config.online_store.timeout_s,
        **encoding_sizes(world, base_config),
    }

    with tempfile.TemporaryDirectory() as tmp:
        sqlite_store = SqliteOnlineStore(base_config, Path(tmp) / "features.sqlite")
        raw = sqlite3.connect(Path(tmp) / "baseline.sqlite", isolation_level=None)
        raw.execute("PRAGMA journal_mode=WAL")
        raw.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v BLOB)")
        raw.execute("INSERT INTO t VALUES ('k', ?)", (msgpack.packb([1.0] * 20),))
        result.update(
            bench_backend(
                "sqlite",
                sqlite_store,
                lambda: raw.execute("SELECT v FROM t WHERE k = ?", ("k",)).fetchone(),
                world,
                args,
            )
        )
        result["sqlite_file_mb"] = (Path(tmp) / "features.sqlite").stat().st_size / 2**20
        sqlite_store.close()
        raw.close()

    if not args.skip_redis:
        prefix = f"rayrec-bench-{uuid.uuid4().hex[:8]}"
        config = base_config.model_copy(
            update={
                "online_store": base_config.online_store.model_copy(
                    update={"kind": "redis", "url": args.redis_url, "key_prefix": prefix}
                )
            }
        )
        store = RedisOnlineStore(config)
        client = redis.Redis.from_url(args.redis_url)
        base_key = f"{prefix}:baseline"
        client.set(base_key, msgpack.packb([1.0] * 20))
        try:
            result.update(bench_backend("redis", store, lambda: client.get(base_key), world, args))
            result["redis_memory_mb_per_10k_users"] = (
                sum(
                    client.memory_usage(store._key("user", u)) or 0
                    for u in world["user_buckets"].get_column("user_id").unique().head(1000)
                )
                * 10
                / 2**20
            )
        finally:
            store.clear()
            client.delete(base_key)
            store.close()
        result["batch100_p99_ms"] = max(
            result[f"sqlite_batch{args.batch_size}_p99_ms"],
            result[f"redis_batch{args.batch_size}_p99_ms"],
        )
    else:
        result["batch100_p99_ms"] = result[f"sqlite_batch{args.batch_size}_p99_ms"]

    print(
        f"\nworld: {result['events']:,} events, {result['users']:,} users, "
        f"{result['items']:,} items (built in {build_s:.1f} s)"
    )
    print(f"{'case':<34}{'p50 ms':>10}{'p99 ms':>10}{'p50 / baseline':>16}")
    for name in ("sqlite", "redis"):
        if f"{name}_p50_ms" not in result:
            continue
        base50 = result[f"{name}_baseline_p50_ms"]
        for case, key in (
            ("read_user", f"{name}"),
            (f"read_items x{args.batch_size}", f"{name}_batch{args.batch_size}"),
            ("baseline raw lookup", f"{name}_baseline"),
        ):
            p50, p99 = result[f"{key}_p50_ms"], result[f"{key}_p99_ms"]
            print(f"{name + ' ' + case:<34}{p50:>10.3f}{p99:>10.3f}{p50 / base50:>16.1f}")
        print(
            f"{name + ' materialize':<34}{result[f'{name}_materialize_s']:>9.1f}s"
            f"   apply_events: {result[f'{name}_apply_events_per_s']:,.0f} events/s (batches of 50)"
        )
    print(
        f"sizes: vector {result['vector_msgpack_bytes']:.0f} B msgpack vs "
        f"{result['vector_arrow_ipc_bytes']:.0f} B Arrow IPC (decode "
        f"{result['vector_msgpack_decode_us']:.1f} vs {result['vector_arrow_ipc_decode_us']:.0f} µs); "
        f"state {result['state_msgpack_bytes']:.0f} B; history {result['history_msgpack_bytes']:.0f} B"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
