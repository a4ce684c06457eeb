"""The retrieval score as a reranker input: the two-tower's own inner product, no leakage."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from features.feature_spec import Entity, Feature, FeatureKind, FeatureSpec, Normalization
from infra.config import load_config
from models.two_tower import TwoTowerConfig, TwoTowerModel
from pipelines.ranker.retrieval_feature import (
    retrieval_score_problem,
    with_retrieval_feature,
    with_retrieval_score,
)
from serving.encoding import RETRIEVAL_SCORE


def _model() -> TwoTowerModel:
    torch.manual_seed(0)
    config = TwoTowerConfig(n_items=6, n_users=4, embedding_dim=8, hidden=(16,), history_length=3)
    return TwoTowerModel(config).eval()


def _frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [0, 1, 3, 9, 2],
            "item_id": [5, 0, 2, 1, 6],
            "user_history": [[1, 2, 3, 4], [], None, [0], [99, 1]],
            "label": [1.0, 0.0, 1.0, 0.0, 1.0],
        },
        schema_overrides={"user_history": pl.List(pl.Int64)},
    )


def test_scores_are_the_towers_inner_product_of_the_rows_own_history() -> None:
    model = _model()
    scored = with_retrieval_score(_frame(), model, history_length=3)
    scores = scored.get_column(RETRIEVAL_SCORE).to_list()
    with torch.no_grad():
        # Row 0: the 3 most recent history ids (2, 3, 4) as item rows (+1).
        user = model.user_tower(torch.tensor([0]), torch.tensor([[3, 4, 5]]))
        item = model.item_tower(torch.tensor([5]))
        empty = model.user_tower(torch.tensor([1]), torch.tensor([[0, 0, 0]]))
        first = model.item_tower(torch.tensor([0]))
    assert scores[0] == pytest.approx(float((user * item).sum()), abs=1e-6)
    # An empty (or null) history pools nothing, as a new user's does at serving.
    assert scores[1] == pytest.approx(float((empty * first).sum()), abs=1e-6)
    assert scores[2] is not None
    # A user past the model's users and an item past its items get no score.
    assert scores[3] is None and scores[4] is None
    # Vectors are L2-normalised: an inner product is a cosine.
    assert all(-1.0 - 1e-6 <= s <= 1.0 + 1e-6 for s in scores if s is not None)


def test_the_feature_is_standardised_by_the_training_rows() -> None:
    spec = FeatureSpec(
        features=(
            Feature(name="user_id", kind=FeatureKind.CATEGORICAL, entity=Entity.USER, dtype="int64", hash_buckets=4),
        )
    )  # fmt: skip
    train = pl.DataFrame({RETRIEVAL_SCORE: [0.2, 0.4, None, 0.6]})
    augmented = with_retrieval_feature(spec, train)
    feature = augmented[RETRIEVAL_SCORE]
    assert feature.normalization == Normalization.STANDARD
    assert feature.mean == pytest.approx(0.4) and feature.std == pytest.approx(0.2)
    # Adding it twice replaces it.
    assert with_retrieval_feature(augmented, train).names == ["user_id", RETRIEVAL_SCORE]
    assert np.isclose(feature.std or 0, np.std([0.2, 0.4, 0.6], ddof=1))


def test_a_split_that_trains_retrieval_on_the_test_period_is_refused() -> None:
    random = load_config("tiny", ["models.split.kind=random"], environ={})
    assert "models.split.kind is 'random'" in (retrieval_score_problem(random) or "")
    temporal = load_config("tiny", ["models.split.kind=temporal"], environ={})
    assert retrieval_score_problem(temporal) is None
    other_ratios = load_config(
        "tiny",
        ["models.split.kind=temporal", "models.ranker.split_ratios=[0.7,0.2,0.1]"],
        environ={},
    )
    assert "split by time with models.split.ratios" in (retrieval_score_problem(other_ratios) or "")


def test_the_ranker_steps_refuse_it_by_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from infra.storage import StoragePath
    from pipelines.step import StepContext
    from pipelines.steps.ranker import retrieval_transform

    config = load_config("tiny", ["models.ranker.retrieval_score=true"], environ={})
    ctx = StepContext(
        config, "test", StoragePath.from_uri(tmp_path), StoragePath.from_uri(tmp_path), {}, "test"
    )
    with pytest.raises(ValueError, match="models.ranker.retrieval_score: models.split.kind"):
        retrieval_transform(ctx, config.models.ranker, _frame().columns)
