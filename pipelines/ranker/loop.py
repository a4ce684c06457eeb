"""The reranker training loop as plain functions.

:func:`train_step` is one optimiser step (a later Ray Train per-worker
function calls it), :func:`predict` and :func:`evaluate` score a data part,
:func:`train_epochs` is the single-process driver: shuffled mini-batches,
validation AUC after every epoch, early stopping that restores the best epoch.
"""

from __future__ import annotations

import copy
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
from models.moe import Reranker, RerankerConfig
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
    chunks = [
        model(part.batch(slice(start, start + batch_size))).outputs[task].double()
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
