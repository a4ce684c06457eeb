"""MLflow for retrieval: the model as a pyfunc, registered, promoted by a gated metric.

The model is logged as an MLflow *pyfunc* over our own files
(:mod:`models.artifacts`: JSON + a tensors-only state dict) rather than
``mlflow.pytorch.log_model``, whose default pt2 export fails on
data-dependent code and whose pickle format ties the file to class paths.
Aliases: a new version gets ``challenger``; ``champion`` moves to it only
when its gated metric beats the champion's (one ``set_registered_model_alias``
call, so readers see either the old or the new champion, never none).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.types.schema import Array

from models.artifacts import load_two_tower, save_two_tower
from models.two_tower import PAD, TwoTowerModel

CHALLENGER = "challenger"
CHAMPION = "champion"
# Version tags holding the gated metric, so promotion compares without run lookups.
GATE_METRIC_TAG = "gate_metric"
GATE_VALUE_TAG = "gate_value"


class TwoTowerPyfunc(mlflow.pyfunc.PythonModel):
    """``predict``: a frame of ``user_id`` (+ optional ``history``, item ids, most recent
    last) -> ``item_ids`` and ``scores`` of the top ``k`` items (params, default 10)."""

    def load_context(self, context: Any) -> None:
        self.model = load_two_tower(Path(context.artifacts["model"]))
        with torch.no_grad():
            self.items = self.model.all_item_vectors()

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        users = torch.as_tensor(model_input["user_id"].to_numpy(dtype=np.int64))
        length = self.model.config.history_length
        history = torch.full((len(users), length), PAD, dtype=torch.long)
        if "history" in model_input:
            for row, items in enumerate(model_input["history"]):
                recent = [int(i) + 1 for i in list(items)[-length:]]
                history[row, : len(recent)] = torch.as_tensor(recent, dtype=torch.long)
        with torch.no_grad():
            scores = self.model.user_tower(users, history) @ self.items.T
            top = scores.topk(min(k, scores.shape[1]), dim=1)
        return pd.DataFrame(
            {"item_ids": list(top.indices.numpy()), "scores": list(top.values.numpy())}
        )


SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec(DataType.long, "user_id"),
            ColSpec(Array(DataType.long), "history", required=False),
        ]
    ),
    outputs=Schema(
        [
            TensorSpec(np.dtype(np.int64), (-1, -1), "item_ids"),
            TensorSpec(np.dtype(np.float32), (-1, -1), "scores"),
        ]
    ),
    params=ParamSchema([ParamSpec("k", DataType.long, 10)]),
)


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    model_uri: str
    promoted: bool
    reason: str

    def record(self, gate_metric: str, gate_value: float) -> dict[str, Any]:
        """What a register step publishes (``registered.json``) and keeps in its manifest."""
        return {
            "name": self.name,
            "version": self.version,
            "model_uri": self.model_uri,
            "promoted": self.promoted,
            "reason": self.reason,
            "gate_metric": gate_metric,
            "gate_value": gate_value,
        }


def log_two_tower(model: TwoTowerModel, extra_artifacts: dict[str, Path] | None = None) -> str:
    """Log ``model`` (and e.g. the feature spec, the index folder) to the active run; its URI."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "two_tower"
        save_two_tower(model, folder)
        artifacts = {
            "model": str(folder),
            **{k: str(v) for k, v in (extra_artifacts or {}).items()},
        }
        info = mlflow.pyfunc.log_model(
            name="retrieval_model",
            python_model=TwoTowerPyfunc(),
            artifacts=artifacts,
            signature=SIGNATURE,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas"],
        )
    return str(info.model_uri)


def register_and_gate(
    model_uri: str,
    name: str,
    metric: str,
    value: float,
    higher_is_better: bool = True,
    client: MlflowClient | None = None,
) -> Registered:
    """Register ``model_uri`` as a new version of ``name`` with alias ``challenger``;
    move ``champion`` to it when ``value`` of ``metric`` beats the champion's."""
    client = client or MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(name, model_uri, run_id=_run_id(model_uri))
    client.set_model_version_tag(name, version.version, GATE_METRIC_TAG, metric)
    client.set_model_version_tag(name, version.version, GATE_VALUE_TAG, repr(float(value)))
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    champion = _champion(client, name)
    if champion is None:
        promoted, reason = True, "no champion yet"
    else:
        old_metric = champion.tags.get(GATE_METRIC_TAG)
        old_value = float(champion.tags.get(GATE_VALUE_TAG, "nan"))
        if old_metric != metric:
            promoted, reason = False, f"champion is gated on {old_metric!r}, not {metric!r}"
        else:
            better = value > old_value if higher_is_better else value < old_value
            promoted = bool(better)
            reason = (
                f"{metric} {value:.4f} {'beats' if better else 'does not beat'} "
                f"champion v{champion.version}'s {old_value:.4f}"
            )
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return Registered(name, str(version.version), model_uri, promoted, reason)


def _champion(client: MlflowClient, name: str) -> Any:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _run_id(model_uri: str) -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def metric_name(key: str) -> str:
    """MLflow metric names allow no ``@``: ``recall@10`` -> ``recall_at_10``."""
    return key.replace("@", "_at_")


def log_training_history(history: list[dict[str, Any]]) -> None:
    """Per-epoch metrics of a training run, with ``step`` = epoch."""
    for row in history:
        metrics = {
            metric_name(k): float(v)
            for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "epoch"
        }
        mlflow.log_metrics(metrics, step=int(row["epoch"]))
