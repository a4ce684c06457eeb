"""Feature aggregation speed and memory: polars engine, ray engine, plain pandas.

    python benchmarks/features.py --events 10000000 --partitions 8 --json out.json

The workload is the mergeable part of the feature build, on simulated events
read from Parquet: user and item day buckets (:func:`aggregate_events`), then
the latest feature vectors (:func:`entity_features`). The baseline is a plain
pandas implementation of the same aggregations, measured in the same run on
the same files; all three outputs are checked equal before any time counts.
Ray start-up is excluded from the ray engine's time (it is paid once per
cluster, not per build). Sketch accuracy (HLL relative error, Count-Min
under/over-estimates) is measured on the same events when the sketch module
is present.

The whole feature build (training frame, spec, sketches, written outputs) is
measured twice more, each in a fresh subprocess so one's peak RSS cannot mask
the other's: in memory (``features.partitions = 1``, the baseline) and out of
core (``--partitions``). Their written examples and specs are checked equal
(one day file at a time) before the figures are reported.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name
# would shadow the `features` package: drop the folder before importing it.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import datetime as dt
import json
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import polars as pl

from features.aggregates import aggregate_events, entity_features, prior_from_buckets
from features.build import (
    build_features,
    build_features_out_of_core,
    end_of_log,
    write_feature_outputs,
)
from features.dataset import read_events, read_table
from features.simulator import ClickLogSimulator
from infra.config import RayConfig, SimulatorConfig, load_config
from infra.storage import StoragePath

WINDOWS = (1, 7, 30)
STRENGTH = 20.0
N_DAYS = 28


def peak_rss_mb() -> float:
    """This process's peak resident memory.

    Linux: ``VmHWM``, the high-water mark of this process's own address
    space. ``ru_maxrss`` survives fork + exec, so a subprocess started by a
    large parent would report at least the parent's RSS at the fork.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def simulate(events: int, folder: Path) -> StoragePath:
    base = load_config("default", environ={}).simulator.model_dump()
    base.update(n_days=N_DAYS, impressions_per_day=max(1, events // N_DAYS), drifts=[])
    target = StoragePath.from_uri(folder)
    ClickLogSimulator(SimulatorConfig.model_validate(base)).write(target)
    return target


def polars_engine(data: StoragePath) -> dict[str, pl.DataFrame]:
    events = read_events(data)
    as_of = end_of_log(events)
    buckets = {e: aggregate_events(events, e) for e in ("user", "item")}
    prior = prior_from_buckets(buckets["user"], STRENGTH)
    return {e: entity_features(b, as_of, WINDOWS, prior) for e, b in buckets.items()}


def ray_engine(data: StoragePath) -> dict[str, pl.DataFrame]:
    from features.ray_engine import aggregate_on_ray, event_files

    buckets = aggregate_on_ray(event_files(data))
    as_of = end_of_log(read_events(data))
    prior = prior_from_buckets(buckets["user"], STRENGTH)
    return {e: entity_features(b, as_of, WINDOWS, prior) for e, b in buckets.items()}


def pandas_engine(data: StoragePath) -> dict[str, pd.DataFrame]:
    """The same aggregations written the plain pandas way: read, groupby, sum."""
    files = sorted(str(p) for p in data.local_path().joinpath("events").rglob("*.parquet"))
    events = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    as_of = events["ts"].max() + pd.Timedelta(microseconds=1)
    events["day"] = events["ts"].dt.floor("D")
    impression = events["event_type"] == "impression"
    positive = events["label"].fillna(0.0) > 0
    events["impressions"] = impression.astype("int64")
    events["clicks"] = ((impression & positive) | (events["event_type"] == "click")).astype("int64")
    events["positives"] = positive.astype("int64")
    events["events"] = 1
    events["value"] = events["value"].fillna(0.0)
    out = {}
    prior_rate = None
    for entity, key in (("user", "user_id"), ("item", "item_id")):
        buckets = events.groupby([key, "day"], sort=True).agg(
            events=("events", "sum"), impressions=("impressions", "sum"), clicks=("clicks", "sum"),
            positives=("positives", "sum"), first_ts=("ts", "min"), last_ts=("ts", "max"),
        ).reset_index()  # fmt: skip
        if prior_rate is None:
            prior_rate = buckets["clicks"].sum() / buckets["impressions"].sum()
        today = as_of.floor("D")
        columns = {}
        grouped = buckets.groupby(key, sort=True)
        for w in WINDOWS:
            inside = buckets["day"] > today - pd.Timedelta(days=w)
            for c in ("events", "impressions", "clicks", "positives"):
                columns[f"{c}_{w}d"] = (buckets[c] * inside).groupby(buckets[key]).sum()
        for c in ("events", "impressions", "clicks", "positives"):
            columns[f"{c}_total"] = grouped[c].sum()
        frame = pd.DataFrame(columns)
        frame["ctr_smoothed"] = (frame["clicks_total"] + STRENGTH * prior_rate) / (
            frame["impressions_total"] + STRENGTH
        )
        frame["positive_rate"] = (frame["positives_total"] + STRENGTH * prior_rate) / (
            frame["events_total"] + STRENGTH
        )
        frame["seconds_since_last"] = (as_of - grouped["last_ts"].max()).dt.total_seconds()
        frame["seconds_since_first"] = (as_of - grouped["first_ts"].min()).dt.total_seconds()
        out[entity] = frame.reset_index()
    return out


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def check_equal(ours: dict[str, pl.DataFrame], theirs: dict[str, pl.DataFrame], name: str) -> None:
    for entity in ("user", "item"):
        a, b = ours[entity], theirs[entity]
        if a.columns != b.columns or a.height != b.height:
            raise SystemExit(f"{name} {entity}: shape or columns differ")
        for column in a.columns:
            x, y = a.get_column(column).to_numpy(), b.get_column(column).to_numpy()
            if not np.allclose(
                x.astype(float), y.astype(float), rtol=1e-9, atol=1e-6, equal_nan=True
            ):
                raise SystemExit(f"{name} {entity}.{column} differs from the polars engine")


def sketch_accuracy(data: StoragePath) -> dict[str, float]:
    """HLL and Count-Min against exact counts on the same events.

    HLL: distinct users per UTC day (DAU; thousands per day, the dense regime
    where the 1.04/sqrt(2^lgK) bound applies), the worst day's relative error.
    Count-Min: item frequencies over the whole log; it may overestimate by at
    most epsilon * N (with probability 1 - delta) and must never underestimate.
    """
    from features.sketches import (
        CmsConfig,
        HllConfig,
        cms_estimates,
        cms_from_events,
        daily_active_users,
        hll_relative_standard_error,
    )

    settings = load_config("default", environ={}).features.sketches
    events = read_events(data).select("user_id", "item_id", "ts").collect()
    dau = daily_active_users(events, HllConfig.from_settings(settings))
    exact_dau = events.group_by(pl.col("ts").dt.date().alias("day")).agg(
        pl.col("user_id").n_unique().alias("exact")
    )
    joined = dau.join(exact_dau, on="day")
    hll_errors = ((joined["dau_estimate"] - joined["exact"]).abs() / joined["exact"]).to_numpy()
    cms_config = CmsConfig.from_settings(settings)
    exact = events.group_by("item_id").len()
    estimates = cms_estimates(cms_from_events(events, cms_config), exact["item_id"].to_numpy())
    over = estimates - exact["len"].to_numpy()
    bound = settings.cms_epsilon * events.height
    return {
        "hll_rel_error": float(hll_errors.max()),
        "hll_rel_error_median": float(np.median(hll_errors)),
        "hll_rel_error_bound": 3 * hll_relative_standard_error(settings.hll_lg_k),
        "cms_underestimates": float((over < 0).sum()),
        "cms_max_overestimate": float(over.max()),
        "cms_max_overestimate_ratio": float(over.max() / bound),
    }


def whole_build(data: Path, out: Path, partitions: int) -> dict[str, float]:
    """The ``features`` step's work (build + write) on ``data``; run in a subprocess.

    ``partitions`` 1 builds in memory, more builds out of core. Returns the
    seconds and this process's peak RSS.
    """
    config = load_config("default", [f"features.partitions={partitions}"], environ={}).features
    source, target = StoragePath.from_uri(data), StoragePath.from_uri(out)
    users = read_table(source.join("users.parquet"))
    items = read_table(source.join("items.parquet"))
    start = time.perf_counter()
    if partitions > 1:
        outputs = build_features_out_of_core(read_events(source), users, items, config, target)
    else:
        outputs = build_features(read_events(source), users, items, config)
    counts = write_feature_outputs(outputs, target)
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
        "examples": counts["examples"],
    }


def whole_build_in_subprocess(data: Path, out: Path, partitions: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(partitions), str(data), str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_same_build(ours: Path, theirs: Path) -> int:
    """Equal specs, and equal examples file by file (one day in memory at a time)."""
    if (ours / "feature_spec.json").read_text() != (theirs / "feature_spec.json").read_text():
        raise SystemExit("out of core: the feature spec differs from the in-memory build")
    files = sorted(p.relative_to(ours) for p in (ours / "examples").rglob("*.parquet"))
    other = sorted(p.relative_to(theirs) for p in (theirs / "examples").rglob("*.parquet"))
    if files != other:
        raise SystemExit("out of core: the example files differ from the in-memory build")
    for name in files:
        if not pl.read_parquet(ours / name).equals(pl.read_parquet(theirs / name)):
            raise SystemExit(f"out of core: {name} differs from the in-memory build")
    return len(files)


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["--child"]:
        partitions, data, out = raw[1:4]
        print(json.dumps(whole_build(Path(data), Path(out), int(partitions))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--partitions", type=int, default=8, help="entity partitions of the out-of-core build"
    )
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(raw)
    if args.partitions < 2:
        parser.error("--partitions must be at least 2 (1 is the in-memory baseline)")

    with tempfile.TemporaryDirectory(prefix="rayrec-bench-") as tmp:
        data = simulate(args.events, Path(tmp) / "data")
        n_events = read_events(data).select(pl.len()).collect().item()
        polars_s, polars_out = timed(lambda: polars_engine(data), args.repeats)
        rss_after_polars = peak_rss_mb()
        pandas_s, pandas_out = timed(
            lambda: pandas_engine(data), 1 if args.events > 5_000_000 else args.repeats
        )
        check_equal(polars_out, {k: pl.from_pandas(v) for k, v in pandas_out.items()}, "pandas")  # type: ignore[union-attr]
        del pandas_out

        from infra.ray_runtime import ensure_ray

        started = time.perf_counter()
        ensure_ray(RayConfig(num_cpus=2, object_store_memory_mb=1024))
        ray_start_s = time.perf_counter() - started
        ray_s, ray_out = timed(lambda: ray_engine(data), args.repeats)
        check_equal(polars_out, ray_out, "ray")  # type: ignore[arg-type]
        sketches = sketch_accuracy(data)
        del polars_out, ray_out

        # The whole build, each in its own process: in memory first (the baseline).
        root = data.local_path()
        in_memory = whole_build_in_subprocess(root, Path(tmp) / "in_memory", 1)
        out_of_core = whole_build_in_subprocess(root, Path(tmp) / "out_of_core", args.partitions)
        days = check_same_build(Path(tmp) / "out_of_core", Path(tmp) / "in_memory")

    result = {
        "events": n_events,
        "polars_s": polars_s,
        "pandas_s": pandas_s,
        "ray_s": ray_s,
        "ray_start_s": ray_start_s,
        "events_per_s": n_events / polars_s,
        "pandas_over_polars": pandas_s / polars_s,
        "ray_over_polars": ray_s / polars_s,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_after_polars_mb": rss_after_polars,
        "examples": in_memory["examples"],
        "partitions": args.partitions,
        "polars_build_s": in_memory["seconds"],
        "polars_peak_rss_mb": in_memory["peak_rss_mb"],
        "out_of_core_s": out_of_core["seconds"],
        "out_of_core_peak_rss_mb": out_of_core["peak_rss_mb"],
        "out_of_core_over_polars_build": out_of_core["seconds"] / in_memory["seconds"],
        "out_of_core_rss_ratio": out_of_core["peak_rss_mb"] / in_memory["peak_rss_mb"],
        "measured_at": dt.datetime.now(dt.UTC).isoformat(),
        **sketches,
    }
    print(f"{'case':<34}{'seconds':>10}{'events/s':>14}{'vs polars':>11}")
    for name, key in (
        ("polars engine", "polars_s"),
        ("pandas (baseline)", "pandas_s"),
        ("ray engine (start-up excluded)", "ray_s"),
    ):
        seconds = result[key]
        print(f"{name:<34}{seconds:>10.2f}{n_events / seconds:>14,.0f}{seconds / polars_s:>10.2f}x")
    print(f"events: {n_events:,}; ray start-up {ray_start_s:.1f} s; peak RSS {result['peak_rss_mb']:.0f} MB "
          f"(after polars only: {rss_after_polars:.0f} MB)")  # fmt: skip
    print()
    print(f"{'whole build (own process)':<34}{'seconds':>10}{'peak RSS MB':>14}{'vs memory':>11}")
    for name, run in (
        ("in memory (partitions 1)", in_memory),
        (f"out of core (partitions {args.partitions})", out_of_core),
    ):
        print(
            f"{name:<34}{run['seconds']:>10.2f}{run['peak_rss_mb']:>14,.0f}"
            f"{run['peak_rss_mb'] / in_memory['peak_rss_mb']:>10.2f}x"
        )
    print(f"{in_memory['examples']:,} examples in {days} day files, equal in both builds")
    for key, value in sketches.items():
        print(f"{key}: {value:.4g}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
