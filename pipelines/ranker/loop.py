"""The reranker training loop as plain functions.

:func:`train_step` is one optimiser step, :func:`score_parts` scores rows
read batch by batch (keeping a few numbers per row, not the rows) and
:func:`click_report` / :func:`scored_task_report` turn the scores into
metrics; :func:`run_epochs` is the one epoch loop (the mini-batches the
caller yields, validation AUC after every epoch, early stopping, the best
epoch kept) over a resumable :class:`EpochState`. Its callers differ only in
where rows come from and how they start and checkpoint:
:func:`train_loop_per_worker` (each Ray Train worker: its shard of the
encoded examples streamed by Ray Data, checkpoints, resume, DDP;
:mod:`pipelines.ranker.trainer` is its driver and the pipeline's one way to
train), :func:`train_epochs` (one process over in-memory data: benchmarks),
``tuning._trial`` (a Ray Tune trial) and ``finetune.finetune`` (epoch 0 = the
model as given).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from infra.config import RankerConfig
from models.calibration import Calibrator, click_probabilities
from models.ctr_metrics import ctr_report
from models.moe import Reranker, RerankerConfig
from models.optimizers import SparseDenseAdam
from models.ranking_task import RankingLoss, RankingTask, TaskSpec
from pipelines.ranker.data import RankerData
from pipelines.ranker.encoded import (
    EncodedSplits,
    TargetStats,
    concat_parts,
    iter_file_parts,
    part_from_table,
    target_stats,
)
from serving.encoding import RankerPart
from serving.scoring import to_device


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyper-parameters of :func:`train_epochs` (defaults chosen on ML-100K valid)."""

    # Upper bound; early stopping usually ends sooner.
    epochs: int = 20
    # Epochs without a better validation AUC before stopping.
    patience: int = 2
    batch_size: int = 1024
    lr: float = 1e-3
    # AdamW decay of the dense parameters (sparse embedding rows get none).
    weight_decay: float = 0.0
    seed: int = 0
    # Rows per forward pass when scoring (no gradients, so larger is fine).
    eval_batch_size: int = 8192
    # What the loss trains: the click (binary, the label) first, then any second
    # task, whose target is ``RankerPart.targets[name]`` (see :func:`task_specs`).
    tasks: tuple[TaskSpec, ...] = (TaskSpec("click"),)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1:
            raise ValueError(
                f"epochs and patience must be >= 1, got {self.epochs}, {self.patience}"
            )
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}"
            )


def second_task(
    settings: RankerConfig, targets: Mapping[str, TargetStats] | None
) -> tuple[TaskSpec | None, str]:
    """The second task's spec when the training rows (``targets``: their target statistics)
    have enough of its target; else None and why."""
    config = settings.second_task
    if config is None:
        return None, "second_task is off"
    if targets is None or config.target not in targets:
        return None, f"the examples have no {config.target!r} column"
    rows = targets[config.target].rows
    if rows < config.min_rows:
        return None, (
            f"{rows} training rows have a {config.target!r}, fewer than min_rows={config.min_rows}"
        )
    spec = TaskSpec(config.target, config.kind, config.weight, threshold=config.threshold)
    return spec, f"{rows} training rows have a {config.target!r}"


def configs_from(
    settings: RankerConfig, targets: Mapping[str, TargetStats] | None = None
) -> tuple[RerankerConfig, TrainConfig]:
    """The model and loop hyper-parameters of a ``models.ranker`` config section.

    The model gets a second gate and head when the training rows (``targets``:
    their target statistics, :func:`pipelines.ranker.encoded.target_stats`)
    hold enough of the second task's target (:func:`second_task`); without
    ``targets`` it is the click model alone.
    """
    extra, _ = second_task(settings, targets)
    tasks = (TaskSpec("click"),) + ((extra,) if extra is not None else ())
    model = RerankerConfig(
        kind=settings.kind,
        tasks=tuple(task.name for task in tasks),
        embedding_dim=settings.embedding_dim,
        n_experts=settings.n_experts,
        top_k=settings.top_k,
        expert_hidden=settings.expert_hidden,
        expert_dim=settings.expert_dim,
        gate_noise=settings.gate_noise,
        capacity_factor=settings.capacity_factor,
        aux_loss_weight=settings.aux_loss_weight,
        dropout=settings.dropout,
        field_interactions=settings.field_interactions and settings.kind != "logistic",
    )
    loop = TrainConfig(
        epochs=settings.epochs,
        patience=settings.patience,
        batch_size=settings.batch_size,
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
        seed=settings.seed,
        tasks=tasks,
    )
    return model, loop


