"""Hard negatives mined from an index of the model's own item vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infra.config import RetrievalConfig
from models.metrics import UserItems
from models.two_tower import TwoTowerConfig, TwoTowerModel
from pipelines.retrieval.hard_negatives import HardNegativeMiner


def _model() -> TwoTowerModel:
    torch.manual_seed(0)
    config = TwoTowerConfig(
        n_items=40, n_users=3, embedding_dim=8, use_history=False, use_attributes=False
    )
    return TwoTowerModel(config)


def test_negatives_come_from_the_top_of_the_index_and_skip_seen_items() -> None:
    model = _model()
    seen = UserItems.from_pairs(np.array([0, 0, 1]), np.array([3, 5, 7]), n_users=3)
    config = RetrievalConfig(hard_negatives=4, hard_negative_pool=10)
    miner = HardNegativeMiner(config, seen)
    users, items = torch.tensor([0, 1, 2]), torch.tensor([3, 7, 9])
    user_vectors = model.user_tower(users, torch.zeros(3, 1, dtype=torch.long)).detach()
    generator = torch.Generator().manual_seed(0)
    assert miner.negatives(model, users, items, user_vectors, generator) is None  # no index yet
    miner.refresh(model)
    hard = miner.negatives(model, users, items, user_vectors, generator)
    assert hard is not None
    assert hard.ids.shape == (3, 4) and hard.vectors.shape == (3, 4, 8)
    assert hard.vectors.requires_grad  # the loss trains the item tower through them
    item_vectors = model.all_item_vectors()
    for row, user in enumerate(users.tolist()):
        top = torch.topk(user_vectors[row] @ item_vectors.T, 12).indices.tolist()
        allowed = [i for i in top if i not in seen.items_of(user)][:10]
        assert set(hard.ids[row].tolist()) <= set(allowed)


def test_a_row_without_candidates_falls_back_to_its_own_positive() -> None:
    model = _model()
    everything = np.arange(40)
    seen = UserItems.from_pairs(np.zeros(40, dtype=np.int64), everything, n_users=3)
    miner = HardNegativeMiner(RetrievalConfig(hard_negatives=2, hard_negative_pool=5), seen)
    miner.refresh(model)
    users, items = torch.tensor([0]), torch.tensor([11])
    vectors = model.user_tower(users, torch.zeros(1, 1, dtype=torch.long)).detach()
    hard = miner.negatives(model, users, items, vectors, torch.Generator().manual_seed(0))
    assert hard is not None and hard.ids.tolist() == [[11, 11]]  # masked as accidental hits


def test_more_negatives_than_the_pool_is_refused() -> None:
    seen = UserItems.from_pairs(np.array([0]), np.array([1]), n_users=1)
    with pytest.raises(ValueError, match="hard_negative_pool"):
        HardNegativeMiner(RetrievalConfig(hard_negatives=20, hard_negative_pool=10), seen)
