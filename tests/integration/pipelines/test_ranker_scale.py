"""The reranker's trainer at a size the test session's Ray cannot hold: it streams, and the
driver stays small.

The session's Ray has a 256 MB object store (``tests/conftest.py``); the
dataset here is 2M encoded rows, ~420 MB on the Ray Data side, so it can only
pass through the store a window at a time (spilling what does not fit), and a
driver that materialised it would grow by at least that much.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from infra.config import RankerConfig
from infra.storage import StoragePath
from models.moe import FeatureLayout
from pipelines.ranker.encoded import write_encoded_parts
from pipelines.ranker.trainer import train_ranker
from serving.encoding import RankerPart

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]

ROWS = 2_000_000
CHUNK = 200_000
# 24 categorical columns: 24 x 8 bytes + label, user, numeric ≈ 210 bytes a row.
COLUMNS = 24
# The driver may grow by this much while the trainer runs: well under the data's size.
DRIVER_GROWTH_MB = 200


def _chunks(rows: int, seed: int) -> Iterator[RankerPart]:
    """Random rows whose click depends on the first column's parity (learnable by LR)."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        categorical = torch.randint(1, 100, (n, COLUMNS), generator=generator)
        numeric = torch.randn(n, 1, generator=generator)
        logit = 2.0 * (categorical[:, 0] % 2).float() - 1.0 + numeric[:, 0]
        labels = (torch.rand(n, generator=generator) < torch.sigmoid(logit)).float()
        yield RankerPart(
            categorical=categorical,
            numeric=numeric,
            sequences=(),
            labels=labels,
            users=torch.randint(0, 1000, (n,), generator=generator),
        )


def _peak_rss_while(run: threading.Event, peak: list[int]) -> None:
    process = psutil.Process()
    while not run.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.2)


def test_a_dataset_larger_than_the_object_store_trains_with_a_small_driver(
    tmp_path: Path,
) -> None:
    layout = FeatureLayout(categorical=(100,) * COLUMNS, numeric=1, sequences=())
    splits = write_encoded_parts(
        StoragePath.from_uri(tmp_path / "data"),
        layout,
        {"train": _chunks(ROWS, 0), "valid": _chunks(20_000, 1), "test": _chunks(20_000, 2)},
    )
    assert splits.rows["train"] == ROWS
    settings = RankerConfig(
        kind="logistic", embedding_dim=4, batch_size=8192, epochs=1, calibration="none"
    )
    before = psutil.Process().memory_info().rss
    done, peak = threading.Event(), [before]
    watcher = threading.Thread(target=_peak_rss_while, args=(done, peak), daemon=True)
    watcher.start()
    try:
        trained = train_ranker(splits, settings, tmp_path / "runs")
    finally:
        done.set()
        watcher.join()
    assert trained.history[0]["train_rows"] == ROWS
    assert trained.best_valid_auc > 0.7
    growth_mb = (peak[0] - before) / 2**20
    assert growth_mb < DRIVER_GROWTH_MB, f"the driver grew by {growth_mb:.0f} MB"
