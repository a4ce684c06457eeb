"""The popularity fallback: the catalogue by Count-Min item frequency, for users we cannot personalise.

The online store keeps each item's Count-Min estimate of its events per
window (``popularity_cms_{w}d``: the sketches' heavy-hitter counts, always
>= the true count). The ranking is read once, when the recommender loads
(one read of every catalogue item), and answers a fallback request with no
store round trip; it is as fresh as the load (a reload refreshes it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.online_store import OnlineStore
from features.online_store.sketch_state import popularity_column
from infra.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class PopularityRanking:
    """``ids`` (n,) int64 most popular first (ties: smaller id first), ``counts`` (n,) float64,
    ``positions`` (n,) int64 of each id in the sorted catalogue ids it was built from."""

    ids: np.ndarray
    counts: np.ndarray
    positions: np.ndarray

    @classmethod
    def from_store(
        cls, store: OnlineStore, item_ids: np.ndarray, window_days: int
    ) -> PopularityRanking:
        """Every item of ``item_ids`` (sorted, distinct: the catalogue) ranked by the store's
        ``popularity_cms_{window_days}d``.

        Items the store has not seen count 0 (they still rank, after the rest,
        so a fallback fills k whenever the catalogue has k items).
        """
        reads = store.read_items(np.asarray(item_ids, dtype=np.int64).tolist())
        if reads.get_column("degraded").any():
            log.warning("online store unreadable: the popularity fallback ranks items by id")
        counts = reads.get_column(popularity_column(window_days)).fill_null(0).to_numpy()
        ids = reads.get_column("item_id").to_numpy().astype(np.int64)
        order = np.lexsort((ids, -counts.astype(np.float64)))
        return cls(ids=ids[order], counts=counts[order].astype(np.float64), positions=order)

    def top(self, k: int, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, counts)`` of the ``k`` most popular items; ``eligible`` (n,) bool by catalogue position."""
        keep = eligible[self.positions]
        return self.ids[keep][:k], self.counts[keep][:k]
