"""The reranker training loop as plain functions.

:func:`train_step` is one optimiser step (a later Ray Train per-worker
function calls it), :func:`predict` and :func:`evaluate` score a data part,
:func:`train_epochs` is the single-process driver: shuffled mini-batches,
validation AUC after every epoch, early stopping that restores the best epoch.
:func:`train_loop_per_worker` is the same loop as each Ray Train worker runs it
(checkpoints, resume, DDP); :mod:`pipelines.ranker.trainer` is its driver.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from infra.config import RankerConfig
from models.calibration import Calibrator
from models.ctr_metrics import ctr_report
from models.moe import FeatureBatch, Reranker, RerankerConfig
from models.optimizers import SparseDenseAdam
from models.ranking_task import RankingLoss, RankingTask, TaskSpec
from pipelines.ranker.data import RankerData, RankerPart


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyper-parameters of :func:`train_epochs` (defaults chosen on ML-100K valid)."""

    # Upper bound; early stopping usually ends sooner.
    epochs: int = 20
    # Epochs without a better validation AUC before stopping.
    patience: int = 2
    batch_size: int = 1024
    lr: float = 1e-3
    # AdamW decay of the dense parameters (sparse embedding rows get none).
    weight_decay: float = 0.0
    seed: int = 0
    # Rows per forward pass when scoring (no gradients, so larger is fine).
    eval_batch_size: int = 8192

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1:
            raise ValueError(
                f"epochs and patience must be >= 1, got {self.epochs}, {self.patience}"
            )
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}"
            )


def configs_from(
    settings: RankerConfig, tasks: tuple[str, ...] = ("click",)
) -> tuple[RerankerConfig, TrainConfig]:
    """The model and loop hyper-parameters of a ``models.ranker`` config section."""
    model = RerankerConfig(
        kind=settings.kind,
        tasks=tasks,
        embedding_dim=settings.embedding_dim,
        n_experts=settings.n_experts,
        top_k=settings.top_k,
        expert_hidden=settings.expert_hidden,
        expert_dim=settings.expert_dim,
        gate_noise=settings.gate_noise,
        capacity_factor=settings.capacity_factor,
        aux_loss_weight=settings.aux_loss_weight,
        dropout=settings.dropout,
        field_interactions=settings.field_interactions and settings.kind != "logistic",
    )
    loop = TrainConfig(
        epochs=settings.epochs,
        patience=settings.patience,
        batch_size=settings.batch_size,
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
        seed=settings.seed,
    )
    return model, loop


@dataclass
class TrainResult:
    """The model at its best validation epoch, per-epoch history, wall time."""

    model: Reranker
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_valid_auc: float = float("nan")
    seconds: float = 0.0


def train_step(
    model: nn.Module,
    task: RankingTask,
    optimizer: Any,
    batch: Any,
    targets: Mapping[str, torch.Tensor],
) -> RankingLoss:
    """One optimiser step on ``batch`` (a FeatureBatch) against ``targets[task]`` (B,)."""
    model.train()
    optimizer.zero_grad()
    loss = task(model(batch), targets)
    loss.total.backward()
    optimizer.step()
    return loss


@torch.no_grad()
def predict(
    model: Reranker, part: RankerPart, task: str = "click", batch_size: int = 8192
) -> np.ndarray:
    """Logits (N,) float64 of ``task`` for every row of ``part``, in order (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    chunks = [
        model(_to_device(part.batch(slice(start, start + batch_size)), device))
        .outputs[task]
        .double()
        .cpu()
        for start in range(0, len(part), batch_size)
    ]
    return torch.cat(chunks).numpy() if chunks else np.zeros(0)


def evaluate(
    model: Reranker,
    part: RankerPart,
    task: str = "click",
    calibrator: Calibrator | None = None,
    batch_size: int = 8192,
) -> dict[str, float]:
    """``auc, gauc, logloss, ece, n, positive_rate`` of ``part`` (optionally calibrated)."""
    logits = predict(model, part, task, batch_size)
    if calibrator is not None:
        probabilities = calibrator.transform(logits)
    else:
        probabilities = 1.0 / (1.0 + np.exp(-logits))
    users = part.users.numpy() if part.users is not None else None
    return ctr_report(part.labels.numpy(), probabilities, users=users)


# Called after each epoch with that epoch's history row and the model as it is
# (Ray Tune reports from it; ASHA may then stop the trial).
EpochCallback = Callable[[dict[str, float], Reranker], None]


def train_epochs(
    model_config: RerankerConfig,
    train_config: TrainConfig,
    data: RankerData,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train a fresh :class:`Reranker` on ``data.train``; keep the best epoch by validation AUC.

    Only the first task of ``model_config.tasks`` is trained (binary, the label).
    """
    torch.manual_seed(train_config.seed)
    model = Reranker(data.layout, model_config)
    main_task = model_config.tasks[0]
    task = RankingTask([TaskSpec(main_task)])
    optimizer = SparseDenseAdam(model, lr=train_config.lr, weight_decay=train_config.weight_decay)
    generator = torch.Generator().manual_seed(train_config.seed)
    result = TrainResult(model=model)
    best_state: dict[str, torch.Tensor] | None = None
    since_best = 0
    start = time.perf_counter()
    n = len(data.train)
    for epoch in range(1, train_config.epochs + 1):
        epoch_start = time.perf_counter()
        order = torch.randperm(n, generator=generator)
        total, batches = 0.0, 0
        for first in range(0, n, train_config.batch_size):
            index = order[first : first + train_config.batch_size]
            targets = {main_task: data.train.labels[index]}
            loss = train_step(model, task, optimizer, data.train.batch(index), targets)
            total += loss.per_task[main_task]
            batches += 1
        valid = evaluate(model, data.valid, main_task, batch_size=train_config.eval_batch_size)
        result.history.append(
            {
                "epoch": epoch,
                "train_loss": total / max(1, batches),
                "valid_auc": valid["auc"],
                "valid_logloss": valid["logloss"],
                "seconds": time.perf_counter() - epoch_start,
            }
        )
        if on_epoch is not None:
            on_epoch(result.history[-1], model)
        if best_state is None or valid["auc"] > result.best_valid_auc:
            result.best_valid_auc = valid["auc"]
            result.best_epoch = epoch
            best_state = copy.deepcopy(model.state_dict())
            since_best = 0
        else:
            since_best += 1
            if since_best >= train_config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    return result


