"""Embedding drift (domain classifier) and ANN health (recall against exact search)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from infra.storage import StoragePath
from monitoring.embeddings import EmbeddingReference, ann_health, day_noise, embedding_drift


def _vectors(n: int, shift: float, rng: np.random.Generator, d: int = 16) -> np.ndarray:
    out = rng.normal(0.0, 1.0, (n, d))
    out[:, 0] += shift
    return out.astype(np.float32)


def test_same_distribution_is_no_drift_and_a_shift_is() -> None:
    rng = np.random.default_rng(0)
    reference = _vectors(3_000, 0.0, rng)
    days = np.repeat(np.arange(3), 1_000)
    noise = day_noise(reference, days, seed=0)
    assert noise is not None and noise < 0.05
    same = embedding_drift("user", reference, _vectors(2_000, 0.0, rng), noise, seed=1)
    assert same.judged and not same.drifted
    moved = embedding_drift("user", reference, _vectors(2_000, 0.8, rng), noise, seed=1)
    assert moved.drifted and moved.details["auc"] > 0.6
    few = embedding_drift("user", reference, _vectors(50, 0.0, rng), noise, seed=1)
    assert not few.judged and "50 window vectors" in few.reason
    assert day_noise(reference[:2_000], days[:2_000], seed=0) is None


def test_noisy_days_raise_the_threshold() -> None:
    """Days that differ by an offset (clustered traffic): a window shifted as much passes."""
    rng = np.random.default_rng(1)
    offsets = [0.0, 0.4, -0.4]
    reference = np.concatenate([_vectors(1_000, o, rng) for o in offsets])
    days = np.repeat(np.arange(3), 1_000)
    noise = day_noise(reference, days, seed=0)
    assert noise is not None and noise > 0.05
    check = embedding_drift("user", reference, _vectors(1_000, 0.4, rng), noise, seed=2)
    assert check.threshold > 0.05 and not check.drifted


def test_ann_health_is_the_recall_of_found_ids_against_exact_ones() -> None:
    exact = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    same = ann_health(exact.copy(), exact, min_recall=0.9)
    assert same.judged and same.statistic == 1.0 and not same.drifted
    # Query 1 finds 2 of 4, query 2 both of its 2: mean recall 0.75.
    found = np.array([[1, 2, 9, 8], [6, 5, 7, 0]])
    low = ann_health(found, exact, min_recall=0.9)
    assert low.statistic == 0.75 and low.drifted
    assert not ann_health(np.zeros((0, 4), int), np.zeros((0, 4), int), 0.9).judged


def test_embedding_reference_round_trips_and_refuses_mismatches(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    vectors = {"user": _vectors(300, 0.0, rng, d=8), "item": _vectors(300, 0.0, rng, d=8)}
    folder = StoragePath.from_uri(str(tmp_path))
    assert EmbeddingReference.load(folder) is None
    reference = EmbeddingReference(vectors, {"user": 0.02, "item": None}, {"train_retrieval": "v1"})
    reference.save(folder)
    loaded = EmbeddingReference.load(folder)
    assert loaded is not None and loaded.rows == {"user": 300, "item": 300} and loaded.dim == 8
    assert np.array_equal(loaded.vectors["item"], vectors["item"])
    assert loaded.noise == {"user": 0.02, "item": None}
    assert loaded.model == {"train_retrieval": "v1"}
    fewer = EmbeddingReference({"user": vectors["user"][:10], "item": vectors["item"]}, {}, {})
    assert fewer.rows == {"user": 10, "item": 300}
    with pytest.raises(ValueError, match="one d"):
        EmbeddingReference({"user": vectors["user"], "item": vectors["item"][:, :4]}, {}, {})
    with pytest.raises(ValueError, match="needs"):
        EmbeddingReference({"user": vectors["user"]}, {}, {})
