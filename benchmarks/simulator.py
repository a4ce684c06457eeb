"""Click-log simulator throughput and memory, against writing random rows with pyarrow.

    python benchmarks/simulator.py --events 20000000 --json out.json

The main figure is one run of ``ClickLogSimulator.write`` at ``--events``
impressions (the rows written also include the rating rows), with the process's
peak RSS taken right after it. The baseline writes the same number of random
rows of the events contract with pyarrow, in the same chunks, codec and thread
count: the ratio is the cost of simulating over the cost of just writing.
Smaller runs are repeated (medians) for both codecs and for generation alone.
Output goes to a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.simulator import ClickLogSimulator
from features.simulator.log import EVENTS_ARROW_SCHEMA
from infra.config import SimulatorConfig, load_config
from infra.storage import StoragePath

N_DAYS = 10


def bench_config(events: int, compression: str) -> SimulatorConfig:
    """The `default` world, sized to ``events`` impressions over ten days, one drift."""
    base = load_config("default", environ={}).simulator.model_dump()
    base.update(
        n_days=N_DAYS,
        impressions_per_day=max(1, events // N_DAYS),
        compression=compression,
        drifts=[{"kind": "popularity_shock", "day": N_DAYS // 2, "strength": 0.02}],
    )
    return SimulatorConfig.model_validate(base)


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    start = time.perf_counter()
    rows = fn()
    return rows, time.perf_counter() - start


def run_simulator(config: SimulatorConfig, threads: int) -> tuple[int, float]:
    sim = ClickLogSimulator(config, threads=threads)  # world set-up is timed too
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        return timed(lambda: sim.write(StoragePath.from_uri(tmp))["events"])


def run_generate_only(config: SimulatorConfig, threads: int) -> tuple[int, float]:
    sim = ClickLogSimulator(config, threads=threads)
    return timed(lambda: sum(chunk.height for chunk in sim.iter_event_chunks()))


def random_chunk(rng: np.random.Generator, rows: int) -> pa.Table:
    """Random rows of the events contract, all impressions (no simulation at all)."""
    offsets = np.arange(rows + 1, dtype=np.int32) * 10
    return pa.Table.from_arrays(
        [
            pa.array(rng.integers(0, 20_000, rows)),
            pa.array(rng.integers(0, 5_000, rows)),
            pa.array(np.sort(rng.integers(1_767_225_600, 1_768_089_600, rows)) * 1_000_000).view(
                pa.timestamp("us", tz="UTC")
            ),
            pa.Array.from_buffers(
                pa.string(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(b"impression" * rows)]
            ),
            pa.array((rng.random(rows) < 0.1).astype(np.float64)),
            pa.array(rng.integers(0, 10, rows, dtype=np.int32)),
            pa.array(np.arange(rows, dtype=np.int64) // 10),
            pa.array(rng.random(rows)),
            pa.nulls(rows, pa.float64()),
        ],
        schema=EVENTS_ARROW_SCHEMA,
    )


def run_baseline(rows: int, chunk_rows: int, compression: str, threads: int) -> tuple[int, float]:
    """Write ``rows`` random canonical rows: chunks of ``chunk_rows``, one file each."""
    sizes = [min(chunk_rows, rows - lo) for lo in range(0, rows, chunk_rows)]

    def write_all(folder: str) -> int:
        def one(job: tuple[int, int]) -> int:
            index, size = job
            table = random_chunk(np.random.default_rng(index), size)
            pq.write_table(table, f"{folder}/part-{index:05d}.parquet", compression=compression)
            return size

        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(one, enumerate(sizes)))

    with tempfile.TemporaryDirectory(prefix="bench-base-") as tmp:
        return timed(lambda: write_all(tmp))


def median_of(repeats: int, fn: Callable[[], tuple[int, float]]) -> tuple[int, float]:
    runs = [fn() for _ in range(repeats)]
    return runs[0][0], statistics.median(seconds for _, seconds in runs)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000_000, help="impressions, main run")
    parser.add_argument("--small-events", type=int, default=2_000_000, help="repeated runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--compression", choices=("zstd", "snappy"), default="zstd")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    config = bench_config(args.events, args.compression)
    events, seconds = run_simulator(config, args.threads)
    rss = peak_rss_mb()  # before anything else can raise the peak
    base_rows, base_seconds = run_baseline(
        events, config.chunk_rows, args.compression, args.threads
    )

    rows: list[tuple[str, int, float]] = [
        (f"simulator write, {args.compression}", events, seconds),
        (f"baseline pyarrow write, {args.compression}", base_rows, base_seconds),
    ]
    small_rates: dict[str, float] = {}
    for codec in ("zstd", "snappy"):
        small = bench_config(args.small_events, codec)
        n, t = median_of(args.repeats, lambda s=small: run_simulator(s, args.threads))
        rows.append((f"simulator write, {codec} (median of {args.repeats})", n, t))
        small_rates[f"simulator write, {codec}"] = n / t
        # The baseline writes exactly as many rows as the simulator did.
        n, t = median_of(
            args.repeats,
            lambda n=n, s=small, c=codec: run_baseline(n, s.chunk_rows, c, args.threads),
        )
        rows.append((f"baseline pyarrow write, {codec} (median of {args.repeats})", n, t))
        small_rates[f"baseline pyarrow write, {codec}"] = n / t
    gen = bench_config(args.small_events, args.compression)
    n, t = median_of(args.repeats, lambda: run_generate_only(gen, args.threads))
    rows.append((f"simulator generate only (median of {args.repeats})", n, t))

    print(f"{'case':<48} {'events':>12} {'seconds':>9} {'events/s':>12}")
    for label, n, t in rows:
        print(f"{label:<48} {n:>12,} {t:>9.2f} {n / t:>12,.0f}")
    ratio = (events / seconds) / (base_rows / base_seconds)
    print(
        f"peak RSS after the main run: {rss:,.0f} MB; simulator / baseline throughput: {ratio:.2f}"
    )

    result = {
        "events": events,
        "seconds": seconds,
        "events_per_s": events / seconds,
        "peak_rss_mb": rss,
        "baseline_events_per_s": base_rows / base_seconds,
        "ratio_to_baseline": ratio,
        "compression": args.compression,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "chunk_rows": config.chunk_rows,
        "small_runs_events_per_s": small_rates,
        "rows": [{"case": label, "events": n, "seconds": t} for label, n, t in rows],
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
