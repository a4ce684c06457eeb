"""Optimisers for models with sparse embedding tables.

A step of the two-tower model touches a few thousand embedding rows out of
(possibly) millions. Dense Adam updates every row of every table each step
(its moment estimates decay everywhere), which is what makes CPU training
~10× slower; ``SparseAdam`` updates only the rows in the batch (lazy Adam),
and the small dense part (MLPs, attribute embeddings) keeps AdamW.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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
            self.optimizers.append(torch.optim.SparseAdam(sparse, lr=lr))
        if dense:
            self.optimizers.append(torch.optim.AdamW(dense, lr=lr, weight_decay=weight_decay))

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
