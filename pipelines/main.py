"""The main job's DAG; later issues add their steps here."""

from __future__ import annotations

from pipelines.dag import Pipeline
from pipelines.steps.features import FEATURES
from pipelines.steps.ingest import INGEST
from pipelines.steps.materialize import MATERIALIZE
from pipelines.steps.monitoring import MONITOR_STEP, REFERENCE_PROFILE
from pipelines.steps.ranker import FINETUNE_RANKER, REGISTER_RANKER, TRAIN_RANKER, TUNE_RANKER
from pipelines.steps.retrieval import INDEX, REGISTER_RETRIEVAL, TRAIN_RETRIEVAL
from pipelines.steps.summarize import SUMMARIZE
from pipelines.steps.two_stage import EVALUATE_TWO_STAGE
from pipelines.steps.validate import VALIDATE

MAIN = Pipeline(
    "main",
    (
        INGEST,
        VALIDATE,
        SUMMARIZE,
        FEATURES,
        MATERIALIZE,
        TRAIN_RETRIEVAL,
        INDEX,
        REGISTER_RETRIEVAL,
        TUNE_RANKER,
        TRAIN_RANKER,
        REGISTER_RANKER,
        FINETUNE_RANKER,
        EVALUATE_TWO_STAGE,
        REFERENCE_PROFILE,
        MONITOR_STEP,
    ),
)

PIPELINES = {MAIN.name: MAIN}
