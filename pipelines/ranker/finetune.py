"""Fine-tune a trained reranker on a recent window: LoRA adapters (merged back) or all weights.

A deployed reranker goes stale when the world it learnt changes (a concept
drift: the same user and item features now mean other clicks). Retraining on
the whole log is the expensive answer; fine-tuning the champion on the newest
window is the cheap one. Two modes, one loop:

- ``lora``: every existing parameter is frozen, embeddings included; the
  linear layers that ``settings.targets`` names get rank-``r`` adapters
  (:mod:`models.lora`), the only trainable weights. At the end the adapters are
  merged into their base weights, so the returned model has the base
  architecture, loads into a fresh :class:`Reranker` and costs nothing extra
  at inference.
- ``full``: every parameter trains (sparse embedding rows through lazy Adam,
  as in training); the reference LoRA is measured against.

The model passed in is never modified (a deep copy is tuned). Validation AUC
is measured before the first epoch (epoch 0, the model as given) and after
each one; the best epoch is kept, so a fine-tune that does not help on the
validation window returns the model it started from rather than a worse one.

Targets map to module names of :class:`Reranker` (an explicit table, not
string matching on user input)::

    experts  body.experts.<e>.net.<j>    the MoE's expert MLPs
    gates    body.gates.<t>.linear       the MoE's per-task routers
    heads    heads.<task>, interaction_heads.<task>
    dense    body.expert.net.<j>         the dense baseline's shared MLP
"""

from __future__ import annotations

import copy
import datetime as dt
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import polars as pl
import torch
from torch import nn

from infra.config import RankerFinetuneConfig
from models.lora import LoRALinear, Target, apply_lora, merge_lora
from models.moe import Reranker
from models.optimizers import SparseDenseAdam
from pipelines.ranker.loop import EpochState, evaluate, memory_batches, run_epochs
from serving.encoding import RankerPart

Mode = Literal["lora", "full"]
MODES: tuple[Mode, ...] = ("lora", "full")

# Config target name -> predicate on a linear layer's qualified name in a Reranker.
TARGET_PREFIXES: dict[str, tuple[str, ...]] = {
    "experts": ("body.experts.",),
    "gates": ("body.gates.",),
    "heads": ("heads.", "interaction_heads."),
    "dense": ("body.expert.",),
}


@dataclass
class FinetuneResult:
    """The tuned model (merged for LoRA), what trained, and how validation AUC moved.

    ``history`` has one row per epoch, epoch 0 being the model as given
    (``train_loss`` nan): ``epoch, train_loss, valid_auc, valid_gauc, valid_logloss,
    train_s, seconds``.
    """

    model: Reranker
    mode: Mode
    # Parameters the optimiser updated, and all parameters of the returned model.
    trainable_parameters: int
    total_parameters: int
    # Linear layers that carried adapters (0 for full fine-tuning).
    adapted_layers: int
    history: list[dict[str, float]] = field(default_factory=list)
    # 0 when no epoch beat the model as given on validation.
    best_epoch: int = 0
    best_valid_auc: float = float("nan")
    base_valid_auc: float = float("nan")
    # Wall time of the whole call (copy, training, validation, merge).
    seconds: float = 0.0


def lora_target(targets: Sequence[str]) -> Target:
    """The :func:`models.lora.apply_lora` predicate of config target names (see module doc)."""
    unknown = sorted(set(targets) - TARGET_PREFIXES.keys())
    if unknown or not targets:
        raise ValueError(
            f"unknown LoRA targets {unknown or list(targets)}; known: {sorted(TARGET_PREFIXES)}"
        )
    prefixes = tuple(p for name in targets for p in TARGET_PREFIXES[name])
    return lambda name, layer: name.startswith(prefixes)


def add_adapters(model: Reranker, settings: RankerFinetuneConfig) -> int:
    """Freeze ``model`` and wrap its target linear layers in place; returns trainable parameters.

    Raises a ``ValueError`` naming the model's linear layers when the targets
    pick none of them (e.g. ``gates`` on a dense reranker).
    """
    target = lora_target(settings.targets)
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not any(target(name, layer) for name, layer in linear.items()):
        raise ValueError(
            f"LoRA targets {list(settings.targets)} match no linear layer of this "
            f"{model.config.kind!r} reranker; its linear layers: {list(linear)}"
        )
    return apply_lora(
        model,
        settings.lora_rank,
        settings.lora_alpha,
        target=target,
        dropout=settings.lora_dropout,
    )


