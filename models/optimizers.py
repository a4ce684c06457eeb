"""Optimisers for models with sparse embedding tables.

A step of the two-tower model touches a few thousand embedding rows out of
(possibly) millions. Dense Adam updates every row of every table each step
(its moment estimates decay everywhere), which is what makes CPU training
~10× slower; ``SparseAdam`` updates only the rows in the batch (lazy Adam),
and the small dense part (MLPs, attribute embeddings) keeps AdamW.

:class:`LazyAdam` is torch's ``SparseAdam`` (same update, same state and
checkpoints) with a cheaper step: torch coalesces the uncoalesced gradient
(a sort of every looked-up row, plus sparse-tensor bookkeeping) and that
dominated the optimiser's time on a 4096-row reranker batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# A table this many times larger than a step's looked-up rows is summed by
# sorting the rows; below, by accumulating into a table-sized scratch buffer
# (O(table) zeroing, no sort), which is cheaper when most rows are hit anyway.
DENSE_SUM_RATIO = 4
# Devices with torch's fused AdamW kernel; elsewhere AdamW picks its default.
FUSED_DEVICES = ("cpu", "cuda")


def sum_rows(
    indices: torch.Tensor, values: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """indices (N,) row ids with repeats, values (N, *S) -> distinct rows (U,) ascending, sums (U, *S).

    The coalesced form of a sparse gradient ``Σ_i e_{indices_i} ⊗ values_i``.
    """
    if n_rows <= DENSE_SUM_RATIO * indices.numel():
        scratch = values.new_zeros(n_rows, *values.shape[1:])
        scratch.index_put_((indices,), values, accumulate=True)
        rows = torch.bincount(indices, minlength=n_rows).nonzero().squeeze(1)
        return rows, scratch.index_select(0, rows)
    rows, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    sums = values.new_zeros(rows.numel(), *values.shape[1:])
    return rows, sums.index_put_((inverse,), values, accumulate=True)


class LazyAdam(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` with a faster step for row-sparse gradients (embedding tables).

    The same lazy Adam: only the rows present in the gradient (even with a
    zero value) move, their moments decay, and the bias correction uses the
    table's step count. State and ``param_groups`` are SparseAdam's, so
    checkpoints load in either. Gradients other than row-sparse ones (sparse
    over more than the first dimension) go through torch's implementation.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if any(
            p.grad is not None and (not p.grad.is_sparse or p.grad.sparse_dim() != 1)
            for group in self.param_groups
            for p in group["params"]
        ):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps = float(group["lr"]), group["eps"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                grad = param.grad
                values = -grad._values() if group.get("maximize", False) else grad._values()
                if values.numel() == 0:
                    continue
                rows, g = sum_rows(grad._indices()[0], values, param.shape[0])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                m = exp_avg.index_select(0, rows).lerp_(g, 1 - beta1)
                v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                exp_avg.index_copy_(0, rows, m)
                exp_avg_sq.index_copy_(0, rows, v)
                step = state["step"]
                step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                param.index_add_(0, rows, m.div_(v.sqrt_().add_(eps)), alpha=-step_size)
        return loss


class SparseDenseAdam:
    """``SparseAdam`` over the sparse embeddings + ``AdamW`` over every other parameter.

    Quacks like one optimiser for the loop: ``zero_grad``, ``step``,
    ``state_dict``/``load_state_dict`` (for checkpoints), ``param_groups``.
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float = 0.0) -> None:
        sparse_ids = {
            id(module.weight)
            for module in model.modules()
            if isinstance(module, nn.Embedding) and module.sparse
        }
        sparse = [p for p in model.parameters() if id(p) in sparse_ids and p.requires_grad]
        dense = [p for p in model.parameters() if id(p) not in sparse_ids and p.requires_grad]
        self.optimizers: list[torch.optim.Optimizer] = []
        if sparse:
            self.optimizers.append(LazyAdam(sparse, lr=lr))
        if dense:
            # Fused: one kernel per parameter instead of ~10 elementwise ops, whose
            # overhead dominated the step with dozens of small expert matrices.
            fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in dense)
            self.optimizers.append(
                torch.optim.AdamW(dense, lr=lr, weight_decay=weight_decay, fused=fused or None)
            )

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for opt, saved in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(saved)

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr
