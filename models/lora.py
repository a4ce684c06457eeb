"""LoRA adapters for ``nn.Linear`` layers: fine-tune a low-rank update, merge it back for serving.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021)::

    y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ        A (r, in), B (out, r)

``W`` and ``b`` are frozen; ``B`` starts at zero, so a wrapped model starts
out computing exactly what the base model did, and the first steps move only
the adapters. :func:`merge_lora` folds ``(alpha / r) · B A`` into ``W`` and
puts the plain ``nn.Linear`` back: zero inference overhead, and the state
dict has the base model's keys again (it loads into a fresh model).

Written here rather than taken from ``peft``, which is not installed and
would bring ``transformers``/``accelerate`` for ~100 lines of code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

# target(qualified name, layer) -> whether to wrap that layer.
Target = Callable[[str, nn.Linear], bool]


class LoRALinear(nn.Module):
    """(…, in) -> (…, out): a frozen ``nn.Linear`` plus a trainable rank-``r`` update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        weight = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=weight.dtype))
        # A as nn.Linear initialises its weight (Kaiming-uniform), B zero: the
        # update starts at 0 but its gradient (through A) does not.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()
        return self.base(x) + self.scaling * update

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight (the base is modified)."""
        self.base.weight += self.scaling * (self.lora_b @ self.lora_a)
        return self.base


def _children(module: nn.Module) -> Iterator[tuple[nn.Module, str, str, nn.Module]]:
    """(parent, attribute, qualified name, child) of every sub-module, parents first."""
    for parent_name, parent in module.named_modules():
        for name, child in parent.named_children():
            yield parent, name, f"{parent_name}.{name}" if parent_name else name, child


def apply_lora(
    module: nn.Module,
    rank: int,
    alpha: float,
    target: Target = lambda name, layer: True,
    dropout: float = 0.0,
) -> int:
    """Freeze ``module`` and wrap each ``nn.Linear`` that ``target`` picks, in place.

    Every existing parameter (embeddings included) stops requiring
    gradients; only the adapters train. Returns the number of trainable
    parameters afterwards, ``rank · (in + out)`` per wrapped layer. Raises when
    ``target`` picks nothing (a typo in a name filter should not silently
    fine-tune zero parameters).
    """
    for p in module.parameters():
        p.requires_grad_(False)
    # Collected first: replacing children while named_modules walks them is unsafe,
    # and layers already inside a LoRALinear are not wrapped twice.
    chosen = [
        (parent, name)
        for parent, name, qualified, child in _children(module)
        if isinstance(child, nn.Linear)
        and not isinstance(parent, LoRALinear)
        and target(qualified, child)
    ]
    if not chosen:
        raise ValueError("apply_lora: target matched no nn.Linear layer")
    for parent, name in chosen:
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    return sum(p.numel() for p in trainable_parameters(module))


def merge_lora(module: nn.Module) -> int:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back.

    Returns the number of layers merged. The merged layers stay frozen
    (``requires_grad`` False), as their bases were.
    """
    adapters = [
        (parent, name, child)
        for parent, name, _, child in _children(module)
        if isinstance(child, LoRALinear)
    ]
    for parent, name, child in adapters:
        setattr(parent, name, child.merged())
    return len(adapters)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that require gradients (what an optimiser should get)."""
    return [p for p in module.parameters() if p.requires_grad]
