"""LoRA adapters: identical start, adapters-only training, exact merge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.lora import LoRALinear, apply_lora, merge_lora, trainable_parameters
from models.moe import FeatureBatch, FeatureLayout, Reranker, RerankerConfig


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def _fit(module: nn.Module, x: torch.Tensor, steps: int = 20) -> None:
    """A few SGD steps on the trainable parameters towards a fixed random target."""
    target = torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(trainable_parameters(module), lr=0.1)
    for _ in range(steps):
        loss = ((module(x) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_a_wrapped_model_starts_identical_and_trains_only_the_adapters() -> None:
    net = _net()
    x = torch.randn(16, 5)
    before = net(x).detach()
    base_weights = [p.detach().clone() for p in net.parameters()]
    trainable = apply_lora(net, rank=2, alpha=4.0)
    assert trainable == 2 * (5 + 7) + 2 * (7 + 3)  # r · (in + out) per layer
    assert isinstance(net[0], LoRALinear) and isinstance(net[2], LoRALinear)
    assert torch.equal(net(x), before)  # B starts at zero
    names = {name for name, p in net.named_parameters() if p.requires_grad}
    assert names == {"0.lora_a", "0.lora_b", "2.lora_a", "2.lora_b"}
    _fit(net, x)
    assert not torch.allclose(net(x), before, atol=1e-3)
    after = [net[0].base.weight, net[0].base.bias, net[2].base.weight, net[2].base.bias]
    assert all(torch.equal(a, b) for a, b in zip(after, base_weights, strict=True))


def test_merge_folds_the_adapters_into_plain_linear_layers() -> None:
    net = _net()
    keys = set(net.state_dict())
    x = torch.randn(16, 5)
    apply_lora(net, rank=3, alpha=6.0)
    _fit(net, x)
    net.eval()
    adapted = net(x).detach()
    assert merge_lora(net) == 2
    assert not any(isinstance(m, LoRALinear) for m in net.modules())
    assert all(type(net[i]) is nn.Linear for i in (0, 2))
    assert torch.allclose(net(x), adapted, atol=1e-5)
    # The merged state dict is the base model's: it loads into a fresh one.
    assert set(net.state_dict()) == keys
    fresh = _net()
    fresh.load_state_dict(net.state_dict())
    assert torch.allclose(fresh(x), adapted, atol=1e-5)


def test_the_scaling_is_alpha_over_rank() -> None:
    layer = LoRALinear(nn.Linear(2, 2, bias=False), rank=2, alpha=1.0)
    with torch.no_grad():
        layer.base.weight.zero_()
        layer.lora_a.copy_(torch.eye(2))
        layer.lora_b.copy_(torch.eye(2))
    # y = (alpha / r) · x Aᵀ Bᵀ = 0.5 · x.
    assert torch.allclose(layer(torch.tensor([[2.0, 4.0]])), torch.tensor([[1.0, 2.0]]))


def test_target_picks_the_experts_and_heads_of_the_reranker() -> None:
    torch.manual_seed(0)
    layout = FeatureLayout(categorical=(6, 9), numeric=2)
    config = RerankerConfig(
        embedding_dim=4, n_experts=3, top_k=1, expert_hidden=(8,), expert_dim=4, tasks=("click",)
    )
    model = Reranker(layout, config)
    model.eval()
    batch = FeatureBatch(categorical=torch.randint(0, 6, (10, 2)), numeric=torch.randn(10, 2))
    before = model(batch).outputs["click"].detach()
    trainable = apply_lora(
        model, rank=2, alpha=2.0, target=lambda name, _: name.startswith(("body.experts", "heads"))
    )
    in_dim = model.embedder.out_dim  # 2 · 4 + 2 = 10
    # Per expert: (10 -> 8) and (8 -> 4); the head: (4 -> 1). Gates and embeddings stay frozen.
    assert trainable == 3 * (2 * (10 + 8) + 2 * (8 + 4)) + 2 * (4 + 1)
    assert in_dim == 10
    assert not isinstance(model.body.gates[0].linear, LoRALinear)
    assert not model.embedder.table.weight.requires_grad
    assert torch.equal(model(batch).outputs["click"], before)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="matched no"):
        apply_lora(_net(), rank=2, alpha=2.0, target=lambda name, _: name == "missing")
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(2, 2), rank=0, alpha=1.0)
