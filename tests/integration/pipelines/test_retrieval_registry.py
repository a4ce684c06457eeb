"""The retrieval model in a real MLflow (SQLite store): logged, loaded back, gated promotion."""

from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from infra.config import MlflowConfig
from infra.storage import StoragePath
from infra.tracking import setup_mlflow, tracking_uri
from models.two_tower import TwoTowerConfig, TwoTowerModel
from pipelines.retrieval.registry import (
    CHALLENGER,
    CHAMPION,
    log_training_history,
    log_two_tower,
    register_and_gate,
)


def _model(seed: int) -> TwoTowerModel:
    torch.manual_seed(seed)
    model = TwoTowerModel(TwoTowerConfig(n_items=40, n_users=5, embedding_dim=8, history_length=3))
    return model.eval()


def test_logged_model_loads_back_with_the_same_scores_and_promotion_is_gated(
    tmp_path: Path,
) -> None:
    workdir = StoragePath.from_uri(tmp_path)
    experiment = setup_mlflow(MlflowConfig(experiment="retrieval-test"), workdir)
    client = MlflowClient(tracking_uri(MlflowConfig(), workdir))
    model = _model(0)
    with mlflow.start_run(experiment_id=experiment) as run:
        log_training_history([{"epoch": 0, "loss": 2.0}, {"epoch": 1, "loss": 1.5}])
        uri = log_two_tower(model)
        first = register_and_gate(uri, "retrieval", "recall@10", 0.30, client=client)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in losses] == [(0, 2.0), (1, 1.5)]
    assert first.promoted and first.reason == "no champion yet"

    # The registered champion, loaded through MLflow, scores like the model in memory.
    loaded = mlflow.pyfunc.load_model(f"models:/retrieval@{CHAMPION}")
    frame = pd.DataFrame({"user_id": [0, 3], "history": [[1, 2], []]})
    predicted = loaded.predict(frame, params={"k": 5})
    history = torch.tensor([[2, 3, 0], [0, 0, 0]])
    with torch.no_grad():
        expected = (
            model.user_tower(torch.tensor([0, 3]), history) @ model.all_item_vectors().T
        ).topk(5)
    assert np.array_equal(np.stack(predicted["item_ids"]), expected.indices.numpy())
    assert np.allclose(np.stack(predicted["scores"]), expected.values.numpy(), atol=1e-6)

    with mlflow.start_run(experiment_id=experiment):
        worse = register_and_gate(
            log_two_tower(_model(1)), "retrieval", "recall@10", 0.20, client=client
        )
    assert not worse.promoted and "does not beat" in worse.reason
    assert str(client.get_model_version_by_alias("retrieval", CHAMPION).version) == first.version
    assert str(client.get_model_version_by_alias("retrieval", CHALLENGER).version) == worse.version

    with mlflow.start_run(experiment_id=experiment):
        better = register_and_gate(
            log_two_tower(_model(2)), "retrieval", "recall@10", 0.35, client=client
        )
    assert better.promoted
    assert str(client.get_model_version_by_alias("retrieval", CHAMPION).version) == better.version
