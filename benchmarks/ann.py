"""Candidate index speed and recall: exact search against HNSW and IVF on the same vectors.

    python benchmarks/ann.py --items 1000000 --dim 64 --json out.json [--kinds exact,hnsw,ivf]

Item vectors come from a seeded Gaussian mixture on the unit sphere
(:class:`models.index.EmbeddingMixture`, ``sqrt(items)`` clusters), the usual
stand-in for learned embeddings; ``--queries`` queries are fresh draws from the
same mixture (users near item clusters); ``--clusters`` and ``--spread`` make it harder. Ground truth is exact search in one
batch. Per kind, built from ``models.index`` with the ``default`` preset's
``models.index`` settings (overridable below):

* ``build_s``: wall time of the build (training included);
* ``p50_ms`` / ``p99_ms``: one query at a time (the serving path), medians
  over ``--queries`` calls after a warm-up; ``p50_ms_exclude``: with the
  query's ``--exclude`` nearest items excluded (a user's seen items);
* ``batch_qps``: queries per second in batches of ``--batch``, median of 3;
* ``recall@K``: mean share of the exact top ``--k`` found;
* ``index_mb``: size of the saved index (vectors + graph or codes + ids).

The baseline is the exact kind measured in the same run: ``p50_vs_exact`` and
``qps_vs_exact`` are ratios to it. ``--sweep`` also reports HNSW at other
``ef_search`` and IVF at other ``nprobe`` values (same build).
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
import os
import resource
import statistics
import tempfile
import time
from typing import Any

import faiss
import numpy as np

from infra.config import IndexConfig, load_config
from models.index import (
    CandidateIndex,
    EmbeddingMixture,
    ExactIndex,
    HnswIndex,
    IvfIndex,
    build_index,
    measure_recall,
)

KINDS = ("exact", "hnsw", "ivf")
WARMUP = 20


def peak_rss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / 2**20


def single_query_ms(
    index: CandidateIndex, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> list[float]:
    """Latency of each query searched alone, in ms (after ``WARMUP`` untimed calls)."""
    for q in queries[:WARMUP]:
        index.search(q[None], k)
    times = []
    for i, q in enumerate(queries):
        rows = None if exclude is None else [exclude[i]]
        start = time.perf_counter()
        index.search(q[None], k, exclude=rows)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def batch_qps(index: CandidateIndex, queries: np.ndarray, k: int, batch: int) -> float:
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for b in range(0, len(queries), batch):
            index.search(queries[b : b + batch], k)
        rates.append(len(queries) / (time.perf_counter() - start))
    return statistics.median(rates)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(
    index: CandidateIndex,
    oracle: ExactIndex,
    queries: np.ndarray,
    k: int,
    batch: int,
    exclude: np.ndarray | None,
) -> dict[str, float]:
    """Latency, throughput and recall of ``index`` at its current search settings."""
    times = single_query_ms(index, queries, k)
    result = {
        f"recall@{k}": measure_recall(index, oracle, queries, k) if index is not oracle else 1.0,
        "p50_ms": statistics.median(times),
        "p99_ms": percentile(times, 99),
        "batch_qps": batch_qps(index, queries, k, batch),
    }
    if exclude is not None:
        result["p50_ms_exclude"] = statistics.median(single_query_ms(index, queries, k, exclude))
    return result


def sweep(
    index: CandidateIndex, oracle: ExactIndex, queries: np.ndarray, k: int, values: list[int]
) -> list[dict[str, float]]:
    """Recall and single-query latency at other search breadths (ef_search or nprobe)."""
    rows = []
    if isinstance(index, HnswIndex):
        name, original = "ef_search", index.ef_search
    elif isinstance(index, IvfIndex):
        name, original = "nprobe", index.nprobe
    else:
        return rows
    for value in values:
        setattr(index, name, value)
        times = single_query_ms(index, queries, k)
        rows.append(
            {
                name: value,
                f"recall@{k}": measure_recall(index, oracle, queries, k),
                "p50_ms": statistics.median(times),
                "p99_ms": percentile(times, 99),
            }
        )
    setattr(index, name, original)
    return rows


def index_config(args: argparse.Namespace) -> IndexConfig:
    base = load_config("default", environ={}).models.index
    update = {
        key: value
        for key, value in {
            "hnsw_m": args.hnsw_m,
            "hnsw_ef_construction": args.ef_construction,
            "hnsw_ef_search": args.ef_search,
            "ivf_nlist": args.nlist,
            "ivf_nprobe": args.nprobe,
            "refine_factor": args.refine_factor,
        }.items()
        if value is not None
    }
    return IndexConfig.model_validate({**base.model_dump(), **update})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument(
        "--spread", type=float, default=1.0, help="mixture noise (1: cos 0.5 within a cluster)"
    )
    parser.add_argument("--clusters", type=int, help="mixture clusters (default sqrt(items))")
    parser.add_argument(
        "--exclude", type=int, default=50, help="nearest items excluded per query (0: skip)"
    )
    parser.add_argument("--hnsw-m", type=int)
    parser.add_argument("--ef-construction", type=int)
    parser.add_argument("--ef-search", type=int)
    parser.add_argument("--nlist", type=int)
    parser.add_argument("--nprobe", type=int)
    parser.add_argument("--refine-factor", type=int)
    parser.add_argument("--sweep", action="store_true", help="also try other ef_search / nprobe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown} (known: {', '.join(KINDS)})")
    config = index_config(args)

    started = time.perf_counter()
    clusters = args.clusters or max(1, round(np.sqrt(args.items)))
    mixture = EmbeddingMixture.random(clusters, args.dim, args.spread, args.seed)
    ids = np.arange(args.items, dtype=np.int64)
    vectors = mixture.sample(args.items, seed=args.seed + 1)
    queries = mixture.sample(args.queries, seed=args.seed + 2)
    data_s = time.perf_counter() - started
    oracle = ExactIndex(ids, vectors)
    started = time.perf_counter()
    _, truth = oracle.search(queries, max(args.k, args.exclude))
    truth_s = time.perf_counter() - started
    exclude = truth[:, : args.exclude] if args.exclude > 0 else None

    result: dict[str, Any] = {
        "items": args.items,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "batch": args.batch,
        "spread": args.spread,
        "clusters": clusters,
        "exclude": args.exclude,
        "index_config": config.model_dump(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "cpus": os.cpu_count(),
        "data_s": data_s,
        "ground_truth_s": truth_s,
    }
    for kind in kinds:
        started = time.perf_counter()
        kind_config = config.model_copy(update={"kind": kind})
        index = oracle if kind == "exact" else build_index(ids, vectors, kind_config, args.seed)
        build_s = 0.0 if kind == "exact" else time.perf_counter() - started
        with tempfile.TemporaryDirectory(prefix="rayrec-ann-") as tmp:
            index.save(Path(tmp))
            size_mb = folder_mb(Path(tmp))
        entry: dict[str, Any] = {"build_s": build_s, "index_mb": size_mb, "params": index.params()}
        entry.update(measure(index, oracle, queries, args.k, args.batch, exclude))
        if args.sweep:
            values = {"hnsw": [32, 64, 100, 128, 192, 256, 384], "ivf": [4, 8, 16, 32, 64, 128]}
            entry["sweep"] = sweep(index, oracle, queries, args.k, values.get(kind, []))
        result[kind] = entry
        print(f"{kind}: done ({entry['p50_ms']:.3f} ms p50)", flush=True)
        if kind != "exact":
            del index
    if "exact" in result:
        base = result["exact"]
        for kind in kinds:
            result[kind]["p50_vs_exact"] = result[kind]["p50_ms"] / base["p50_ms"]
            result[kind]["qps_vs_exact"] = result[kind]["batch_qps"] / base["batch_qps"]
    result["peak_rss_mb"] = peak_rss_mb()
    result["measured_at"] = dt.datetime.now(dt.UTC).isoformat()

    recall_key = f"recall@{args.k}"
    print(
        f"\n{args.items:,} items x {args.dim} ({clusters:,} clusters, spread {args.spread}), "
        f"{args.queries:,} queries, k={args.k}, "
        f"{result['cpus']} cpus, faiss threads {result['faiss_threads']}"
    )
    print(
        f"{'kind':<7}{'build s':>9}{recall_key:>12}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'p50 excl':>10}{'vs exact':>10}{'batch qps':>11}{'index MB':>10}"
    )
    for kind in kinds:
        e = result[kind]
        print(
            f"{kind:<7}{e['build_s']:>9.1f}{e[recall_key]:>12.4f}{e['p50_ms']:>9.3f}{e['p99_ms']:>9.3f}"
            f"{e.get('p50_ms_exclude', float('nan')):>10.3f}"
            f"{e.get('p50_vs_exact', float('nan')):>9.3f}x{e['batch_qps']:>11,.0f}{e['index_mb']:>10.0f}"
        )
        for row in e.get("sweep", []):
            knob = next(iter(row))
            print(
                f"  {knob}={row[knob]:<6}{row[recall_key]:>14.4f}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}"
            )
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB; ground truth {truth_s:.1f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
