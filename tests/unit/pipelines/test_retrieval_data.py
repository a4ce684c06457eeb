"""Retrieval data on storage: written once, opened anywhere, nothing O(events) in a worker's config."""

from __future__ import annotations

import datetime as dt
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from features.splits import random_split, user_item_matrix
from infra.config import RetrievalConfig, SketchConfig
from pipelines.retrieval import data as retrieval_data
from pipelines.retrieval.data import RetrievalData, prepare_retrieval_data
from pipelines.retrieval.trainer import loop_config

N_USERS, N_ITEMS = 50, 40


def _data(folder: Path, per_user: int, seed: int = 0) -> tuple[RetrievalData, pl.DataFrame]:
    """``per_user`` interactions for each of ``N_USERS`` users over ``N_ITEMS`` items."""
    rng = np.random.default_rng(1)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    rows = [
        (user, int(item), start + dt.timedelta(minutes=n))
        for user in range(N_USERS)
        for n, item in enumerate(rng.integers(0, N_ITEMS, size=per_user))
    ]
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "ts"], orient="row")
    split = random_split(frame, (0.8, 0.1, 0.1), seed=0)
    users = pl.DataFrame(
        {"user_id": np.arange(N_USERS), "group": [str(u % 3) for u in range(N_USERS)]}
    )
    items = pl.DataFrame({"item_id": np.arange(N_ITEMS), "year": np.arange(N_ITEMS) * 1.0})
    config = RetrievalConfig(history_length=5, seed=seed, cpus_per_worker=1.0)
    data = prepare_retrieval_data(
        split, users, items, N_USERS, N_ITEMS, config, SketchConfig(), folder
    )
    return data, split.train


def test_pairs_are_the_training_part_in_several_files_in_a_seeded_mixed_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retrieval_data, "PAIRS_PER_FILE", 100)
    data, train = _data(tmp_path / "a", per_user=20)
    assert data.n_train == train.height
    assert len(data.pair_files) == -(-train.height // 100)
    pairs = pl.DataFrame({"user_id": data.train_users, "item_id": data.train_items})
    expected = train.select(pl.col("user_id", "item_id").cast(pl.Int64))
    assert pairs.sort("user_id", "item_id").equals(expected.sort("user_id", "item_id"))
    # Mixed: a batch of 64 consecutive pairs holds many users, not one or two.
    assert pairs.head(64)["user_id"].n_unique() > 20
    again, _ = _data(tmp_path / "b", per_user=20)
    assert np.array_equal(again.train_users, data.train_users)
    assert np.array_equal(again.train_items, data.train_items)
    other, _ = _data(tmp_path / "c", per_user=20, seed=1)
    assert not np.array_equal(other.train_users, data.train_users)


def test_matrices_are_memory_mapped_csr_of_the_parts(tmp_path: Path) -> None:
    data, train = _data(tmp_path, per_user=20)
    indptr, indices = user_item_matrix(train, N_USERS)
    seen = data.seen_for_valid
    assert np.array_equal(seen.indptr, indptr)
    assert np.array_equal(seen.indices, indices)
    # Read-only views of the files: no process holds its own copy.
    assert not seen.indices.flags.writeable
    assert data.seen_for_test.indices.size >= seen.indices.size
    assert data.valid.n_users == data.test.n_users == N_USERS
    assert data.item_counts.sum() == train.height
    assert data.history.shape == (N_USERS, 5)


def _arrays(value: Any) -> list[np.ndarray]:
    """Every numpy array inside ``value`` (dicts, lists, tuples, dataclass-like objects)."""
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _arrays(v)]
    if isinstance(value, list | tuple):
        return [a for v in value for a in _arrays(v)]
    return []


def test_the_workers_config_does_not_grow_with_the_events(tmp_path: Path) -> None:
    small, _ = _data(tmp_path / "small", per_user=10)
    large, _ = _data(tmp_path / "large", per_user=200)
    assert large.n_train > 15 * small.n_train
    config = RetrievalConfig(cpus_per_worker=1.0)
    sizes = []
    for data in (small, large):
        shipped = loop_config(data, config)
        assert _arrays(shipped) == []
        sizes.append(len(pickle.dumps(shipped)))
    # The same config but for the folder's name: no array of the interactions travels.
    assert abs(sizes[0] - sizes[1]) < 16
    assert max(sizes) < 8192
    # The opened data itself is O(users + items) too: its pickle does not grow with events.
    assert abs(len(pickle.dumps(small)) - len(pickle.dumps(large))) < 256
