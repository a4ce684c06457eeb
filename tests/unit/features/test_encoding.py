"""Entity attributes encoded as arrays for the towers."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from features.encoding import encode_attributes, fit_encoding


def _items() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": [0, 1, 2, 3],
            "title": [f"title {i}" for i in range(4)],
            "year": [1990.0, None, 2000.0, None],
            "kind": ["a", "b", None, "a"],
            "genres": [["x", "y"], ["y"], [], ["y"]],
        }
    )


def test_each_type_gets_its_encoding() -> None:
    _, table = encode_attributes(_items(), "item_id", n=5)
    assert table.names == ("kind", "year", "genres")  # the near-unique title is skipped
    # Vocabulary codes start at 1; missing and unseen ids read 0.
    assert table.categorical[:, 0].tolist() == [1, 2, 0, 1, 0]
    assert table.cardinalities == (2,)
    # year: mean 1995, std 7.07; missing -> the mean -> 0.
    assert table.numeric[:, 0] == pytest.approx([-0.7071, 0.0, 0.7071, 0.0, 0.0], abs=1e-3)
    assert table.multi_hot.tolist() == [[1, 1], [0, 1], [0, 0], [0, 1], [0, 0]]


def test_the_fitted_encoding_applies_to_new_entities() -> None:
    encoding = fit_encoding(_items(), "item_id")
    new = pl.DataFrame(
        {"item_id": [7], "title": ["t"], "year": [2000.0], "kind": ["b"], "genres": [["x", "z"]]}
    )
    table = encoding.apply(new)
    assert table.categorical.tolist() == [[2]]
    assert table.multi_hot.tolist() == [[1.0, 0.0]]
    assert np.isfinite(table.numeric).all()


def test_missing_key_is_named() -> None:
    with pytest.raises(ValueError, match="item_id"):
        fit_encoding(pl.DataFrame({"x": [1]}), "item_id")