def new_reranker(
    layout: Any,
    model_config: RerankerConfig,
    loop: TrainConfig,
    targets: Mapping[str, TargetStats] | None = None,
) -> Reranker:
    """A fresh :class:`Reranker` whose regression heads start at the training mean.

    A rating head that starts at 0 spends its first thousand steps climbing to
    ~3.5, pushing large gradients into the experts the click shares.
    """
    model = Reranker(layout, model_config)
    with torch.no_grad():
        for task in loop.tasks[1:]:
            if task.kind == "regression" and targets and task.name in targets:
                model.heads[task.name].bias.fill_(targets[task.name].mean)
    return model


def task_targets(
    part: RankerPart, tasks: tuple[TaskSpec, ...], device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Targets and masks of the rows of ``part`` for each task: the click label, then
    ``part.targets``."""
    targets = {tasks[0].name: part.labels.to(device)}
    masks: dict[str, torch.Tensor] = {}
    for task in tasks[1:]:
        values = part.targets[task.name].to(device)
        masks[task.name] = ~torch.isnan(values)
        targets[task.name] = values
    return targets, masks


@dataclass(frozen=True)
class Scored:
    """Scores of rows read batch by batch: what metrics need, a few numbers per row.

    ``logits`` (N,) float64 per task of the model; ``labels`` (N,) float32;
    ``users`` (N,) int64 or None; ``targets`` (N,) float32 per second-task
    target (NaN where none). Holding these instead of the rows keeps a
    validation or test pass at ~30 bytes a row, whatever the features.
    """

    logits: dict[str, np.ndarray]
    labels: np.ndarray
    users: np.ndarray | None
    targets: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@torch.no_grad()
def score_parts(model: Reranker, parts: Iterable[RankerPart], batch_size: int = 8192) -> Scored:
    """Every task's logits for the rows of ``parts`` (eval mode), in order, a batch at a time."""
    model.eval()
    device = next(model.parameters()).device
    logits: dict[str, list[np.ndarray]] = {task: [] for task in model.config.tasks}
    labels, users, targets = [], [], {}
    for part in parts:
        for start in range(0, len(part), batch_size):
            rows = part.rows(slice(start, start + batch_size))
            outputs = model(to_device(rows.batch(slice(None)), device)).outputs
            for task in logits:
                logits[task].append(outputs[task].double().cpu().numpy())
            labels.append(rows.labels.numpy())
            if rows.users is not None:
                users.append(rows.users.numpy())
            for name, values in rows.targets.items():
                targets.setdefault(name, []).append(values.numpy())
    join = lambda chunks, dtype: np.concatenate(chunks) if chunks else np.zeros(0, dtype)  # noqa: E731
    return Scored(
        logits={task: join(chunks, np.float64) for task, chunks in logits.items()},
        labels=join(labels, np.float32),
        users=join(users, np.int64) if users else None,
        targets={name: join(chunks, np.float32) for name, chunks in targets.items()},
    )


def click_report(
    scored: Scored, task: str = "click", calibrator: Calibrator | None = None
) -> dict[str, float]:
    """``auc, gauc, logloss, ece, n, positive_rate`` of scored rows (optionally calibrated)."""
    probabilities = click_probabilities(scored.logits[task], calibrator)
    return ctr_report(scored.labels, probabilities, users=scored.users)


def scored_task_report(scored: Scored, task: TaskSpec) -> dict[str, float]:
    """Metrics of a second task on the scored rows that have its target.

    Regression: ``rmse``, ``mae`` and ``baseline_rmse`` (always predicting the
    rows' own mean: the bar a head must clear); binary: ``auc`` and
    ``logloss``. ``n`` rows with a target (``{"n": 0}`` when none).
    """
    values = scored.targets[task.name].astype(np.float64)
    present = ~np.isnan(values)
    n = int(present.sum())
    if n == 0:
        return {"n": 0.0}
    scores = scored.logits[task.name][present]
    target = values[present]
    if task.kind == "regression":
        return {
            "n": float(n),
            "rmse": float(np.sqrt(np.mean((scores - target) ** 2))),
            "mae": float(np.mean(np.abs(scores - target))),
            "baseline_rmse": float(np.std(target)),
        }
    if task.threshold is not None:
        target = (target >= task.threshold).astype(np.float64)
    report = ctr_report(target, click_probabilities(scores, None))
    return {"n": float(n), "auc": report["auc"], "logloss": report["logloss"]}


def task_report(model: Reranker, part: RankerPart, task: TaskSpec) -> dict[str, float]:
    """:func:`scored_task_report` of the rows of an in-memory ``part``."""
    return scored_task_report(score_parts(model, [part]), task)


@dataclass
class TrainResult:
    """The model at its best validation epoch, per-epoch history, wall time."""

    model: Reranker
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_valid_auc: float = float("nan")
    seconds: float = 0.0


def train_step(
    model: nn.Module,
    task: RankingTask,
    optimizer: Any,
    batch: Any,
    targets: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
) -> RankingLoss:
    """One optimiser step on ``batch`` (a FeatureBatch) against ``targets[task]`` (B,)."""
    model.train()
    optimizer.zero_grad()
    loss = task(model(batch), targets, masks)
    loss.total.backward()
    optimizer.step()
    return loss


def evaluate(
    model: Reranker,
    part: RankerPart,
    task: str = "click",
    calibrator: Calibrator | None = None,
    batch_size: int = 8192,
) -> dict[str, float]:
    """``auc, gauc, logloss, ece, n, positive_rate`` of an in-memory ``part``
    (optionally calibrated)."""
    return click_report(score_parts(model, [part], batch_size), task, calibrator)


@dataclass
class EpochState:
    """Where an epoch loop stands; everything a checkpoint needs besides model and optimiser.

    ``best_epoch`` is None until an epoch has been scored (the first scored
    epoch is then the best even with a NaN AUC); a fine-tune starts at 0, the
    model as given. ``seconds`` sums the epochs' training + validation time.
    """

    epoch: int = 0
    best_epoch: int | None = None
    best_valid_auc: float = float("nan")
    # The best epoch's weights (only when run_epochs is asked to keep them).
    best_weights: dict[str, torch.Tensor] | None = None
    # Epochs since the best one.
    stale: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def done(self, epochs: int, patience: int | None) -> bool:
        """All ``epochs`` run, or ``patience`` epochs without a better validation AUC."""
        return self.epoch >= epochs or (patience is not None and self.stale >= patience)

    def to_dict(self) -> dict[str, Any]:
        """Plain values and tensors (loads with ``torch.load(weights_only=True)``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> EpochState:
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls)})


# Called by run_epochs after each epoch, once the state is updated, with that
# epoch's history row, the model and the state: checkpoints and reports go
# here (Ray Tune's ASHA may stop the trial from it). It may add keys to the row.
StateCallback = Callable[[dict[str, Any], Reranker, EpochState], None]


# An epoch's training batches (each a RankerPart of at most a batch of rows), by
# epoch number: a shuffled part in memory, or a Ray Data shard read anew.
BatchSource = Callable[[int], Iterable[RankerPart]]
# The validation rows, read anew at each call, in parts of any size.
PartSource = Callable[[], Iterable[RankerPart]]


def memory_batches(part: RankerPart, batch_size: int, generator: torch.Generator) -> BatchSource:
    """Mini-batches of an in-memory ``part``: a fresh seeded permutation per epoch."""
    return lambda epoch: (
        part.rows(index)
        for index in torch.randperm(len(part), generator=generator).split(batch_size)
    )


def run_epochs(
    model: Reranker,
    optimizer: Any,
    train_batches: BatchSource,
    valid: PartSource,
    state: EpochState,
    *,
    epochs: int,
    patience: int | None = None,
    keep_best: bool = True,
    on_epoch: StateCallback | None = None,
    forward: nn.Module | None = None,
    eval_batch_size: int = 8192,
    tasks: tuple[TaskSpec, ...] | None = None,
) -> EpochState:
    """The reranker's one epoch loop: epochs ``state.epoch + 1 ..`` until ``state.done``.

    Each epoch trains on the mini-batches ``train_batches(epoch)`` yields (the
    caller owns reading and shuffling: :func:`memory_batches`, or a Ray Data
    shard), scores the rows ``valid()`` yields and updates ``state``
    (returned, also changed in place). ``patience`` None never stops early.
    With ``keep_best`` the best epoch's weights are kept in the state and
    loaded back at the end. ``forward`` is what trains (a DDP wrapper of
    ``model``); ``model`` itself is scored. ``tasks`` (the loop config's) are
    trained, the click first; None trains the model's first task alone
    (binary, the label). Early stopping and the best epoch follow the click's
    validation AUC; a second task's validation metrics join the history as
    ``valid_<task>_<metric>``. Batches go to the model's device. The row
    counts ``train_rows``, the rows this process trained on in the epoch.
    """
    tasks = tasks or (TaskSpec(model.config.tasks[0]),)
    unknown = [t.name for t in tasks if t.name not in model.config.tasks]
    if unknown:
        raise ValueError(f"tasks {unknown} have no head in the model ({model.config.tasks})")
    main_task = tasks[0].name
    task = RankingTask(tasks)
    device = next(model.parameters()).device
    trained = model if forward is None else forward
    while not state.done(epochs, patience):
        epoch = state.epoch + 1
        started = time.perf_counter()
        total, batches, rows = 0.0, 0, 0
        for part in train_batches(epoch):
            batch = to_device(part.batch(slice(None)), device)
            targets, masks = task_targets(part, tasks, device)
            total += train_step(trained, task, optimizer, batch, targets, masks).per_task[main_task]
            batches += 1
            rows += len(part)
        train_s = time.perf_counter() - started
        scored = score_parts(model, valid(), eval_batch_size)
        report = click_report(scored, main_task)
        seconds = time.perf_counter() - started
        if state.best_epoch is None or report["auc"] > state.best_valid_auc:
            state.best_epoch, state.best_valid_auc, state.stale = epoch, report["auc"], 0
            if keep_best:
                state.best_weights = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            state.stale += 1
        state.epoch = epoch
        state.seconds += seconds
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": total / max(1, batches),
            "valid_auc": report["auc"],
            "valid_gauc": report["gauc"],
            "valid_logloss": report["logloss"],
            "train_rows": rows,
            "train_s": train_s,
            "seconds": seconds,
        }
        for extra in tasks[1:]:
            for key, value in scored_task_report(scored, extra).items():
                if key != "n":
                    row[f"valid_{extra.name}_{key}"] = value
        state.history.append(row)
        if on_epoch is not None:
            on_epoch(row, model, state)
    if keep_best and state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    return state


# Called after each epoch of train_epochs with that epoch's history row and the
# model as it is (benchmarks watch the run from it).
EpochCallback = Callable[[dict[str, float], Reranker], None]


def train_epochs(
    model_config: RerankerConfig,
    train_config: TrainConfig,
    data: RankerData,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train a fresh :class:`Reranker` on in-memory ``data.train`` (benchmarks on
    MovieLens-100K, tests); keep the best epoch by validation AUC.

    Trains ``train_config.tasks`` (the click alone by default).
    """
    generator = torch.Generator().manual_seed(train_config.seed)
    return _train_fresh(
        model_config,
        train_config,
        data.layout,
        target_stats(data.train),
        memory_batches(data.train, train_config.batch_size, generator),
        lambda: [data.valid],
        on_epoch,
    )


def train_streamed(
    model_config: RerankerConfig,
    train_config: TrainConfig,
    splits: EncodedSplits,
    shuffle_rows: int,
) -> TrainResult:
    """:func:`train_epochs` in this process, reading encoded examples from storage.

    For a small model beside the main one (the logistic baseline): no Ray
    Train start-up, and memory holds a shuffle buffer of ``shuffle_rows`` rows
    (files in a seeded random order per epoch, rows mixed within the buffer)
    and a validation batch, never a part.
    """
    generator = torch.Generator().manual_seed(train_config.seed)
    files = splits.files("train")

    def batches(epoch: int) -> Iterator[RankerPart]:
        order = torch.randperm(len(files), generator=generator).tolist()
        parts = iter_file_parts(
            [files[i] for i in order], max(shuffle_rows, train_config.batch_size)
        )
        return shuffled_batches(parts, train_config.batch_size, shuffle_rows, generator)

    return _train_fresh(
        model_config,
        train_config,
        splits.layout,
        splits.targets,
        batches,
        lambda: iter_file_parts(splits.files("valid"), train_config.eval_batch_size),
    )


def shuffled_batches(
    parts: Iterable[RankerPart], batch_size: int, buffer_rows: int, generator: torch.Generator
) -> Iterator[RankerPart]:
    """Batches of ``batch_size`` rows from ``parts``, mixed within buffers of at least
    ``buffer_rows`` rows (0: in the order read); the last batch may be short."""
    pending: list[RankerPart] = []
    held = 0

    def drain(final: bool) -> Iterator[RankerPart]:
        nonlocal pending, held
        buffer = concat_parts(pending)
        buffer = buffer.rows(torch.randperm(len(buffer), generator=generator))
        whole = len(buffer) if final else len(buffer) - len(buffer) % batch_size
        for start in range(0, whole, batch_size):
            yield buffer.rows(slice(start, min(start + batch_size, whole)))
        rest = buffer.rows(slice(whole, len(buffer)))
        pending, held = ([rest] if len(rest) else []), len(rest)

    for part in parts:
        pending.append(part)
        held += len(part)
        if held >= max(buffer_rows, batch_size):
            yield from drain(final=False)
    if held:
        yield from drain(final=True)


def _train_fresh(
    model_config: RerankerConfig,
    train_config: TrainConfig,
    layout: Any,
    targets: Mapping[str, TargetStats],
    train_batches: BatchSource,
    valid: PartSource,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    torch.manual_seed(train_config.seed)
    model = new_reranker(layout, model_config, train_config, targets)
    optimizer = SparseDenseAdam(model, lr=train_config.lr, weight_decay=train_config.weight_decay)
    start = time.perf_counter()
    state = run_epochs(
        model,
        optimizer,
        train_batches,
        valid,
        EpochState(),
        epochs=train_config.epochs,
        patience=train_config.patience,
        on_epoch=None if on_epoch is None else lambda row, m, _: on_epoch(row, m),
        eval_batch_size=train_config.eval_batch_size,
        tasks=train_config.tasks,
    )
    return TrainResult(
        model=model,
        history=state.history,
        best_epoch=state.best_epoch or 0,
        best_valid_auc=state.best_valid_auc,
        seconds=time.perf_counter() - start,
    )


CHECKPOINT_FILE = "state.pt"


def shard_batches(
    shard: Any, batch_size: int, shuffle_rows: int = 0, seed: int = 0
) -> Iterator[RankerPart]:
    """A Ray Data shard's encoded rows as :class:`RankerPart` batches of ``batch_size``.

    ``shuffle_rows`` > 0 mixes rows through a local buffer of that many rows
    (seeded by ``seed``); memory holds the buffer plus a batch or two in flight.
    """
    for table in shard.iter_batches(
        batch_size=batch_size,
        batch_format="pyarrow",
        local_shuffle_buffer_size=shuffle_rows or None,
        local_shuffle_seed=seed if shuffle_rows else None,
        prefetch_batches=1,
    ):
        yield part_from_table(table)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: epochs over its shard, a checkpoint and a report per epoch.

    ``loop_config``: ``settings`` (infra RankerConfig), ``splits``
    (:class:`EncodedSplits`: folder names, layout and statistics, no rows),
    ``threads``, and for fault tests ``crash_marker`` / ``crash_after_epoch``
    (rank 0 creates the marker after that epoch's checkpoint and exits, once).
    The training rows come from Ray Data: the ``train`` dataset split between
    the workers, shuffled per epoch through a local buffer of
    ``settings.shuffle_buffer_rows`` rows (a seed per epoch and rank). Every
    worker reads the whole validation part, so that all score the same rows
    with the same synchronised weights and stop alike on ``patience``: it
    reads the encoded files itself, a batch at a time, since a Ray Data pass
    adds a dataset execution per epoch (~20 s each on a loaded 2-core
    machine) for a part that is not split. Resumes from ``ray.train.get_checkpoint()``. The checkpoint
    holds the :class:`EpochState` fields plus ``model``, ``optimizer`` and
    ``rng``; Ray keeps the best epoch's checkpoint, so the loop keeps no best
    weights of its own.
    """
    import os
    import tempfile
    from pathlib import Path

    import ray.train
    import ray.train.torch

    settings: RankerConfig = loop_config["settings"]
    splits: EncodedSplits = loop_config["splits"]
    torch.set_num_threads(loop_config.get("threads", 1))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(settings.seed)
    model_config, train_config = configs_from(settings, splits.targets)
    model_config = dataclasses.replace(model_config, sparse_embeddings=not settings.use_gpu)
    device = ray.train.torch.get_device() if settings.use_gpu else torch.device("cpu")
    model = new_reranker(splits.layout, model_config, train_config, splits.targets).to(device)
    optimizer = SparseDenseAdam(model, lr=train_config.lr, weight_decay=train_config.weight_decay)
    state = EpochState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        state = EpochState.from_dict(saved)
    trained: nn.Module = model
    if world > 1:
        # Sparse embedding gradients all-reduce over gloo on CPU; GPUs use dense ones.
        # A MoE's top-k routing can leave an expert without tokens on one rank for a
        # batch: DDP must then look for parameters without gradients (it fails
        # otherwise, "did not receive grad for rank 1", found by the two-node test).
        trained = ray.train.torch.prepare_model(
            model,
            move_to_device=False,
            parallel_strategy_kwargs={"find_unused_parameters": settings.kind == "moe"},
        )
    train_shard = ray.train.get_dataset_shard("train")
    marker = loop_config.get("crash_marker")

    def checkpoint_and_report(row: dict[str, Any], _: Reranker, state: EpochState) -> None:
        # Every worker read an equal share (Ray Train splits with equal=True).
        row["samples_per_s"] = row["train_rows"] * world / max(row["train_s"], 1e-9)
        row["epoch_s"] = row["train_s"]
        row["best_valid_auc"] = state.best_valid_auc
        row["stopped"] = state.done(train_config.epochs, train_config.patience)
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                saved = {
                    **state.to_dict(),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(),
                }
                torch.save(saved, Path(folder) / CHECKPOINT_FILE)
            ray.train.report(
                row,
                checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
            )
        crash = marker and state.epoch == loop_config.get("crash_after_epoch", 1) and rank == 0
        if crash and not Path(marker).exists():
            Path(marker).write_text(f"crashed after epoch {state.epoch}\n")
            os._exit(1)

    run_epochs(
        model,
        optimizer,
        lambda epoch: shard_batches(
            train_shard,
            train_config.batch_size,
            settings.shuffle_buffer_rows,
            seed=(settings.seed * 100_003 + epoch) * 1_009 + rank,
        ),
        lambda: iter_file_parts(splits.files("valid"), train_config.eval_batch_size),
        state,
        epochs=train_config.epochs,
        patience=train_config.patience,
        keep_best=False,
        on_epoch=checkpoint_and_report,
        forward=trained,
        eval_batch_size=train_config.eval_batch_size,
        tasks=train_config.tasks,
    )
