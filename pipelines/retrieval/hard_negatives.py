"""Hard negatives for the retrieval loss, mined from a candidate index of the model's own items.

In-batch negatives are mostly easy (popular items far from the user); the
items a model ranks high but the user never interacted with teach it the fine
distinctions. Each epoch the loop rebuilds an index (:func:`models.index.build_index`,
so exact or Faiss by catalogue size) over the current item vectors; each step
searches it with the batch's user vectors, drops the user's training items
(known positives are not negatives), and samples ``H`` per row uniformly from
the top ``pool``: the very top of an implicit-feedback ranking is often
unlabelled positives, and sampling from a pool softens them.
"""

from __future__ import annotations

import numpy as np
import torch

from infra.config import IndexConfig, RetrievalConfig
from models.index import CandidateIndex, build_index
from models.metrics import UserItems
from models.retrieval_task import Negatives
from models.two_tower import TwoTowerModel


class HardNegativeMiner:
    """Per-row hard negatives ``(B, H)`` from an index refreshed with :meth:`refresh`."""

    def __init__(
        self, config: RetrievalConfig, seen: UserItems, index: IndexConfig | None = None
    ) -> None:
        if config.hard_negatives > config.hard_negative_pool:
            raise ValueError(
                f"hard_negatives ({config.hard_negatives}) must be <= hard_negative_pool "
                f"({config.hard_negative_pool})"
            )
        self.n_negatives = config.hard_negatives
        self.pool = config.hard_negative_pool
        self.seen = seen
        self.index_config = index or IndexConfig()
        self.index: CandidateIndex | None = None

    @torch.no_grad()
    def refresh(self, model: TwoTowerModel) -> None:
        """Rebuild the index over the model's current item vectors."""
        was_training = model.training
        model.eval()
        try:
            vectors = model.all_item_vectors().float().cpu().numpy()
        finally:
            model.train(was_training)
        ids = np.arange(len(vectors), dtype=np.int64)
        self.index = build_index(ids, vectors, self.index_config)

    def negatives(
        self,
        model: TwoTowerModel,
        users: torch.Tensor,
        items: torch.Tensor,
        user_vectors: torch.Tensor,
        generator: torch.Generator,
    ) -> Negatives | None:
        """Hard negatives of a batch of ``users`` (B,) with positives ``items`` (B,).

        ``user_vectors`` (B, D) detached, the batch's own forward. None before
        the first :meth:`refresh`. A row whose pool ran out of items (a user
        who has seen nearly everything) gets its own positive instead, which
        the task masks as an accidental hit.
        """
        if self.index is None or self.n_negatives == 0:
            return None
        batch = users.cpu().numpy()
        _, seen_items = self.seen.rows(batch)
        indptr = np.zeros(len(batch) + 1, dtype=np.int64)
        np.cumsum(self.seen.lengths()[batch], out=indptr[1:])
        _, found = self.index.search(
            user_vectors.float().cpu().numpy(),
            min(self.pool, len(self.index)),
            (indptr, seen_items),
        )  # (B, pool) item ids, best first; -1 once a row runs out
        found = torch.as_tensor(found)
        available = (found >= 0).sum(dim=1, keepdim=True)  # (B, 1)
        draws = torch.rand((len(batch), self.n_negatives), generator=generator)
        picked = found.gather(1, (draws * available.clamp_min(1)).long())  # (B, H)
        ids = torch.where(picked >= 0, picked, items.cpu().unsqueeze(1)).to(items.device)
        vectors = model.item_tower(ids.reshape(-1)).view(len(batch), self.n_negatives, -1)
        return Negatives(vectors=vectors, ids=ids)
