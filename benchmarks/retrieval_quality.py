"""Retrieval quality on real data by the published protocol, against baselines in the same run.

    python benchmarks/retrieval_quality.py --dataset ml-100k --json out.json
    python benchmarks/retrieval_quality.py --train train.txt --test test.txt --format lines --k 20

MovieLens (RecBole's protocol): every rating is an implicit interaction, each
user's interactions split at random 8:1:1 (:func:`features.splits.random_split`),
full ranking over all items with the user's training (and, at test time,
validation) items excluded; the model is selected on validation recall@K
(early stopping) and reported on test. Published reference (RecBole, BPR,
ML-100K): recall@10 0.2523, ndcg@10 0.2920.

Fixed files (``--format lines``: one line per user, ``user item item …``):
the given train and test files, items seen in either file, metrics at ``--k``;
validation for early stopping is a random 10% of each user's training lines.

Baselines in the same run: most-popular (training counts) and matrix
factorisation (``models.retrieval.kind = mf``, same trainer and loss).
Every mean comes with a 95% bootstrap CI over test users (``*_ci95``), and the
two-tower's gain over each baseline with a paired bootstrap CI of the per-user
difference (``vs_mf_recall@K``): a gain whose CI straddles 0 is not a gain.
``sampled_*`` keys rank each test item against 100 sampled unseen items
instead: optimistic, labelled, not comparable to the full-ranking numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name
# would shadow the `features` package: drop the folder before importing it.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import tempfile
import time

import numpy as np
import polars as pl
import torch

from features.sources.files import read_user_item_lines
from features.splits import Split, random_split
from infra.config import RayrecConfig, RetrievalConfig, load_config
from infra.ray_runtime import ensure_ray
from models.metrics import (
    RankingReport,
    bootstrap_ci,
    sampled_ranking_metrics,
)
from models.two_tower import TwoTowerModel
from pipelines.retrieval.data import RetrievalData, movielens_random_split, prepare_retrieval_data
from pipelines.retrieval.loop import (
    StepInputs,
    popularity_report,
    ranking_report,
    user_vectors,
)
from pipelines.retrieval.trainer import train_retrieval

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
SAMPLED_NEGATIVES = 100


def lines_split(train: Path, test: Path, seed: int) -> tuple[Split, pl.DataFrame, pl.DataFrame]:
    """Given train/test line files, one id map for both; valid: 10% of each user's train."""
    raw_train, _ = read_user_item_lines(train)
    raw_test, _ = read_user_item_lines(test)
    users = pl.concat([raw_train["user_id"], raw_test["user_id"]]).unique(maintain_order=True)
    items = pl.concat([raw_train["item_id"], raw_test["item_id"]]).unique(maintain_order=True)
    user_map = pl.DataFrame({"user_id": users, "_u": np.arange(users.len(), dtype=np.int64)})
    item_map = pl.DataFrame({"item_id": items, "_i": np.arange(items.len(), dtype=np.int64)})

    def encode(raw: pl.DataFrame) -> pl.DataFrame:
        return (
            raw.join(user_map, on="user_id")
            .join(item_map, on="item_id")
            .select(
                pl.col("_u").alias("user_id"),
                pl.col("_i").alias("item_id"),
                pl.from_epoch("ts", "s").alias("ts"),
            )
            .unique(["user_id", "item_id"], keep="first", maintain_order=True)
        )

    inner = random_split(encode(raw_train), (0.9, 0.05, 0.05), seed)
    train_part = pl.concat([inner.train, inner.test])
    split = Split(train_part, inner.valid, encode(raw_test), "given")
    return (
        split,
        pl.DataFrame({"user_id": np.arange(users.len(), dtype=np.int64)}),
        pl.DataFrame({"item_id": np.arange(items.len(), dtype=np.int64)}),
    )


def train_and_test(
    data: RetrievalData, config: RetrievalConfig, storage: Path, ks: tuple[int, ...]
) -> tuple[RankingReport, RankingReport, dict[str, object]]:
    """Train, then (full-ranking test report, sampled test report, training summary)."""
    trained = train_retrieval(data, config, storage)
    inputs = StepInputs(data, torch.device("cpu"))
    test = ranking_report(trained.model, data, inputs, ks, part="test")
    sampled = sampled_report(trained.model, data, inputs)
    info = {
        "best_epoch": trained.best_epoch,
        "epochs_run": len(trained.history),
        "train_s": round(trained.wall_s, 1),
        "median_samples_per_s": float(np.median([h["samples_per_s"] for h in trained.history])),
        "best_valid": trained.best_valid,
    }
    return test, sampled, info


@torch.no_grad()
def sampled_report(model: TwoTowerModel, data: RetrievalData, inputs: StepInputs) -> RankingReport:
    """Each test item against 100 uniformly sampled unseen items (the older, optimistic protocol)."""
    model.eval()
    items = model.all_item_vectors()

    def score(users: np.ndarray, candidates: np.ndarray) -> torch.Tensor:
        vectors = user_vectors(model, users, inputs.history)  # (B, D)
        return torch.einsum("bd,bcd->bc", vectors, items[torch.as_tensor(candidates)])

    return sampled_ranking_metrics(
        score, data.seen_for_test, data.test, data.n_items, n_negatives=SAMPLED_NEGATIVES, ks=(10,)
    )