def window_split(frame: pl.DataFrame, window_days: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Rows before the window and rows in it: the last ``window_days`` UTC days of ``ts``.

    The window starts at midnight UTC of the newest day minus ``window_days -
    1``, so ``window_days=1`` is the newest calendar day of the table (whole
    days: a fine-tune on "today" sees all of today). Row order is kept.
    """
    if window_days < 1:
        raise ValueError(f"window_days must be >= 1, got {window_days}")
    if "ts" not in frame.columns:
        raise ValueError("window_split needs a 'ts' column")
    if frame.height == 0:
        raise ValueError("window_split got an empty table")
    in_window = pl.col("ts") >= window_start(frame.lazy(), window_days)
    return frame.filter(~in_window), frame.filter(in_window)


def window_start(examples: pl.LazyFrame, window_days: int) -> dt.datetime:
    """Where the newest ``window_days`` UTC days of ``examples`` begin (see :func:`window_split`);
    one streaming pass for the newest ``ts``."""
    if window_days < 1:
        raise ValueError(f"window_days must be >= 1, got {window_days}")
    newest = examples.select(pl.col("ts").max()).collect(engine="streaming").item()
    if not isinstance(newest, dt.datetime):
        raise ValueError(f"the window needs a datetime 'ts' column, got {newest!r}")
    start_day = newest.replace(hour=0, minute=0, second=0, microsecond=0)
    return start_day - dt.timedelta(days=window_days - 1)


def _count(parameters: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters)


def finetune(
    model: Reranker,
    train: RankerPart,
    valid: RankerPart,
    settings: RankerFinetuneConfig,
    mode: Mode = "lora",
    batch_size: int = 1024,
    seed: int = 0,
    learning_rate: float | None = None,
    merge: bool = True,
) -> FinetuneResult:
    """Fine-tune a deep copy of ``model`` on ``train`` for ``settings.epochs``; keep the best epoch.

    ``learning_rate`` overrides ``settings.learning_rate`` (which is sized for
    zero-initialised adapters; full fine-tuning usually wants the training
    rate). ``merge=False`` returns a LoRA model with its adapters still apart
    (``LoRALinear`` layers, base weights untouched): for inspection and tests.
    Only the model's first task is trained (binary, the label), as in
    :func:`pipelines.ranker.loop.train_epochs`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(train) == 0 or len(valid) == 0:
        raise ValueError(f"fine-tuning needs rows: train {len(train)}, valid {len(valid)}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    tuned = copy.deepcopy(model)
    if mode == "lora":
        trainable = add_adapters(tuned, settings)
    else:
        for p in tuned.parameters():
            p.requires_grad_(True)
        trainable = _count(tuned.parameters())
    # Only parameters that require gradients reach an optimiser (frozen ones get no state).
    lr = settings.learning_rate if learning_rate is None else learning_rate
    optimizer = SparseDenseAdam(tuned, lr=lr)
    generator = torch.Generator().manual_seed(seed)

    base = evaluate(tuned, valid, tuned.config.tasks[0])
    given = {
        "epoch": 0,
        "train_loss": float("nan"),
        "valid_auc": base["auc"],
        "valid_gauc": base["gauc"],
        "valid_logloss": base["logloss"],
        "train_s": 0.0,
        "seconds": 0.0,
    }
    # Epoch 0 is the model as given: a trained epoch must beat it to be kept.
    # No patience: all settings.epochs run.
    state = run_epochs(
        tuned,
        optimizer,
        memory_batches(train, batch_size, generator),
        lambda: [valid],
        EpochState(
            best_epoch=0,
            best_valid_auc=base["auc"],
            best_weights={k: v.clone() for k, v in tuned.state_dict().items()},
            history=[given],
        ),
        epochs=settings.epochs,
    )

    adapted = sum(isinstance(m, LoRALinear) for m in tuned.modules())
    if mode == "lora" and merge:
        merge_lora(tuned)
        # A merged model is an ordinary reranker again: trainable by whoever loads it next.
        for p in tuned.parameters():
            p.requires_grad_(True)
    tuned.eval()
    return FinetuneResult(
        model=tuned,
        mode=mode,
        trainable_parameters=trainable,
        total_parameters=_count(tuned.parameters()),
        adapted_layers=adapted,
        history=state.history,
        best_epoch=state.best_epoch or 0,
        best_valid_auc=state.best_valid_auc,
        base_valid_auc=base["auc"],
        seconds=time.perf_counter() - start,
    )
