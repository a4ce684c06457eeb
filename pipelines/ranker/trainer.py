"""The reranker training driver: Ray Train's ``TorchTrainer`` over the per-worker loop.

The same path as retrieval (:mod:`pipelines.retrieval.trainer`): workers,
GPUs and retries from ``models.ranker``; a checkpoint per epoch, the best
by validation AUC kept; a crashed worker makes Ray restart the group from
the latest checkpoint (``FailureConfig``). The rows reach the workers as
a Ray Data dataset of the encoded examples (:mod:`pipelines.ranker.encoded`),
split between them; each reads the validation files whole; the loop config
carries the small :class:`EncodedSplits` description, never rows. After
training the driver fits the configured calibration on validation logits,
scored a batch at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.data
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from infra.config import RankerConfig
from infra.ray_runtime import cpus_per_worker
from models.calibration import IsotonicCalibration, TemperatureScaling, fit_calibration
from models.moe import Reranker
from pipelines.ranker.encoded import EncodedSplits, iter_file_parts
from pipelines.ranker.loop import (
    CHECKPOINT_FILE,
    configs_from,
    score_parts,
    train_loop_per_worker,
)

VALID_METRIC = "valid_auc"


@dataclass(frozen=True)
class TrainedRanker:
    """The best model of a training run, its calibrator and what happened on the way."""

    model: Reranker
    calibrator: TemperatureScaling | IsotonicCalibration | None
    # One dict per reported epoch (train_loss, samples_per_s, valid_*), in order.
    history: list[dict[str, Any]]
    best_epoch: int
    best_valid_auc: float
    wall_s: float
    run_name: str


def run_name(settings: RankerConfig, data: EncodedSplits) -> str:
    """Deterministic: the same config and data shape give the same Ray Train run folder."""
    digest = hashlib.sha256(
        json.dumps(
            [
                settings.model_dump(mode="json", exclude={"tuning", "finetune"}),
                dataclasses.asdict(data.layout),
                data.rows["train"],
                data.rows["valid"],
                data.positives["train"],
            ],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:12]
    return f"ranker-{settings.kind}-{digest}"


def train_ranker(
    data: EncodedSplits,
    settings: RankerConfig,
    storage: Path,
    fault: dict[str, Any] | None = None,
) -> TrainedRanker:
    """Train on ``data`` with Ray Train; checkpoints under ``storage``/<run name>.

    ``fault`` (tests): ``{"crash_marker": path, "crash_after_epoch": n}`` makes
    rank 0 crash once after epoch n, to prove the resume.
    """
    if not ray.is_initialized():
        raise RuntimeError("train_ranker needs Ray started (infra.ray_runtime.ensure_ray)")
    name = run_name(settings, data)
    cpus = cpus_per_worker(settings.cpus_per_worker, settings.workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "settings": settings,
            "splits": data,
            "threads": max(1, int(cpus)),
            **(fault or {}),
        },
        scaling_config=ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if settings.use_gpu else {})},
        ),
        # The files in a seeded random order (each holds a stretch of time); rows
        # are mixed further by each worker's shuffle buffer. Order is preserved
        # so that a seed gives the same batches on one worker.
        datasets={
            "train": data.dataset("train", settings.read_tasks).randomize_block_order(
                seed=settings.seed
            )
        },
        dataset_config=DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage.resolve()),
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=VALID_METRIC,
                checkpoint_score_order="max",
            ),
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
    if result.error is not None:
        raise RuntimeError(f"ranker training failed: {result.error}") from result.error
    best = result.get_best_checkpoint(VALID_METRIC, "max")
    if best is None or result.checkpoint is None:
        raise RuntimeError("ranker training reported no checkpoint")
    with best.as_directory() as folder:
        state = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)
    model_config, loop = configs_from(settings, data.targets)
    model = Reranker(data.layout, model_config)
    model.load_state_dict(state["model"])
    model.eval()
    # The latest checkpoint carries every epoch's report, across restarts
    # (Ray's metrics frame keeps only the kept checkpoints' rows).
    with result.checkpoint.as_directory() as folder:
        history = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)["history"]
    calibrator = None
    if settings.calibration != "none":
        valid = score_parts(model, iter_file_parts(data.files("valid"), loop.eval_batch_size))
        calibrator = fit_calibration(settings.calibration, valid.logits["click"], valid.labels)
    return TrainedRanker(
        model=model,
        calibrator=calibrator,
        history=history,
        best_epoch=int(state["epoch"]),
        best_valid_auc=float(state["best_valid_auc"]),
        wall_s=wall,
        run_name=name,
    )