CHECKPOINT_FILE = "state.pt"


def _worker_rows(n: int, epoch: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """This worker's rows for ``epoch``: one seeded permutation shared by all, every world-th row."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator)[rank::world]


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: epochs over its rows, a checkpoint and a report per epoch.

    ``loop_config``: ``settings`` (infra RankerConfig), ``data`` (RankerData,
    put in the object store once by Ray), ``threads``, and for fault tests
    ``crash_marker`` / ``crash_after_epoch`` (rank 0 creates the marker after
    that epoch's checkpoint and exits, once). The examples are already tensors
    in memory, so each worker takes every ``world``-th row of a per-epoch
    permutation that all workers draw alike (no Ray Data round trip).
    Resumes from ``ray.train.get_checkpoint()``; stops when validation AUC has
    not improved for ``patience`` epochs (every worker decides alike: all
    evaluate the same validation rows with the same synchronised weights).
    """
    import os
    import tempfile
    from pathlib import Path

    import ray.train
    import ray.train.torch

    settings: RankerConfig = loop_config["settings"]
    data: RankerData = loop_config["data"]
    torch.set_num_threads(loop_config.get("threads", 1))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(settings.seed)
    model_config, train_config = configs_from(settings)
    model_config = dataclasses.replace(model_config, sparse_embeddings=not settings.use_gpu)
    device = ray.train.torch.get_device() if settings.use_gpu else torch.device("cpu")
    model = Reranker(data.layout, model_config).to(device)
    optimizer = SparseDenseAdam(model, lr=train_config.lr, weight_decay=train_config.weight_decay)
    main_task = model_config.tasks[0]
    task = RankingTask([TaskSpec(main_task)])
    start_epoch, best, stale = 1, -1.0, 0
    history: list[dict[str, Any]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, stale = state["epoch"] + 1, state["best"], state["stale"]
        history = state["history"]
        torch.set_rng_state(state["rng"])
    trained: nn.Module = model
    if world > 1:
        # Sparse embedding gradients all-reduce over gloo on CPU; GPUs use dense ones.
        trained = ray.train.torch.prepare_model(model, move_to_device=False)
    for epoch in range(start_epoch, train_config.epochs + 1):
        started = time.perf_counter()
        rows = _worker_rows(len(data.train), epoch, settings.seed, rank, world)
        total, batches = 0.0, 0
        for index in rows.split(train_config.batch_size):
            batch = data.train.batch(index)
            batch = _to_device(batch, device)
            targets = {main_task: data.train.labels[index].to(device)}
            loss = train_step(trained, task, optimizer, batch, targets)
            total += loss.per_task[main_task]
            batches += 1
        seconds = time.perf_counter() - started
        valid = evaluate(model, data.valid, main_task)
        improved = valid["auc"] > best
        best, stale = (valid["auc"], 0) if improved else (best, stale + 1)
        report = {
            "epoch": epoch,
            "train_loss": total / max(1, batches),
            "samples_per_s": len(rows) * world / max(seconds, 1e-9),
            "epoch_s": seconds,
            "valid_auc": valid["auc"],
            "valid_gauc": valid["gauc"],
            "valid_logloss": valid["logloss"],
            "best_valid_auc": best,
            "stopped": stale >= train_config.patience or epoch == train_config.epochs,
        }
        history.append(report)
        marker = loop_config.get("crash_marker")
        crash = marker and epoch == loop_config.get("crash_after_epoch", 1) and rank == 0
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                        "best": best,
                        "stale": stale,
                        "rng": torch.get_rng_state(),
                        "history": history,
                    },
                    Path(folder) / CHECKPOINT_FILE,
                )
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
            )
        if crash and not Path(marker).exists():
            Path(marker).write_text(f"crashed after epoch {epoch}\n")
            os._exit(1)
        if report["stopped"]:
            break


def _to_device(batch: FeatureBatch, device: torch.device) -> FeatureBatch:
    if device.type == "cpu":
        return batch
    move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return FeatureBatch(
        categorical=move(batch.categorical),
        hashed=move(batch.hashed),
        numeric=move(batch.numeric),
        sequences=tuple(s.to(device, non_blocking=True) for s in batch.sequences),
    )
