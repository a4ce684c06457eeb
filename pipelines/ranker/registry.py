"""MLflow for the reranker: a pyfunc that scores feature rows, registered and gated.

The pyfunc carries the model folder (:func:`models.artifacts.save_reranker`,
calibrator included) and the feature spec it was trained on; ``predict``
encodes a frame of raw feature columns by that spec
(:func:`serving.encoding.encode_examples`), so a caller cannot
encode differently from training. Registration and the challenger/champion
gate are the retrieval registry's (:func:`register_and_gate`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
import polars as pl
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array

from features.feature_spec import FeatureSpec
from models.artifacts import SavedReranker, load_reranker, save_reranker
from models.calibration import click_probabilities
from serving.encoding import encode_examples
from serving.scoring import predict

_TYPES = {"int64": DataType.long, "float64": DataType.double, "string": DataType.string}


class RerankerPyfunc(mlflow.pyfunc.PythonModel):
    """``predict``: a frame of the spec's feature columns -> ``probability`` (calibrated),
    ``logit`` and one column per second task, named after it, holding its head's raw
    score (a predicted rating for a regression task, a logit for a binary one)."""

    def load_context(self, context: Any) -> None:
        self.saved: SavedReranker = load_reranker(Path(context.artifacts["model"]))
        self.spec = FeatureSpec.model_validate_json(
            Path(context.artifacts["feature_spec"]).read_text()
        )

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        frame = pl.from_pandas(model_input)
        part = encode_examples(frame, self.spec, labelled=False)
        model = self.saved.model
        logits = predict(model, part)
        probability = click_probabilities(logits, self.saved.calibrator)
        extra = {task: predict(model, part, task) for task in model.config.tasks[1:]}
        return pd.DataFrame({"probability": probability, "logit": logits, **extra})


def _data_type(dtype: pl.DataType) -> DataType | Array:
    if isinstance(dtype, pl.List):
        return Array(_data_type(dtype.inner))
    if dtype.is_integer():
        return DataType.long
    if dtype.is_float():
        return DataType.double
    if dtype == pl.Boolean:
        return DataType.boolean
    return DataType.string


def signature(
    spec: FeatureSpec,
    schema: Mapping[str, pl.DataType] | None = None,
    extra_tasks: tuple[str, ...] = (),
) -> ModelSignature:
    """Inputs: every spec feature, typed as the example table holds it (``schema``) or by
    the spec's dtype; outputs: probability, logit and each of ``extra_tasks``."""
    columns = []
    for feature in spec.features:
        if schema is not None and feature.name in schema:
            kind = _data_type(schema[feature.name])
        elif feature.dtype.startswith("list["):
            kind = Array(_TYPES[feature.dtype[5:-1]])
        else:
            kind = _TYPES[feature.dtype]
        columns.append(ColSpec(kind, feature.name, required=False))
    return ModelSignature(
        inputs=Schema(columns),
        outputs=Schema(
            [ColSpec(DataType.double, name) for name in ("probability", "logit", *extra_tasks)]
        ),
    )


def log_reranker(
    saved: SavedReranker,
    spec: FeatureSpec,
    schema: Mapping[str, pl.DataType] | None = None,
    name: str = "ranker_model",
) -> str:
    """Log the reranker and its spec as a pyfunc to the active run; its model URI.

    ``schema``: the example table's column types, for the input signature.
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "reranker"
        save_reranker(saved.model, folder, saved.calibrator)
        spec_file = Path(tmp) / "feature_spec.json"
        spec_file.write_text(spec.model_dump_json(indent=2))
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=RerankerPyfunc(),
            artifacts={"model": str(folder), "feature_spec": str(spec_file)},
            signature=signature(spec, schema, saved.model.config.tasks[1:]),
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                "numpy",
                "pandas",
                "polars",
            ],
        )
    return str(info.model_uri)
