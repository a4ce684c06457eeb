"""Reranker training on Ray Train: it learns, keeps its best epoch, saves, survives a crash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from infra.config import RankerConfig
from infra.storage import StoragePath
from models.artifacts import load_reranker, save_reranker
from pipelines.ranker.data import ColumnSpec, RankerData, prepare_ranker_data
from pipelines.ranker.encoded import EncodedSplits, write_ranker_data
from pipelines.ranker.trainer import train_ranker
from serving.scoring import predict

pytestmark = pytest.mark.usefixtures("ray_session")


def _data(n: int = 4000) -> RankerData:
    """Clicks driven by a user-group × item-group match plus a numeric trend."""
    rng = np.random.default_rng(0)
    users = rng.integers(0, 60, n)
    items = rng.integers(0, 40, n)
    x = rng.normal(size=n)
    logit = 2.5 * ((users % 3) == (items % 3)) - 1.5 + 2.0 * x
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    frame = pl.DataFrame({"user_id": users, "item_id": items, "x": x, "label": label})
    spec = ColumnSpec(categorical=("user_id", "item_id"), numeric=("x",))
    return prepare_ranker_data(frame, spec, seed=0)


def _settings(**overrides: object) -> RankerConfig:
    base = {
        "embedding_dim": 8,
        "n_experts": 4,
        "expert_hidden": (16,),
        "expert_dim": 8,
        "batch_size": 128,
        "epochs": 3,
        "patience": 5,
        "learning_rate": 0.01,
    }
    return RankerConfig(**{**base, **overrides})


def _encoded(data: RankerData, folder: Path) -> EncodedSplits:
    return write_ranker_data(data, StoragePath.from_uri(folder), chunk_rows=1000)


def test_training_learns_keeps_the_best_epoch_calibrates_and_saves(tmp_path: Path) -> None:
    data = _data()
    trained = train_ranker(_encoded(data, tmp_path / "data"), _settings(), tmp_path)
    assert [h["epoch"] for h in trained.history] == [1, 2, 3]
    assert trained.best_valid_auc > 0.75
    assert trained.best_valid_auc == pytest.approx(max(h["valid_auc"] for h in trained.history))
    assert trained.calibrator is not None and trained.calibrator.kind == "temperature"
    assert all(h["samples_per_s"] > 0 for h in trained.history)
    # Saved and loaded, it scores exactly as trained (calibrator included).
    save_reranker(trained.model, tmp_path / "model", trained.calibrator)
    loaded = load_reranker(tmp_path / "model")
    assert loaded.calibrator is not None
    assert loaded.calibrator.to_dict() == trained.calibrator.to_dict()
    np.testing.assert_allclose(
        predict(loaded.model, data.test), predict(trained.model, data.test), rtol=0, atol=1e-6
    )


def test_a_crashed_worker_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    data = _data()
    marker = tmp_path / "crashed"
    trained = train_ranker(
        _encoded(data, tmp_path / "data"),
        _settings(max_failures=1),
        tmp_path / "runs",
        fault={"crash_marker": str(marker), "crash_after_epoch": 1},
    )
    assert marker.exists()  # the worker did die once
    # Epoch 1 came from the checkpoint; training went on to the end, not from scratch.
    assert [h["epoch"] for h in trained.history] == [1, 2, 3]
    assert trained.best_valid_auc > 0.75
