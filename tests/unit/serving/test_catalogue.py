"""Catalogue masks and request validation, on hand-made items."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from serving.catalogue import Catalogue
from serving.schemas import Filters, RecommendationRequest

# Item 9 is indexed but has no row in the items table; item 7 has a null category;
# item 50 has attributes but is not indexed.
ITEMS = pl.DataFrame(
    {
        "item_id": [3, 5, 7, 11, 13, 50],
        "category": ["a", "b", None, "a", "c", "a"],
    }
)
INDEXED = np.array([13, 3, 9, 5, 7, 11], dtype=np.int64)


def test_ids_are_sorted_and_positions_mark_strangers() -> None:
    catalogue = Catalogue(INDEXED, ITEMS)
    assert catalogue.ids.tolist() == [3, 5, 7, 9, 11, 13]
    assert catalogue.positions(np.array([11, 50, 3, -1])).tolist() == [4, -1, 0, -1]


def test_category_rules_by_hand() -> None:
    catalogue = Catalogue(INDEXED, ITEMS)
    assert catalogue.allowed(Filters()) is None

    def passed(filters: Filters) -> list[int]:
        mask = catalogue.allowed(filters)
        assert mask is not None
        return catalogue.ids[mask].tolist()

    assert passed(Filters(category_in=("a",))) == [3, 11]
    assert passed(Filters(category_in=("a", "c"))) == [3, 11, 13]
    # Items without a category fail an "in" rule and pass an "out" rule.
    assert passed(Filters(category_out=("a",))) == [5, 7, 9, 13]
    assert passed(Filters(category_in=("a", "b"), category_out=("b",))) == [3, 11]
    # A category no item has matches nothing (and bans nothing).
    assert passed(Filters(category_in=("zzz",))) == []
    assert passed(Filters(category_out=("zzz",))) == [3, 5, 7, 9, 11, 13]


def test_eligible_drops_banned_ids_and_ignores_strangers() -> None:
    catalogue = Catalogue(INDEXED, ITEMS)
    mask = catalogue.eligible(np.array([5, 50, 13]), None)
    assert catalogue.ids[mask].tolist() == [3, 7, 9, 11]
    allowed = catalogue.allowed(Filters(category_in=("a",)))
    mask = catalogue.eligible(np.array([3]), allowed)
    assert catalogue.ids[mask].tolist() == [11]
    assert allowed is not None and allowed.sum() == 2  # the rule's mask is left as it was


def test_requests_reject_unknown_fields_and_k_below_one() -> None:
    assert RecommendationRequest(user_id=4).k == 10
    with pytest.raises(ValidationError, match="k"):
        RecommendationRequest(user_id=4, k=0)
    with pytest.raises(ValidationError, match="colour"):
        RecommendationRequest.model_validate({"user_id": 4, "colour": "red"})
    with pytest.raises(ValidationError, match="category_of"):
        RecommendationRequest.model_validate({"user_id": 4, "filters": {"category_of": ["a"]}})
