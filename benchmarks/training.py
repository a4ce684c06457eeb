"""Two-tower training throughput: a raw torch loop against the same step inside Ray Train.

    python benchmarks/training.py --json out.json [--epochs 5] [--batch 1024] [--dim 64]

Same data (MovieLens-100K training pairs, RecBole split), same model, same
:func:`pipelines.retrieval.loop.train_step`, same run. The raw loop is the
baseline: shuffled index batches straight from tensors. Ray Train runs one
CPU worker fed by a Ray Data shard; its steady-state rate is the median of
its per-epoch rates after the first epoch, and its fixed overhead is the wall
time not explained by that rate (start-up, dataset set-up, checkpoints,
validation). The in-batch loss alone (random vectors, no towers) is timed too:
the ceiling of any model's step at this batch size on this machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import statistics
import tempfile
import time

import torch

from infra.config import load_config
from infra.ray_runtime import ensure_ray
from models.optimizers import SparseDenseAdam
from models.retrieval_task import RetrievalTask
from pipelines.retrieval.data import movielens_random_split, prepare_retrieval_data
from pipelines.retrieval.loop import StepInputs, build_model, seed_everything, train_step
from pipelines.retrieval.trainer import train_retrieval

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def raw_rates(data, config, epochs: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Samples/s of each epoch of a plain loop over shuffled index batches."""
    seed_everything(config.seed)
    model = build_model(config, data)
    optimizer = SparseDenseAdam(model, config.learning_rate, config.weight_decay)
    task = RetrievalTask(config.temperature, config.logq_correction)
    inputs = StepInputs(data, torch.device("cpu"))
    generator = torch.Generator().manual_seed(config.seed)
    users = torch.as_tensor(data.train_users)
    items = torch.as_tensor(data.train_items)
    rates = []
    for _ in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(users.numel(), generator=generator)
        for batch in order.split(config.batch_size):
            if batch.numel() < 2:
                continue
            train_step(
                model, task, optimizer, users[batch], items[batch], inputs, config, generator
            )
        rates.append(users.numel() / (time.perf_counter() - started))
    return rates


def loss_only_rate(batch: int, dim: int, temperature: float, steps: int = 60) -> float:
    """Samples/s of the in-batch loss alone (forward + backward on random unit vectors).

    The ceiling of any two-tower step at this batch size on this machine: the
    B×B logits, their logQ correction, masking and softmax cost this much even
    with towers that cost nothing.
    """
    generator = torch.Generator().manual_seed(0)
    users = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=1)
    items = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=1)
    users.requires_grad_()
    items.requires_grad_()
    ids = torch.randint(0, 10 * batch, (batch,), generator=generator)
    log_q = torch.randn(batch, generator=generator)
    task = RetrievalTask(temperature)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        task(users, items, ids, log_q).backward()
        times.append(time.perf_counter() - started)
    return batch / statistics.median(times[5:])


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config = load_config(
        "default",
        overrides=[
            f"models.retrieval.batch_size={args.batch}",
            f"models.retrieval.embedding_dim={args.dim}",
            f"models.retrieval.epochs={args.epochs}",
            f"models.retrieval.patience={args.epochs}",
            *args.set,
        ],
    )
    retrieval = config.models.retrieval
    split, users, items = movielens_random_split(DATASETS / "ml-100k", 0)
    n_users = int(users["user_id"].max()) + 1  # type: ignore[arg-type]
    n_items = int(items["item_id"].max()) + 1  # type: ignore[arg-type]
    data = prepare_retrieval_data(
        split, users, items, n_users, n_items, retrieval, config.features.sketches
    )
    raw = raw_rates(data, retrieval, args.epochs)
    loss_only = loss_only_rate(args.batch, args.dim, retrieval.temperature)
    ensure_ray(config.ray)
    with tempfile.TemporaryDirectory() as storage:
        started = time.perf_counter()
        trained = train_retrieval(data, retrieval, Path(storage))
        wall = time.perf_counter() - started
    ray_rates = [h["samples_per_s"] for h in trained.history]
    steady = statistics.median(ray_rates[1:] or ray_rates)
    raw_steady = statistics.median(raw[1:] or raw)
    results = {
        "samples": data.n_train,
        "epochs": args.epochs,
        "batch_size": args.batch,
        "dim": args.dim,
        "raw_samples_per_s": raw_steady,
        "ray_train_samples_per_s": steady,
        "ray_train_ratio": steady / raw_steady,
        "loss_only_samples_per_s": loss_only,
        "ray_train_fixed_overhead_s": wall - data.n_train * len(ray_rates) / steady,
        "ray_train_wall_s": wall,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"\ntwo-tower training, {data.n_train} samples, batch {args.batch}, dim {args.dim}")
    print(f"{'loop':<12}{'samples/s':>12}{'ratio':>8}")
    print(f"{'raw torch':<12}{raw_steady:>12.0f}{1.0:>8.2f}")
    print(f"{'ray train':<12}{steady:>12.0f}{steady / raw_steady:>8.2f}")
    print(
        f"{'loss only':<12}{loss_only:>12.0f}{loss_only / raw_steady:>8.2f}  (ceiling: towers free)"
    )
    print(f"ray train fixed overhead {results['ray_train_fixed_overhead_s']:.1f} s of {wall:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
