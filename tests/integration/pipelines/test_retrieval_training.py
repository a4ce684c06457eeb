"""Retrieval training on Ray Train: it learns, it is deterministic, it survives a crash."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.splits import random_split
from infra.config import RetrievalConfig, SketchConfig
from pipelines.retrieval.data import RetrievalData, prepare_retrieval_data
from pipelines.retrieval.trainer import train_retrieval

pytestmark = pytest.mark.usefixtures("ray_session")

N_USERS, N_ITEMS = 120, 60


def _clustered_data(folder: Path) -> RetrievalData:
    """Users in 4 taste groups, each group interacting with its own 15 items, written to ``folder``."""
    rng = np.random.default_rng(0)
    rows = []
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    for user in range(N_USERS):
        group = user % 4
        items = rng.choice(np.arange(group * 15, group * 15 + 15), size=10, replace=False)
        rows += [(user, int(i), start + dt.timedelta(hours=n)) for n, i in enumerate(items)]
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "ts"], orient="row")
    split = random_split(frame, (0.8, 0.1, 0.1), seed=0)
    users = pl.DataFrame(
        {"user_id": np.arange(N_USERS), "group": [str(u % 2) for u in range(N_USERS)]}
    )
    items = pl.DataFrame({"item_id": np.arange(N_ITEMS), "year": np.arange(N_ITEMS) * 1.0})
    config = RetrievalConfig(history_length=10)
    return prepare_retrieval_data(
        split, users, items, N_USERS, N_ITEMS, config, SketchConfig(), folder
    )


def _config(**overrides: object) -> RetrievalConfig:
    base = {
        "embedding_dim": 16,
        "history_length": 10,
        "hidden": (32,),
        "batch_size": 64,
        "epochs": 4,
        "patience": 10,
        "learning_rate": 0.01,
    }
    return RetrievalConfig(**{**base, **overrides})


def test_training_beats_chance_and_keeps_the_best_epoch(tmp_path: Path) -> None:
    data = _clustered_data(tmp_path / "data")
    trained = train_retrieval(data, _config(), tmp_path)
    assert [h["epoch"] for h in trained.history] == [0, 1, 2, 3]
    # Chance recall@10 is ~10/60 of the 15 in-group items... i.e. about 0.17; taste groups are easy.
    assert trained.best_valid["valid_recall@10"] > 0.5
    best = max(h["valid_recall@10"] for h in trained.history)
    assert trained.best_valid["valid_recall@10"] == pytest.approx(best)


def test_a_streamed_shard_learns_too(tmp_path: Path) -> None:
    # cache_shard off: the worker holds a shuffle buffer of batches, never its whole shard.
    data = _clustered_data(tmp_path / "data")
    trained = train_retrieval(data, _config(cache_shard=False), tmp_path / "runs")
    assert [h["epoch"] for h in trained.history] == [0, 1, 2, 3]
    assert trained.best_valid["valid_recall@10"] > 0.5


def test_a_crashed_worker_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    data = _clustered_data(tmp_path / "data")
    marker = tmp_path / "crashed"
    # Hard negatives on: the miner rebuilds its index after the restart too.
    config = _config(epochs=3, max_failures=1, hard_negatives=2, hard_negative_pool=10)
    trained = train_retrieval(
        data, config, tmp_path / "runs", fault={"crash_marker": str(marker), "crash_after_epoch": 0}
    )
    assert marker.exists()  # the worker did die once
    # After the restart training went on from epoch 1 (not from scratch) and finished.
    assert [h["epoch"] for h in trained.history][-1] == 2
    assert trained.best_valid["valid_recall@10"] > 0.3


def test_same_seed_same_model(tmp_path: Path) -> None:
    data = _clustered_data(tmp_path / "data")
    config = _config(epochs=1)
    a = train_retrieval(data, config, tmp_path / "a").model.state_dict()
    b = train_retrieval(data, config, tmp_path / "b").model.state_dict()
    for key, value in a.items():
        assert np.array_equal(value.numpy(), b[key].numpy()), key


def test_two_workers_train_together_with_ddp(tmp_path: Path) -> None:
    data = _clustered_data(tmp_path / "data")
    # Half a CPU each: two DDP workers (gloo, sparse gradients all-reduced) on the 2-CPU test Ray.
    config = _config(epochs=4, workers=2, cpus_per_worker=0.5)
    trained = train_retrieval(data, config, tmp_path)
    assert [h["epoch"] for h in trained.history] == [0, 1, 2, 3]
    # Each worker sees half the pairs an epoch (half the steps of one worker): ~2× chance (0.17).
    assert trained.best_valid["valid_recall@10"] > 0.35
