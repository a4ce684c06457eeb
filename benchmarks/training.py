"""Training throughput: the two-tower raw loop against Ray Train, and the reranker kinds.

    python benchmarks/training.py --json out.json [--epochs 5] [--batch 1024] [--dim 64]
    python benchmarks/training.py --ranker-only [--ranker-batch 4096] [--ranker-epochs 6]

Same data (MovieLens-100K training pairs, RecBole split), same model, same
:func:`pipelines.retrieval.loop.train_step`, same run. The raw loop is the
baseline: shuffled index batches straight from tensors. Ray Train runs one
CPU worker fed by a Ray Data shard; its steady-state rate is the median of
its per-epoch rates after the first epoch, and its fixed overhead is the wall
time not explained by that rate (start-up, dataset set-up, checkpoints,
validation). The in-batch loss alone (random vectors, no towers) is timed too:
the ceiling of any model's step at this batch size on this machine.

Reranker (issue 5, target: MoE >= 300k samples/s on CPU at batch 4096): one
step is :func:`pipelines.ranker.loop.train_step` (forward, click loss,
backward, ``SparseDenseAdam`` step) of a fresh :class:`models.moe.Reranker`
with ``benchmarks/ranker_quality.py``'s defaults, on MovieLens-100K CTR rows
(the 80k training part, seed 0) in shuffled batches, batch slicing included.
The three kinds train side by side, one epoch each in turn, so a load change
on a shared machine hits them alike; each rate is the median of the per-epoch
rates after the first. Two reference rows: the logistic kind is the
embedding + loss + optimiser cost every kind pays; the MoE's experts and gate
alone (forward + backward at the token counts a routed batch gives them, no
dispatch, embedding or optimiser) are the matrix-multiply ceiling of the MoE.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from infra.config import load_config
from infra.ray_runtime import ensure_ray
from models.moe import KINDS, Reranker, RerankerConfig, SparseMoE
from models.optimizers import SparseDenseAdam
from models.ranking_task import RankingTask, TaskSpec
from models.retrieval_task import RetrievalTask
from pipelines.ranker.data import RankerData, movielens_ctr_data
from pipelines.ranker.loop import train_step as ranker_train_step
from pipelines.retrieval.data import movielens_random_split, prepare_retrieval_data
from pipelines.retrieval.loop import StepInputs, build_model, seed_everything, train_step
from pipelines.retrieval.trainer import train_retrieval

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
# Issue 5: the MoE reranker's training steps on CPU at batch 4096.
MOE_TARGET_SAMPLES_PER_S = 300_000
# benchmarks/ranker_quality.py's defaults (embedding 16, lr 3e-3, no decay or dropout).
RANKER_LR = 3e-3


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


def ranker_config(kind: str) -> RerankerConfig:
    """The reranker of ``benchmarks/ranker_quality.py`` (click task only, embedding 16)."""
    return RerankerConfig(kind=kind, tasks=("click",), embedding_dim=16)  # type: ignore[arg-type]


def ranker_rates(
    data: RankerData, batch: int, epochs: int, seed: int = 0
) -> dict[str, list[float]]:
    """Samples/s of each epoch of every reranker kind, the kinds taking turns epoch by epoch."""
    n = len(data.train)
    runs = {}
    for kind in KINDS:
        torch.manual_seed(seed)
        model = Reranker(data.layout, ranker_config(kind))
        runs[kind] = (model, SparseDenseAdam(model, lr=RANKER_LR))
    task = RankingTask([TaskSpec("click")])
    generator = torch.Generator().manual_seed(seed)
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for kind, (model, optimizer) in runs.items():
            started = time.perf_counter()
            for index in order.split(batch):
                targets = {"click": data.train.labels[index]}
                ranker_train_step(model, task, optimizer, data.train.batch(index), targets)
            rates[kind].append(n / (time.perf_counter() - started))
    return rates


def moe_matmul_ceiling(data: RankerData, batch: int, steps: int = 30) -> float:
    """Samples/s of the MoE's gate and experts alone: forward + backward, nothing else.

    Each expert runs on a contiguous block of as many rows as a routed
    training batch of real features sends it (capacity applied), so the
    multiply-adds are the real step's; embedding, routing, dispatch, loss and
    optimiser cost nothing here.
    """
    torch.manual_seed(0)
    model = Reranker(data.layout, ranker_config("moe"))
    moe = model.body
    assert isinstance(moe, SparseMoE)
    features = model.embedder(data.train.batch(slice(0, batch))).detach()
    routing = moe(features).routing
    assert routing is not None
    counts = torch.bincount(routing.experts[routing.kept], minlength=len(moe.experts)).tolist()
    x = features.clone().requires_grad_()
    rows = torch.randn(sum(counts), features.shape[1]).requires_grad_()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        logits = moe.gates[0].linear(x)
        outputs = [e(block) for e, block in zip(moe.experts, rows.split(counts), strict=True)]
        (logits.sum() + torch.cat(outputs).sum()).backward()
        times.append(time.perf_counter() - started)
    return batch / statistics.median(times[5:])


def ranker_results(batch: int, epochs: int) -> dict[str, object]:
    """The reranker rows of the JSON (``moe_samples_per_s`` and its references)."""
    data = movielens_ctr_data(DATASETS / "ml-100k", seed=0)
    rates = ranker_rates(data, batch, epochs)
    steady = {kind: statistics.median(r[1:] or r) for kind, r in rates.items()}
    ceiling = moe_matmul_ceiling(data, batch)
    results: dict[str, object] = {
        "ranker_samples": len(data.train),
        "ranker_batch_size": batch,
        "ranker_epochs": epochs,
        **{f"{kind}_samples_per_s": steady[kind] for kind in KINDS},
        "moe_dense_ratio": steady["moe"] / steady["dense"],
        "moe_matmul_ceiling_samples_per_s": ceiling,
        "moe_target_samples_per_s": MOE_TARGET_SAMPLES_PER_S,
        "moe_meets_target": bool(steady["moe"] >= MOE_TARGET_SAMPLES_PER_S),
        "ranker_epoch_rates": {kind: [round(r) for r in rates[kind]] for kind in KINDS},
    }
    print(
        f"\nreranker training, {len(data.train)} ML-100K rows, batch {batch}, median of epochs 2-"
    )
    print(f"{'kind':<22}{'samples/s':>12}{'vs dense':>10}")
    for kind in KINDS:
        print(f"{kind:<22}{steady[kind]:>12.0f}{steady[kind] / steady['dense']:>10.2f}")
    print(
        f"{'moe gate+experts only':<22}{ceiling:>12.0f}{ceiling / steady['dense']:>10.2f}"
        "  (ceiling: matmuls alone)"
    )
    print(f"target moe >= {MOE_TARGET_SAMPLES_PER_S}: {results['moe_meets_target']}")
    return results


def two_tower_results(args: argparse.Namespace) -> dict[str, object]:
    """The two-tower rows of the JSON: raw loop, Ray Train, the loss-only ceiling."""
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
    }
    print(f"\ntwo-tower training, {data.n_train} samples, batch {args.batch}, dim {args.dim}")
    print(f"{'loop':<12}{'samples/s':>12}{'ratio':>8}")
    print(f"{'raw torch':<12}{raw_steady:>12.0f}{1.0:>8.2f}")
    print(f"{'ray train':<12}{steady:>12.0f}{steady / raw_steady:>8.2f}")
    print(
        f"{'loss only':<12}{loss_only:>12.0f}{loss_only / raw_steady:>8.2f}  (ceiling: towers free)"
    )
    print(f"ray train fixed overhead {results['ray_train_fixed_overhead_s']:.1f} s of {wall:.1f} s")
    return results


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--ranker-batch", type=int, default=4096)
    parser.add_argument("--ranker-epochs", type=int, default=6, help="the first is warm-up")
    parser.add_argument("--ranker-only", action="store_true", help="skip the two-tower rows")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # On a shared machine the rates follow its load: keep the load beside them.
    results: dict[str, object] = {
        "torch_threads": torch.get_num_threads(),
        "load_average_before": os.getloadavg()[0],
    }
    results.update(ranker_results(args.ranker_batch, args.ranker_epochs))
    if not args.ranker_only:
        results.update(two_tower_results(args))
    results["load_average_after"] = os.getloadavg()[0]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
