"""A fixed train/test split in ``--format lines`` from the project's click-log simulator.

    python benchmarks/lines_dataset.py --out DIR [--users 30000] [--items 40000] [--clicks 1080000]

Writes ``DIR/train.txt`` and ``DIR/test.txt``: one line per user, ``user item
item …`` (the LightGCN / Gowalla layout that ``retrieval_quality.py --train
--test --format lines`` reads). Interactions are the simulator's distinct
(user, item) clicks; each user's clicks split at random 80:20, users with one
click only kept in train. The defaults give a dataset of Gowalla's shape
(~30k users × 40k items, ~800k training interactions), used to prove the
lines path runs to completion on a 2-core machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import time

import numpy as np
import polars as pl

from features.simulator import ClickLogSimulator
from infra.config import load_config


def simulate_clicks(users: int, items: int, clicks: int, seed: int) -> pl.DataFrame:
    """Distinct ``user_id, item_id`` clicks of a simulated log, about ``clicks`` of them."""
    config = load_config(
        "default",
        overrides=[
            f"simulator.n_users={users}",
            f"simulator.n_items={items}",
            f"simulator.seed={seed}",
            # The default 28 days; ~10% CTR and few repeated (user, item) clicks:
            # ~10 impressions per distinct click.
            f"simulator.impressions_per_day={clicks * 10 // 28}",
            # A flatter popularity than the default, so the catalogue's tail gets clicks too.
            "simulator.zipf_exponent=0.3",
            "simulator.initial_item_fraction=0.95",
        ],
    ).simulator
    parts = [
        chunk.filter((pl.col("event_type") == "impression") & (pl.col("label") == 1.0)).select(
            "user_id", "item_id"
        )
        for chunk in ClickLogSimulator(config).iter_event_chunks()
    ]
    return pl.concat(parts).unique(maintain_order=True)


def split_lines(clicks: pl.DataFrame, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per-user random 80:20 of the clicks -> (train, test) as ``user, items`` lists."""
    rng = np.random.default_rng(seed)
    shuffled = clicks.with_columns(pl.Series("r", rng.random(clicks.height))).sort("user_id", "r")
    ranked = shuffled.with_columns(
        pl.int_range(pl.len()).over("user_id").alias("rank"),
        pl.len().over("user_id").alias("n"),
    )
    in_test = (pl.col("n") >= 2) & (pl.col("rank") < (pl.col("n") * 0.2).ceil())
    grouped = {
        name: part.group_by("user_id", maintain_order=True).agg(pl.col("item_id"))
        for name, part in (
            ("train", ranked.filter(~in_test)),
            ("test", ranked.filter(in_test)),
        )
    }
    return grouped["train"], grouped["test"]


def write_lines(frame: pl.DataFrame, path: Path) -> None:
    lines = frame.select(
        pl.concat_str(
            pl.col("user_id").cast(pl.String),
            pl.col("item_id").cast(pl.List(pl.String)).list.join(" "),
            separator=" ",
        )
    ).to_series()
    path.write_text("\n".join(lines.to_list()) + "\n")


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--users", type=int, default=30_000)
    parser.add_argument("--items", type=int, default=40_000)
    parser.add_argument("--clicks", type=int, default=1_080_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    clicks = simulate_clicks(args.users, args.items, args.clicks, args.seed)
    train, test = split_lines(clicks, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_lines(train, args.out / "train.txt")
    write_lines(test, args.out / "test.txt")
    summary = {
        "users": clicks["user_id"].n_unique(),
        "items": clicks["item_id"].n_unique(),
        "train_interactions": int(train["item_id"].list.len().sum()),
        "test_interactions": int(test["item_id"].list.len().sum()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
