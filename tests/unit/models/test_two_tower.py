"""The two-tower network, its retrieval task and the sparse optimiser."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from features.encoding import AttributeTable
from models.artifacts import load_two_tower, save_two_tower
from models.optimizers import SparseDenseAdam
from models.retrieval_task import Negatives, RetrievalTask, in_batch_log_q, uniform_log_q
from models.two_tower import PAD, ByteDropout, TwoTowerConfig, TwoTowerModel, distinct_rows


def _items(n: int) -> AttributeTable:
    rng = np.random.default_rng(0)
    return AttributeTable(
        categorical=rng.integers(0, 4, (n, 1)),
        cardinalities=(3,),
        numeric=rng.standard_normal((n, 2)).astype(np.float32),
        multi_hot=(rng.random((n, 5)) < 0.3).astype(np.float32),
        names=("kind", "a", "b", "genres"),
    )


def _model(**overrides: object) -> TwoTowerModel:
    config = TwoTowerConfig(n_items=30, n_users=10, embedding_dim=8, history_length=4, **overrides)
    return TwoTowerModel(config, None, _items(30))


def test_towers_give_unit_vectors_of_the_configured_width() -> None:
    torch.manual_seed(0)
    model = _model()
    users = torch.tensor([0, 3, 99])  # 99 is an unseen user: hashed, still served
    history = torch.tensor([[1, 2, 0, 0], [0, 0, 0, 0], [5, 6, 7, 8]])
    u, i = model(users, history, torch.tensor([0, 29, 5]))
    assert u.shape == (3, 8) and i.shape == (3, 8)
    assert torch.allclose(u.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(i.norm(dim=1), torch.ones(3), atol=1e-5)


def test_history_padding_is_ignored_and_the_padding_row_stays_zero() -> None:
    torch.manual_seed(0)
    model = _model()
    model.eval()
    users = torch.tensor([1, 1])
    a = model.user_tower(users, torch.tensor([[3, 4, 0, 0]]).repeat(2, 1))
    b = model.user_tower(users, torch.tensor([[3, 0, 4, 0]]).repeat(2, 1))
    assert torch.allclose(a, b, atol=1e-6)
    assert float(model.item_tower.id_embedding.weight[PAD].detach().abs().sum()) == 0.0


def test_unknown_items_and_new_items_use_the_content_only_path() -> None:
    torch.manual_seed(0)
    model = _model()
    model.eval()
    table = _items(30)
    with torch.no_grad():
        content = model.item_tower.content_only(table)
        hidden = model.item_tower(torch.arange(30), torch.ones(30, dtype=torch.bool))
        known = model.item_tower(torch.arange(30))
    assert torch.allclose(content, hidden, atol=1e-5)
    assert not torch.allclose(content, known, atol=1e-3)


def test_matrix_factorisation_switches_parts_off() -> None:
    model = _model(use_history=False, use_attributes=False, hidden=())
    assert model.item_tower.attributes is None and model.user_tower.attributes is None
    with pytest.raises(ValueError, match="at least one"):
        TwoTowerConfig(
            n_items=3, n_users=3, use_user_id=False, use_history=False, use_attributes=False
        )


def test_loss_matches_a_hand_computed_softmax() -> None:
    # Two orthogonal users, each with its own item: logits [[1, 0], [0, 1]] / T.
    users = torch.eye(2)
    items = torch.eye(2)
    task = RetrievalTask(temperature=0.5, logq_correction=False)
    loss = task(users, items, torch.tensor([7, 8]))
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_accidental_hits_are_masked_not_punished() -> None:
    users = torch.eye(2)
    items = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # the same item twice
    ids = torch.tensor([4, 4])
    masked = RetrievalTask(temperature=1.0, logq_correction=False)(users, items, ids)
    # Row 0 sees only its positive (logit 1): loss 0. Row 1: positive logit 0, alone: loss 0.
    assert float(masked) == pytest.approx(0.0, abs=1e-6)
    unmasked = RetrievalTask(temperature=1.0, logq_correction=False, remove_accidental_hits=False)
    assert float(unmasked(users, items, ids)) > 0.5


def test_logq_correction_lowers_popular_negatives_only() -> None:
    users = torch.eye(2)
    items = torch.eye(2)
    ids = torch.tensor([0, 1])
    log_q = torch.tensor([math.log(10.0), 0.0])  # item 0 is ten times as likely a negative
    task = RetrievalTask(temperature=1.0)
    loss = task(users, items, ids, log_q)
    # Row 0: positive 1 (uncorrected), negative item 1 at 0 - 0. Row 1: negative item 0 at 0 - log 10.
    row0 = -math.log(math.e / (math.e + 1))
    row1 = -math.log(math.e / (math.e + 0.1))
    assert float(loss) == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_extra_negatives_add_columns_and_mask_the_positive() -> None:
    users = torch.eye(2)
    items = torch.eye(2)
    ids = torch.tensor([0, 1])
    task = RetrievalTask(temperature=1.0, logq_correction=False)
    base = float(task(users, items, ids))
    uniform = Negatives(vectors=torch.tensor([[0.0, 1.0]]), ids=torch.tensor([5]))
    assert float(task(users, items, ids, uniform=uniform)) > base
    # A "hard" negative that is the row's own positive is masked: no change.
    hard = Negatives(vectors=items.unsqueeze(1), ids=ids.unsqueeze(1))
    assert float(task(users, items, ids, hard=hard)) == pytest.approx(base, rel=1e-6)


def _reference_loss(
    users: torch.Tensor, items: torch.Tensor, ids: torch.Tensor, log_q: torch.Tensor, t: float
) -> torch.Tensor:
    """The textbook form: B×B logits, logQ off the negatives, hits masked, CE on the diagonal."""
    logits = users @ items.T / t - log_q.unsqueeze(0) + torch.diag(log_q)
    same = ids.unsqueeze(0) == ids.unsqueeze(1)
    same.fill_diagonal_(False)
    return torch.nn.functional.cross_entropy(logits.masked_fill(same, -1e9), torch.arange(len(ids)))


def test_loss_and_gradients_match_the_textbook_form_on_a_random_batch() -> None:
    torch.manual_seed(0)
    users = torch.nn.functional.normalize(torch.randn(64, 8), dim=1).requires_grad_()
    items = torch.nn.functional.normalize(torch.randn(64, 8), dim=1).requires_grad_()
    ids = torch.randint(0, 20, (64,))  # many duplicates: accidental hits
    log_q = torch.randn(64)
    fast = RetrievalTask(temperature=0.1)(users, items, ids, log_q)
    fast_grads = torch.autograd.grad(fast, (users, items))
    reference = _reference_loss(users, items, ids, log_q, 0.1)
    reference_grads = torch.autograd.grad(reference, (users, items))
    assert float(fast.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    for got, want in zip(fast_grads, reference_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_history_pooling_is_the_mean_of_the_items_embeddings_with_gradients() -> None:
    torch.manual_seed(0)
    model = _model(use_user_id=False, use_attributes=False, hidden=())
    embedding = model.item_tower.id_embedding
    history = torch.tensor([[3, 5, 3, 0], [0, 0, 0, 0], [30, 1, 2, 7]])
    pooled = model.user_tower.pool_history(history)
    weight = embedding.weight
    expected = torch.stack(
        [weight[[3, 5, 3]].mean(0), torch.zeros(8), weight[[30, 1, 2, 7]].mean(0)]
    )
    assert torch.allclose(pooled, expected, atol=1e-6)
    pooled.sum().backward()
    grad = embedding.weight.grad.coalesce().to_dense()
    # Row 3 appears twice in a history of three: weight 2/3; rows of the 4-long history 1/4.
    assert torch.allclose(grad[3], torch.full((8,), 2 / 3))
    assert torch.allclose(grad[7], torch.full((8,), 1 / 4))
    assert float(grad[PAD].abs().sum()) == 0.0


def test_distinct_rows_agree_with_torch_unique() -> None:
    ids = torch.randint(0, 50, (7, 9), generator=torch.Generator().manual_seed(1))
    rows, positions = distinct_rows(ids, 50)
    expected_rows, expected_positions = torch.unique(ids, return_inverse=True)
    assert torch.equal(rows, expected_rows)
    assert torch.equal(positions, expected_positions)


def test_byte_dropout_keeps_the_expectation_and_is_off_in_eval() -> None:
    torch.manual_seed(0)
    dropout = ByteDropout(0.2)
    x = torch.ones(1000, 300)
    out = dropout(x)
    dropped = float((out == 0).float().mean())
    assert dropped == pytest.approx(51 / 256, abs=0.005)
    assert float(out.mean()) == pytest.approx(1.0, abs=0.01)
    dropout.eval()
    assert torch.equal(dropout(x), x)
    with pytest.raises(ValueError, match="dropout"):
        ByteDropout(1.0)


def test_expected_counts() -> None:
    assert float(in_batch_log_q(torch.tensor([0.01]), 100)[0]) == pytest.approx(0.0, abs=1e-6)
    assert uniform_log_q(10, 1000) == pytest.approx(math.log(0.01))


def test_sparse_adam_moves_only_the_rows_in_the_batch() -> None:
    torch.manual_seed(0)
    model = _model()
    optimizer = SparseDenseAdam(model, lr=0.1)
    assert len(optimizer.optimizers) == 2
    before = model.item_tower.id_embedding.weight.detach().clone()
    u, i = model(
        torch.tensor([0, 1]), torch.tensor([[3, 0, 0, 0], [4, 0, 0, 0]]), torch.tensor([9, 10])
    )
    loss = RetrievalTask()(u, i, torch.tensor([9, 10]))
    optimizer.zero_grad()
    loss.backward()
    assert model.item_tower.id_embedding.weight.grad.is_sparse
    optimizer.step()
    after = model.item_tower.id_embedding.weight.detach()
    changed = set(torch.nonzero((after - before).abs().sum(dim=1)).flatten().tolist())
    assert changed == {3, 4, 10, 11}  # history rows 3, 4 and items 9, 10 (row = id + 1)
    state = optimizer.state_dict()
    optimizer.load_state_dict(state)


def test_dense_embeddings_for_gpus_train_with_one_dense_optimiser() -> None:
    torch.manual_seed(0)
    model = _model(sparse_embeddings=False)
    optimizer = SparseDenseAdam(model, lr=0.1)
    assert len(optimizer.optimizers) == 1
    u, i = model(
        torch.tensor([0, 1]), torch.tensor([[3, 0, 0, 0], [4, 5, 0, 0]]), torch.tensor([9, 10])
    )
    RetrievalTask()(u, i, torch.tensor([9, 10])).backward()
    grad = model.item_tower.id_embedding.weight.grad
    assert not grad.is_sparse and float(grad[4].abs().sum()) > 0  # history row 4 (item 3)
    optimizer.step()


def test_saved_model_loads_back_with_the_same_vectors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    users = AttributeTable(
        categorical=np.array([[1], [2], [0]]),
        cardinalities=(2,),
        numeric=np.zeros((3, 0), np.float32),
        multi_hot=np.zeros((3, 0), np.float32),
    )
    config = TwoTowerConfig(n_items=30, n_users=3, embedding_dim=8, history_length=4)
    model = TwoTowerModel(config, users, _items(30))
    model.eval()
    save_two_tower(model, tmp_path / "model")
    loaded = load_two_tower(tmp_path / "model")
    history = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0], [0, 0, 0, 0]])
    with torch.no_grad():
        assert torch.equal(model.all_item_vectors(), loaded.all_item_vectors())
        assert torch.equal(
            model.user_tower(torch.arange(3), history), loaded.user_tower(torch.arange(3), history)
        )
    with pytest.raises(FileNotFoundError, match=r"two_tower\.json"):
        load_two_tower(tmp_path)
