"""The train_retrieval step on the tiny world: it learns, its workers get a path, not the data."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infra.config import RayrecConfig
from pipelines.main import MAIN
from pipelines.retrieval import trainer as retrieval_trainer
from pipelines.runner import published, run_pipeline

pytestmark = pytest.mark.usefixtures("ray_session")


def test_the_step_learns_from_files_and_ships_no_data_to_its_workers(
    tiny_config: RayrecConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped: list[dict[str, Any]] = []

    class RecordingTrainer(retrieval_trainer.TorchTrainer):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            shipped.append(kwargs["train_loop_config"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(retrieval_trainer, "TorchTrainer", RecordingTrainer)
    run_pipeline(MAIN, tiny_config, until="train_retrieval", track=False)

    (config,) = shipped
    # The config and a folder's path: nothing that grows with the events (nor the users).
    assert not any(isinstance(value, np.ndarray) for value in config.values())
    assert len(pickle.dumps(config)) < 8192
    step = published(tiny_config, "train_retrieval")
    assert step is not None
    out = Path(step.path.local_path())
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["loss"] < history[0]["loss"]
    summary = json.loads((out / "retrieval.json").read_text())
    assert summary["train_pairs"] > 0 and summary["test"]["recall@10"] > 0
    # The split's scratch folder went with the step.
    scratch = Path(tiny_config.paths.workdir) / "scratch"
    assert not scratch.exists() or not any(scratch.iterdir())
