"""Items newer than the two-tower: indexed by content-only vectors, counted by the index step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from features.encoding import AttributeEncoding, AttributeTable, fit_encoding
from infra.config import load_config
from infra.publish import Published
from infra.storage import StoragePath
from models.artifacts import load_item_encoding, save_item_encoding, save_two_tower
from models.index import ExactIndex, load_index
from models.two_tower import TwoTowerConfig, TwoTowerModel
from pipelines.retrieval.cold_start import catalogue_vectors, content_only_vectors
from pipelines.step import StepContext
from pipelines.steps.retrieval import run_index

N_ITEMS = 6


def _trained_items() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": list(range(N_ITEMS)),
            "category": ["c1", "c1", "c2", "c2", "c3", "c3"],
            "price": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        }
    )


def _catalogue() -> pl.DataFrame:
    """The trained items, then 6 and 7 (item 2's attributes) and 8 (a category no
    training item had, no price)."""
    new = pl.DataFrame(
        {"item_id": [8, 6, 7], "category": ["c9", "c2", "c2"], "price": [None, 3.0, 3.0]}
    )
    return pl.concat([_trained_items(), new])


def _model(encoding: AttributeEncoding, use_attributes: bool = True) -> TwoTowerModel:
    torch.manual_seed(0)
    config = TwoTowerConfig(
        n_items=N_ITEMS,
        n_users=4,
        embedding_dim=8,
        hidden=(16,),
        history_length=3,
        use_attributes=use_attributes,
    )
    return TwoTowerModel(config, item_attributes=encoding.apply(_trained_items(), N_ITEMS)).eval()


@pytest.fixture
def encoding() -> AttributeEncoding:
    return fit_encoding(_trained_items(), "item_id")


def test_the_encoding_survives_its_json(encoding: AttributeEncoding, tmp_path: Path) -> None:
    assert AttributeEncoding.from_dict(json.loads(json.dumps(encoding.to_dict()))) == encoding
    assert load_item_encoding(tmp_path) is None
    save_item_encoding(encoding, tmp_path)
    assert load_item_encoding(tmp_path) == encoding


def test_new_items_get_content_only_vectors_by_the_training_codes(
    encoding: AttributeEncoding,
) -> None:
    model = _model(encoding)
    catalogue = catalogue_vectors(model, encoding, _catalogue())
    assert catalogue.content_only == 3 and catalogue.skipped is None
    assert catalogue.ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    with torch.no_grad():
        trained = model.all_item_vectors().numpy()
        # Item 2's attributes (code of c2 = 2, price 3.0 standardised) without an id row.
        like_two = model.item_tower.content_only(encoding.apply(_trained_items()[2]))
        # An unknown category reads as code 0, a missing price as the mean (0 standardised).
        unknown = model.item_tower.content_only(
            AttributeTable(
                np.zeros((1, 1), np.int64),
                (3,),
                np.zeros((1, 1), np.float32),
                np.zeros((1, 0), np.float32),
            )
        )
    np.testing.assert_array_equal(catalogue.vectors[:N_ITEMS], trained)
    np.testing.assert_allclose(catalogue.vectors[6], like_two[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(catalogue.vectors[6], catalogue.vectors[7], atol=1e-6)
    np.testing.assert_allclose(catalogue.vectors[8], unknown[0].numpy(), atol=1e-6)
    assert np.allclose(np.linalg.norm(catalogue.vectors, axis=1), 1.0, atol=1e-5)

    # Retrievable: a user vector near item 6 finds it (or its twin 7) first, and
    # item 6's nearest other item is 7, which has the same vector (up to rounding).
    index = ExactIndex(catalogue.ids, catalogue.vectors)
    query = catalogue.vectors[6] + 0.01 * np.random.default_rng(0).normal(size=8)
    _, ids = index.search(query[None, :].astype(np.float32), 2)
    assert set(ids[0].tolist()) == {6, 7}
    scores, ids = index.search(index.reconstruct(np.array([6])), 1, [[6]])
    assert ids[0, 0] == 7 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_without_attributes_or_encoding_new_items_are_left_out(
    encoding: AttributeEncoding,
) -> None:
    plain = catalogue_vectors(_model(encoding, use_attributes=False), encoding, _catalogue())
    assert plain.content_only == 0 and "no item attributes" in (plain.skipped or "")
    assert plain.ids.tolist() == list(range(N_ITEMS))
    missing = catalogue_vectors(_model(encoding), None, _catalogue())
    assert missing.content_only == 0 and "no item encoding" in (missing.skipped or "")
    # Nothing newer than the model: nothing to skip.
    none = catalogue_vectors(_model(encoding), None, _trained_items())
    assert none.content_only == 0 and none.skipped is None


def test_an_encoding_of_another_model_is_refused(encoding: AttributeEncoding) -> None:
    wider = fit_encoding(_trained_items().with_columns(pl.col("price").alias("weight")), "item_id")
    with pytest.raises(ValueError, match="item encoding gives"):
        content_only_vectors(_model(encoding), wider, _catalogue().filter(pl.col("item_id") > 5))


def test_the_index_step_indexes_and_counts_the_new_items(
    encoding: AttributeEncoding, tmp_path: Path
) -> None:
    model = _model(encoding)
    trained, validated = tmp_path / "train_retrieval", tmp_path / "validate"
    save_two_tower(model, trained / "model")
    save_item_encoding(encoding, trained / "model")
    validated.mkdir()
    _catalogue().write_parquet(validated / "items.parquet")
    out = tmp_path / "out"
    out.mkdir()
    config = load_config("tiny", [f"paths.workdir={tmp_path}"], environ={})
    ctx = StepContext(
        config,
        "test",
        StoragePath.from_uri(tmp_path),
        StoragePath.from_uri(out),
        {
            name: Published("v", StoragePath.from_uri(folder), {})
            for name, folder in (("train_retrieval", trained), ("validate", validated))
        },
        "test",
    )
    result = run_index(ctx)
    summary = json.loads((out / "index.json").read_text())
    assert summary["content_only_items"] == 3 and "content_only_skipped" not in summary
    assert result.row_counts == {"items": 9, "content_only_items": 3}
    index = load_index(out / "index")
    assert sorted(index.ids.tolist()) == list(range(9))
    expected = catalogue_vectors(model, encoding, _catalogue())
    np.testing.assert_allclose(index.reconstruct(expected.ids), expected.vectors, atol=1e-6)
