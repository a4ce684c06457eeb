"""The optimisers: LazyAdam against torch's SparseAdam, the fused dense part."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models import optimizers
from models.optimizers import LazyAdam, SparseDenseAdam, sum_rows


def _sparse(rows: list[int], values: list[list[float]], n_rows: int) -> torch.Tensor:
    """An uncoalesced row-sparse gradient of an (n_rows, D) table."""
    return torch.sparse_coo_tensor(torch.tensor([rows]), torch.tensor(values), (n_rows, 2))


@pytest.mark.parametrize("dense_sum", [True, False])
def test_sum_rows_adds_repeated_rows_by_hand(dense_sum: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Ratio 0 forces the sort path, a huge one the scratch-buffer path.
    monkeypatch.setattr(optimizers, "DENSE_SUM_RATIO", 10**9 if dense_sum else 0)
    rows, sums = sum_rows(torch.tensor([2, 0, 2, 5]), torch.tensor([[1.0], [2.0], [3.0], [0.0]]), 8)
    assert rows.tolist() == [0, 2, 5]  # row 5 is present with a zero sum
    assert sums.tolist() == [[2.0], [4.0], [0.0]]


@pytest.mark.parametrize("n_rows", [6, 10_000])  # scratch-buffer and sort paths
@pytest.mark.parametrize("maximize", [False, True])
def test_lazy_adam_matches_torch_sparse_adam(n_rows: int, maximize: bool) -> None:
    torch.manual_seed(0)
    start = torch.randn(n_rows, 2)
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    lazy = LazyAdam([ours], lr=0.1, maximize=maximize)
    reference = torch.optim.SparseAdam([theirs], lr=0.1, maximize=maximize)
    steps = [
        ([1, 3, 1], [[1.0, -2.0], [0.5, 0.5], [3.0, 1.0]]),  # row 1 twice
        ([4, 3], [[0.0, 0.0], [-1.0, 2.0]]),  # row 4 present with a zero gradient: still moves
        ([0], [[2.0, 2.0]]),
        ([1, 1, 1], [[1.0, 1.0], [1.0, 1.0], [-2.0, 0.5]]),
    ]
    for rows, values in steps:
        for param, optimizer in ((ours, lazy), (theirs, reference)):
            param.grad = _sparse(rows, values, n_rows)
            optimizer.step()
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.allclose(lazy.state[ours][key], reference.state[theirs][key], atol=1e-7)
    assert lazy.state[ours]["step"] == reference.state[theirs]["step"] == 4
    # Rows never in a gradient (2, 5, ...) never moved.
    untouched = torch.ones(n_rows, dtype=torch.bool)
    untouched[[0, 1, 3, 4]] = False
    assert torch.equal(ours.detach()[untouched], start[untouched])


def test_lazy_adam_checkpoints_load_into_sparse_adam_and_back() -> None:
    torch.manual_seed(0)
    ours, theirs = nn.Parameter(torch.randn(5, 2)), nn.Parameter(torch.zeros(5, 2))
    with torch.no_grad():
        theirs.copy_(ours)
    lazy = LazyAdam([ours], lr=0.05)
    ours.grad = _sparse([0, 2], [[1.0, 1.0], [2.0, -1.0]], 5)
    lazy.step()
    with torch.no_grad():
        theirs.copy_(ours)
    reference = torch.optim.SparseAdam([theirs], lr=0.05)
    # Deep copies: load_state_dict may keep the very tensors it was given.
    reference.load_state_dict(copy.deepcopy(lazy.state_dict()))
    for param, optimizer in ((ours, lazy), (theirs, reference)):
        param.grad = _sparse([2, 3], [[0.5, 0.5], [1.0, 0.0]], 5)
        optimizer.step()
    assert torch.allclose(ours, theirs, atol=1e-7)
    back = nn.Parameter(theirs.detach().clone())
    resumed = LazyAdam([back], lr=0.05)
    resumed.load_state_dict(copy.deepcopy(reference.state_dict()))
    for param, optimizer in ((back, resumed), (theirs, reference)):
        param.grad = _sparse([0, 3], [[1.0, -1.0], [0.0, 2.0]], 5)
        optimizer.step()
    assert torch.allclose(back, theirs, atol=1e-7)


def test_dense_part_uses_fused_adamw_with_the_unfused_result() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Flatten(), nn.Linear(6, 1))
    twin = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Flatten(), nn.Linear(6, 1))
    twin.load_state_dict(model.state_dict())
    optimizer = SparseDenseAdam(model, lr=0.1, weight_decay=0.01)
    sparse, dense = optimizer.optimizers
    assert isinstance(sparse, LazyAdam) and dense.defaults["fused"] is True
    references = [
        torch.optim.SparseAdam(twin[0].parameters(), lr=0.1),
        torch.optim.AdamW(twin[2].parameters(), lr=0.1, weight_decay=0.01, fused=False),
    ]
    ids = torch.tensor([[1, 2], [2, 7]])
    for _ in range(3):
        for net, steps in ((model, [optimizer]), (twin, references)):
            net.zero_grad()
            net(ids).square().sum().backward()
            for step in steps:
                step.step()
    assert torch.allclose(model[2].weight, twin[2].weight, atol=1e-6)
    assert torch.allclose(model[2].bias, twin[2].bias, atol=1e-6)
