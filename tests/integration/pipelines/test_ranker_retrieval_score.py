"""The reranker with the retrieval score as an input, on the tiny preset, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.dataset import read_examples
from features.feature_spec import SPEC_FILE, FeatureSpec
from infra.config import RayrecConfig
from models.artifacts import load_reranker
from pipelines.runner import published
from serving.encoding import RETRIEVAL_SCORE, encode_examples
from serving.scoring import predict

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


def test_the_reranker_reads_the_two_towers_score_of_each_row(
    tiny_default_style_run: RayrecConfig,
) -> None:
    """On the session's tiny run set up as the default preset (tests/conftest.py)."""
    config = tiny_default_style_run
    trained = Path(published(config, "train_ranker").path.local_path())  # type: ignore[union-attr]
    summary = json.loads((trained / "ranker.json").read_text())
    assert summary["retrieval_score"] and summary["test"]["auc"] > 0.6
    # The spec saved beside the model lists the score, standardised by the training rows.
    spec = FeatureSpec.model_validate_json((trained / "model" / SPEC_FILE).read_text())
    feature = spec[RETRIEVAL_SCORE]
    assert feature.mean is not None and feature.std and feature.std > 0
    # Rows without the column cannot be scored by this model: the error names it.
    examples = read_examples(published(config, "features").path).collect()  # type: ignore[union-attr]
    model = load_reranker(trained / "model").model
    with pytest.raises(ValueError, match=RETRIEVAL_SCORE):
        encode_examples(examples.head(5), spec, labelled=False)
    # The score moves the model's output: it is an input, not a passenger.
    rows = examples.head(200).with_columns(pl.lit(0.0).alias(RETRIEVAL_SCORE))
    low = predict(model, encode_examples(rows, spec, labelled=False))
    high = predict(
        model,
        encode_examples(
            rows.with_columns(pl.lit(0.9).alias(RETRIEVAL_SCORE)), spec, labelled=False
        ),
    )
    assert not np.allclose(low, high)
    finetune = json.loads(
        (Path(published(config, "finetune_ranker").path.local_path()) / "finetune.json").read_text()  # type: ignore[union-attr]
    )
    assert "skipped" not in finetune, finetune
