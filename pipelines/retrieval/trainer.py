"""The retrieval training driver: Ray Train's ``TorchTrainer`` over the per-worker loop.

Workers, GPUs and retries come from ``models.retrieval``; each epoch leaves a
checkpoint, the best one by validation recall is kept, and a crashed worker
makes Ray restart the group from the latest checkpoint (``FailureConfig``).

The data reach the workers from storage, never in their arguments: the
training pairs as a Ray Dataset of the split's Parquet files (each worker
iterates its ``get_dataset_shard("train")`` in batches), everything else
through the split folder's path (:func:`loop_config`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from infra.config import RetrievalConfig
from infra.ray_runtime import cpus_per_worker
from models.two_tower import TwoTowerModel
from pipelines.retrieval.data import RetrievalData
from pipelines.retrieval.loop import build_model, load_state, train_loop_per_worker

# CPUs kept free of training workers for Ray Data's read tasks (see reserved_cpus).
READ_CPUS = 1.0
# The least a worker reserves on a cluster with no CPU to spare (one CPU in all).
MIN_RESERVED_CPUS = 0.1


@dataclass(frozen=True)
class TrainedRetrieval:
    """The best model of a training run and what happened on the way."""

    model: TwoTowerModel
    # One dict per reported epoch (loss, samples_per_s, valid_* metrics), in order.
    history: list[dict[str, Any]]
    best_epoch: int
    best_valid: dict[str, float]
    wall_s: float
    run_name: str


def run_name(config: RetrievalConfig, data: RetrievalData) -> str:
    """Deterministic: the same config and data shape give the same Ray Train run folder."""
    digest = hashlib.sha256(
        json.dumps(
            [config.model_dump(mode="json"), data.n_users, data.n_items, data.n_train],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:12]
    return f"retrieval-{config.kind}-{digest}"


def train_dataset(data: RetrievalData) -> ray.data.Dataset:
    """The training pairs (columns ``user``, ``item``) streamed from ``data``'s Parquet files.

    The files already hold the pairs in a seeded random order
    (:func:`pipelines.retrieval.data.write_retrieval_data`); read with the
    order preserved (:func:`train_retrieval`), a CPU run is deterministic for
    a seed. Nothing is read here: Ray Data reads the files block by block as
    the workers iterate their shards.
    """
    files = data.pair_files
    if not files:
        raise ValueError(f"no training pairs under {data.folder}")
    return ray.data.read_parquet(files, columns=["user", "item"])


def reserved_cpus(config: RetrievalConfig) -> float:
    """CPUs each worker reserves: its share (``cpus_per_worker``), less what Ray Data needs.

    Ray Data lists and reads the Parquet files in tasks of one CPU each; workers
    holding every CPU of the cluster (one local worker takes all cores by
    default) would leave them unscheduled and training waiting forever. So the
    workers together leave at least one CPU free. Their torch threads stay
    ``cpus_per_worker`` (:func:`loop_config`): the reads are brief next to the
    training, and a thread fewer ran the loop ~0.6x as fast.
    """
    share = cpus_per_worker(config.cpus_per_worker, config.workers)
    total = ray.cluster_resources().get("CPU", 1.0)
    room = (total - READ_CPUS) / config.workers
    return share if room >= share else max(room, MIN_RESERVED_CPUS)


def loop_config(
    data: RetrievalData, config: RetrievalConfig, fault: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What every Ray Train worker receives (pickled into the controller and each worker).

    Only the config and the path of ``data``'s folder: its size does not grow
    with the events, users or items; each worker opens the folder itself
    (:func:`pipelines.retrieval.data.open_retrieval_data`).
    """
    return {
        "config": config,
        "data_folder": str(data.folder),
        "threads": max(1, int(cpus_per_worker(config.cpus_per_worker, config.workers))),
        **(fault or {}),
    }


def train_retrieval(
    data: RetrievalData,
    config: RetrievalConfig,
    storage: Path,
    fault: dict[str, Any] | None = None,
) -> TrainedRetrieval:
    """Train on ``data`` with Ray Train; checkpoints under ``storage``/<run name>.

    ``data.folder`` must be readable by every worker at the same path (this
    machine's disk on one machine, shared storage on a multi-machine cluster).

    ``fault`` (tests): ``{"crash_marker": path, "crash_after_epoch": n}`` makes a
    worker crash once, to prove the resume.
    """
    if not ray.is_initialized():
        raise RuntimeError("train_retrieval needs Ray started (infra.ray_runtime.ensure_ray)")
    name = run_name(config, data)
    metric = f"valid_recall@{config.eval_k}"
    # Keeping the data order fixed keeps a CPU run deterministic for a seed.
    options = ray.data.ExecutionOptions(preserve_order=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(data, config, fault),
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.use_gpu,
            resources_per_worker={
                "CPU": reserved_cpus(config),
                **({"GPU": 1} if config.use_gpu else {}),
            },
        ),
        datasets={"train": train_dataset(data)},
        dataset_config=DataConfig(execution_options=options),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage.resolve()),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=metric, checkpoint_score_order="max"
            ),
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
    if result.error is not None:
        raise RuntimeError(f"retrieval training failed: {result.error}") from result.error
    best = result.get_best_checkpoint(metric, "max")
    if best is None:
        raise RuntimeError("retrieval training reported no checkpoint")
    with best.as_directory() as folder:
        state = load_state(Path(folder))
    model = build_model(config, data)
    model.load_state_dict(state["model"])
    model.eval()
    if result.checkpoint is None:
        raise RuntimeError("retrieval training reported no checkpoint")
    # The latest checkpoint carries every epoch's report, across restarts.
    with result.checkpoint.as_directory() as folder:
        history = load_state(Path(folder))["history"]
    best_row = history[int(state["epoch"])]
    return TrainedRetrieval(
        model=model,
        history=history,
        best_epoch=int(state["epoch"]),
        best_valid={k: float(v) for k, v in best_row.items() if k.startswith("valid_")},
        wall_s=wall,
        run_name=name,
    )
