"""The ranking task: owns the multi-task loss of the reranker.

The network (:class:`models.moe.Reranker`) returns one raw score per task; this
module decides what each score means. Per task (:class:`TaskSpec`):

- ``"binary"``: the score is a logit; binary cross-entropy with logits, with an
  optional ``pos_weight`` (> 1 up-weights the rare positives of a CTR log).
  With a ``threshold`` the target is ``value >= threshold`` (long engagement:
  a dwell time of at least so many seconds).
- ``"regression"``: the score is the prediction itself; mean squared error.

Either kind may take a mask: a rating exists only for clicked rows, so the
rating loss averages over the rows whose mask is set (a batch with none
contributes 0, with a zero gradient, rather than NaN). The total is
``sum_t weight_t · loss_t + aux_loss``; the model has already multiplied the
MoE load-balancing loss by ``RerankerConfig.aux_loss_weight``, so it is added
as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.moe import RerankerOutput

LossKind = Literal["binary", "regression"]
LOSS_KINDS: tuple[LossKind, ...] = ("binary", "regression")


@dataclass(frozen=True)
class TaskSpec:
    """How one task's score is trained."""

    # The key of the task in RerankerOutput.outputs and in the targets.
    name: str
    kind: LossKind = "binary"
    # Multiplier of this task's loss in the total; 0 keeps the head untrained.
    weight: float = 1.0
    # Binary only: weight of positive rows in BCE (torch's pos_weight); None = 1.
    pos_weight: float | None = None
    # Binary only: the target is value >= threshold; None: the target is 0/1 already.
    threshold: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must be a non-empty task name")
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"kind must be one of {LOSS_KINDS}, got {self.kind!r}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(
                f"weight of task {self.name!r} must be finite and >= 0, got {self.weight}"
            )
        if self.threshold is not None and (
            self.kind != "binary" or not math.isfinite(self.threshold)
        ):
            raise ValueError(
                f"threshold of task {self.name!r} needs a binary task and a finite value"
            )
        if self.pos_weight is not None:
            if self.kind != "binary":
                raise ValueError(
                    f"pos_weight is for binary tasks; task {self.name!r} is {self.kind}"
                )
            if not (math.isfinite(self.pos_weight) and self.pos_weight > 0):
                raise ValueError(
                    f"pos_weight of task {self.name!r} must be finite and > 0, got {self.pos_weight}"
                )


@dataclass(frozen=True)
class RankingLoss:
    """``total`` () to backpropagate; ``per_task`` unweighted task losses and ``aux`` as floats."""

    total: torch.Tensor
    per_task: dict[str, float]
    aux: float


class RankingTask(nn.Module):
    """Loss of a batch of reranker outputs against per-task targets."""

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        names = [task.name for task in tasks]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"tasks must be non-empty with unique names, got {names}")
        self.tasks = tuple(tasks)

    def forward(
        self,
        output: RerankerOutput,
        targets: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor] | None = None,
    ) -> RankingLoss:
        """Weighted sum of the task losses plus the aux loss.

        ``targets[name]`` (B,) float (0/1 for binary tasks); ``masks[name]`` (B,)
        bool, optional per task: only rows where it is True count. Outputs of
        tasks without a :class:`TaskSpec` are ignored.
        """
        masks = masks or {}
        total = output.aux_loss
        per_task: dict[str, float] = {}
        for task in self.tasks:
            if task.name not in output.outputs:
                raise ValueError(
                    f"task {task.name!r} is not among the model's outputs {sorted(output.outputs)}"
                )
            if task.name not in targets:
                raise ValueError(f"targets has no entry for task {task.name!r}")
            loss = self._task_loss(
                task, output.outputs[task.name], targets[task.name], masks.get(task.name)
            )
            per_task[task.name] = float(loss.detach())
            total = total + task.weight * loss
        return RankingLoss(total, per_task, float(output.aux_loss.detach()))

    @staticmethod
    def _task_loss(
        task: TaskSpec, score: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Mean loss () over the (masked) rows of score, target (B,)."""
        if target.shape != score.shape:
            raise ValueError(
                f"targets[{task.name!r}] must have shape {tuple(score.shape)}, "
                f"got {tuple(target.shape)}"
            )
        if mask is not None and (mask.shape != score.shape or mask.dtype != torch.bool):
            raise ValueError(
                f"masks[{task.name!r}] must be bool of shape {tuple(score.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        target = target.to(score.dtype)
        if mask is not None:
            # A target that does not exist may be stored as NaN: replace it before
            # the loss, since 0 · NaN in the backward pass would poison the gradient.
            target = torch.where(mask, target, torch.zeros_like(target))
        if task.threshold is not None:
            target = (target >= task.threshold).to(score.dtype)
        if task.kind == "binary":
            pos_weight = (
                None
                if task.pos_weight is None
                else torch.tensor(task.pos_weight, dtype=score.dtype, device=score.device)
            )
            rows = F.binary_cross_entropy_with_logits(
                score, target, pos_weight=pos_weight, reduction="none"
            )
        else:
            rows = F.mse_loss(score, target, reduction="none")
        if mask is None:
            return rows.mean()
        return torch.where(mask, rows, torch.zeros_like(rows)).sum() / mask.sum().clamp_min(1)
