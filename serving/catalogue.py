"""The items a request may get: the index's ids, their categories, and the business rules.

Filters are evaluated as boolean masks over the catalogue (sorted item ids),
built once per request from per-item category codes, so a rule costs a few
vectorised comparisons whatever the catalogue size.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from serving.schemas import Filters

# Category code of an item the items table gives no category.
NO_CATEGORY = -1


class Catalogue:
    """``ids`` (n,) int64 sorted: every item the index can return; ``codes`` (n,) their categories."""

    def __init__(self, item_ids: np.ndarray, items: pl.DataFrame) -> None:
        self.ids = np.unique(np.asarray(item_ids, dtype=np.int64))
        if "category" in items.columns:
            known = items.select("item_id", pl.col("category").cast(pl.String)).drop_nulls()
            names = sorted(set(known.get_column("category").to_list()))
        else:
            known, names = pl.DataFrame({"item_id": [], "category": []}), []
        self._code_of = {name: code for code, name in enumerate(names)}
        codes = np.full(self.ids.size, NO_CATEGORY, dtype=np.int64)
        if known.height:
            item_ids = known.get_column("item_id").to_numpy().astype(np.int64)
            item_codes = np.array([self._code_of[c] for c in known.get_column("category")])
            at = self.positions(item_ids)
            codes[at[at >= 0]] = item_codes[at >= 0]
        self.codes = codes
        # Items the table marks ``available = false`` (out of stock, withdrawn) are
        # never served; a missing column or a null means available.
        if "available" in items.columns:
            gone = items.filter(pl.col("available").cast(pl.Boolean).not_()).get_column("item_id")
            self.unavailable = np.intersect1d(gone.to_numpy().astype(np.int64), self.ids)
        else:
            self.unavailable = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ids.size)

    def positions(self, item_ids: np.ndarray) -> np.ndarray:
        """(m,) int64 position of each id in :attr:`ids`, -1 for ids not in the catalogue."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if self.ids.size == 0:
            return np.full(item_ids.shape, -1, dtype=np.int64)
        at = np.searchsorted(self.ids, item_ids).clip(max=self.ids.size - 1)
        return np.where(self.ids[at] == item_ids, at, -1)

    def allowed(self, filters: Filters) -> np.ndarray | None:
        """(n,) bool: the catalogue items ``filters`` let through; None when they set no rule."""
        if filters.category_in is None and not filters.category_out:
            return None
        mask = np.ones(self.ids.size, dtype=bool)
        if filters.category_in is not None:
            mask &= np.isin(self.codes, self._codes(filters.category_in))
        if filters.category_out:
            mask &= ~np.isin(self.codes, self._codes(filters.category_out))
        return mask

    def eligible(self, banned: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        """(n,) bool: allowed (None: all) and not among the ``banned`` item ids."""
        mask = np.ones(self.ids.size, dtype=bool) if allowed is None else allowed.copy()
        at = self.positions(banned)
        mask[at[at >= 0]] = False
        return mask

    def _codes(self, names: tuple[str, ...]) -> np.ndarray:
        """Codes of the named categories; names no item has match nothing."""
        return np.array([self._code_of[n] for n in names if n in self._code_of], dtype=np.int64)