def with_intervals(prefix: str, report: RankingReport, keys: tuple[str, ...]) -> dict[str, object]:
    """``prefix + key`` -> value and ``prefix + key + "_ci95"`` -> [low, high] (bootstrap over users)."""
    intervals = report.intervals or report.confidence_intervals()
    out: dict[str, object] = {}
    for key in keys:
        out[prefix + key] = report.metrics[key]
        out[prefix + key + "_ci95"] = list(intervals[key])
    return out


def paired_difference(a: RankingReport, b: RankingReport, key: str) -> dict[str, object]:
    """Mean per-user difference a - b of ``key`` with its paired bootstrap 95% CI."""
    if not np.array_equal(a.users, b.users):
        raise ValueError("the two reports rank different users")
    difference = a.per_user[key] - b.per_user[key]
    return {"mean": float(difference.mean()), "ci95": list(bootstrap_ci(difference))}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--train", type=Path)
    parser.add_argument("--test", type=Path)
    parser.add_argument("--format", choices=["lines"], default="lines")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="config override a.b=c")
    parser.add_argument("--skip-mf", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    config: RayrecConfig = load_config("default", overrides=args.set)
    retrieval = config.models.retrieval
    started = time.perf_counter()
    if args.train and args.test:
        split, users, items = lines_split(args.train, args.test, args.seed)
        source = f"{args.train.name} + {args.test.name}"
    else:
        split, users, items = movielens_random_split(DATASETS / args.dataset, args.seed)
        source = args.dataset
    n_users = int(max(p["user_id"].max() or 0 for p in (split.train, split.valid, split.test))) + 1  # type: ignore[operator]
    n_items = int(max(p["item_id"].max() or 0 for p in (split.train, split.valid, split.test))) + 1  # type: ignore[operator]
    data = prepare_retrieval_data(
        split, users, items, n_users, n_items, retrieval, config.features.sketches
    )
    k = args.k
    ks = tuple(sorted({k, 10, 20, 50}))
    ensure_ray(config.ray)
    results: dict[str, object] = {
        "dataset": source,
        "protocol": "random 8:1:1 per user, full ranking, seen items excluded"
        if not args.train
        else "given train/test files, full ranking over items in either file",
        "users": n_users,
        "items": n_items,
        "train": int(data.n_train),
        "test": int(data.test.indices.size),
    }
    with tempfile.TemporaryDirectory() as storage:
        model_test, model_sampled, model_info = train_and_test(
            data, retrieval, Path(storage) / "two_tower", ks
        )
        popular = popularity_report(data, ks)
        mf_test = mf_sampled = None
        mf_info: dict[str, object] = {}
        if not args.skip_mf:
            mf = retrieval.model_copy(update={"kind": "mf"})
            mf_test, mf_sampled, mf_info = train_and_test(data, mf, Path(storage) / "mf", ks)
    at_k = tuple(f"{name}@{k}" for name in ("recall", "ndcg", "mrr", "hit"))
    results.update(with_intervals("", model_test, at_k))
    results[f"precision@{k}"] = model_test.metrics[f"precision@{k}"]
    results[f"coverage@{k}"] = model_test.metrics[f"coverage@{k}"]
    results.update(with_intervals("popularity_", popular, at_k[:2]))
    # Sampled metrics (100 negatives) are optimistic and not comparable to full
    # ranking; reported, labelled, for papers that still use them.
    results.update(with_intervals("", model_sampled, ("sampled_recall@10", "sampled_ndcg@10")))
    results["sampled_negatives"] = SAMPLED_NEGATIVES
    results[f"vs_popularity_recall@{k}"] = paired_difference(model_test, popular, f"recall@{k}")
    if mf_test is not None and mf_sampled is not None:
        results.update(with_intervals("mf_", mf_test, at_k[:2]))
        results["mf_sampled_recall@10"] = mf_sampled.metrics["sampled_recall@10"]
        results[f"vs_mf_recall@{k}"] = paired_difference(model_test, mf_test, f"recall@{k}")
    results["recall_vs_popularity"] = results[f"recall@{k}"] / max(  # type: ignore[operator]
        popular.metrics[f"recall@{k}"], 1e-12
    )
    results["two_tower"] = model_info
    results["mf"] = mf_info
    results["wall_s"] = round(time.perf_counter() - started, 1)

    print(
        f"\nretrieval quality on {source} ({n_users} users, {n_items} items), metrics @{k} on test"
    )
    print(f"{'model':<14}{'recall':>9}{'ndcg':>9}{'mrr':>9}{'hit':>9}   recall 95% CI")
    rows = [("two_tower", model_test), ("popularity", popular)] + (
        [("mf", mf_test)] if mf_test is not None else []
    )
    for name, report in rows:
        metrics = report.metrics
        low, high = (report.intervals or report.confidence_intervals())[f"recall@{k}"]
        print(
            f"{name:<14}{metrics[f'recall@{k}']:>9.4f}{metrics[f'ndcg@{k}']:>9.4f}"
            f"{metrics[f'mrr@{k}']:>9.4f}{metrics[f'hit@{k}']:>9.4f}   [{low:.4f}, {high:.4f}]"
        )
    for name in ("vs_popularity", "vs_mf"):
        diff = results.get(f"{name}_recall@{k}")
        if isinstance(diff, dict):
            low, high = diff["ci95"]
            print(
                f"two_tower {name}: recall@{k} {diff['mean']:+.4f} (paired 95% CI {low:+.4f}, {high:+.4f})"
            )
    print(f"sampled (100 negatives, optimistic): recall@10 {results['sampled_recall@10']:.4f}")
    print(f"wall {results['wall_s']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
