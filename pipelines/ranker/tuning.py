"""Hyper-parameter search of the reranker: Ray Tune with ASHA early stopping and Optuna's TPE.

Layered as in Ray's train/tune interop example: a per-trial function
(:func:`_trial`) that trains one sampled config epoch by epoch and reports
to Tune, the driver :func:`tune_ranker` that builds the ``Tuner``, and
:func:`resume_tuning` that restores an interrupted search.

Choices, and why:

- The search space is ``models.ranker.tuning.space``; a dotted key
  (``finetune.lora_rank``) sets a nested field. Samples are applied with
  ``RankerConfig.model_validate`` on the merged dump, so every trial runs a
  config the rest of the platform accepts. Combinations the validators reject
  (``top_k > n_experts``) are refused *before* the search, by validating every
  combination of the space's extreme values (:func:`check_space`): a trial is
  never wasted on an invalid sample, and no sample is silently altered.
- ASHA and the searcher rank trials by ``valid_auc_best``, the running
  maximum of validation AUC: the loop keeps a trial's best epoch, so that is
  what a trial stopped now would deliver; one noisy epoch does not cut it.
  ``valid_auc`` (that epoch's) is reported too.
- Every epoch leaves a checkpoint (model, optimiser and RNG state, and the
  best epoch's weights: small for a reranker), so a crashed trial resumes
  where it stopped (Tune retries it ``max_failures`` times) and a restored
  search resumes its unfinished trials: the checkpoint holds the loop's
  :class:`~pipelines.ranker.loop.EpochState`, which ``loop.run_epochs`` (the
  one epoch loop) continues; reports and checkpoints are its ``on_epoch``.
- Trials are logged to MLflow from the driver after the search, from each
  trial's reported rows: the trial processes need no access to the tracking
  store (a SQLite file takes one writer; a cluster's workers may not reach
  it), and a restored search logs exactly once per trial (runs are keyed by
  the ``rayrec.trial_id`` tag).
- Peak memory is the trial process's ``VmHWM`` (/proc/self/status): Ray runs
  each trial in its own worker process, whose high-water mark is the trial's.
  ``ru_maxrss`` would also count what a forked parent had touched.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from pydantic import ValidationError
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter

from infra.config import RankerConfig, SearchDimension
from infra.logs import get_logger
from models.moe import Reranker
from models.optimizers import SparseDenseAdam
from pipelines.ranker.data import RankerData
from pipelines.ranker.encoded import target_stats
from pipelines.ranker.loop import (
    EpochState,
    configs_from,
    memory_batches,
    new_reranker,
    run_epochs,
)

log = get_logger(__name__)

# _DRIVER_ONLY: mlflow, matplotlib and optuna are imported inside the driver's
# functions. Every trial process imports this module to run _trial; mlflow
# alone added ~7 s to each trial's start on a loaded 2-core machine.

# What ASHA and the searcher maximise (see the module doc).
METRIC = "valid_auc_best"
# The experiment folder keeps the base settings, so a restore needs only the data.
SETTINGS_FILE = "rayrec_ranker_settings.json"
CHECKPOINT_FILE = "trial.pt"
TRIAL_TAG = "rayrec.trial_id"
# Fields a search must not vary: the trial length is ASHA's max_t, and the
# search settings are not hyper-parameters of the model.
FIXED_FIELDS = frozenset({"epochs", "tuning"})


class TuningInterrupted(RuntimeError):
    """The search was stopped before its budget was spent; resume it from its folder."""


@dataclass(frozen=True)
class TrialFault:
    """Test hook: record every trial start, crash one trial and interrupt the search once each.

    Each start writes ``marker_dir/<trial_id>.<ns>`` holding the first epoch
    it will train. Trials are numbered by first start (1-based). After epoch
    ``after_epoch``: trial ``crash_trial`` raises (Tune retries it from its
    checkpoint); trial ``interrupt_trial`` sends SIGUSR1 to ``driver_pid``
    (Tune's stop signal, as Ctrl+C) and waits to be stopped.
    """

    marker_dir: Path
    crash_trial: int | None = None
    interrupt_trial: int | None = None
    driver_pid: int | None = None
    after_epoch: int = 1

    def after(self, order: int, epoch: int, trial_id: str) -> None:
        """Called by the trial after each reported epoch."""
        if epoch < self.after_epoch:
            return
        if order == self.crash_trial and _first_time(self.marker_dir / "crashed", trial_id):
            raise RuntimeError(f"injected crash of trial {trial_id} after epoch {epoch}")
        interrupted = self.marker_dir / "interrupted"
        if order == self.interrupt_trial and _first_time(interrupted, trial_id):
            os.kill(self.driver_pid or os.getppid(), signal.SIGUSR1)
            # Finishing the last epochs first would race the driver's stop.
            time.sleep(120)


def _first_time(flag: Path, trial_id: str) -> bool:
    if flag.exists():
        return False
    flag.write_text(trial_id)
    return True


@dataclass(frozen=True)
class TrialRow:
    """One trial: its sampled values (dotted keys), best validation AUC and costs."""

    trial_id: str
    config: dict[str, Any]
    best_valid_auc: float
    epochs: int
    # Sum of the epochs' training + validation seconds (no process start-up).
    training_s: float
    # Peak resident memory of the trial process (VmHWM), MiB.
    peak_memory_mb: float
    # TERMINATED (finished or stopped by ASHA) or ERROR.
    status: str


@dataclass(frozen=True)
class TuningResult:
    """The best config found, every trial's row, and where the experiment lives."""

    best: RankerConfig
    best_valid_auc: float
    best_trial_id: str
    rows: list[TrialRow]
    wall_s: float
    experiment_path: Path
    # The best trial's latest checkpoint (it holds that trial's best-epoch weights).
    best_checkpoint: Path | None


# --------------------------------------------------------------------------- search space


def _domain(dimension: SearchDimension) -> Any:
    """A Ray Tune domain that OptunaSearch converts to the matching Optuna distribution."""
    if dimension.kind == "choice":
        return tune.choice(list(dimension.values))
    low, high = float(dimension.low or 0.0), float(dimension.high or 0.0)
    if dimension.kind == "loguniform":
        return tune.loguniform(low, high)
    if dimension.kind == "uniform":
        return tune.uniform(low, high)
    if not (low.is_integer() and high.is_integer()):
        raise ValueError(f"an int dimension needs integer bounds, got {low}, {high}")
    # Both bounds inclusive (randint's upper bound is exclusive).
    return tune.randint(int(low), int(high) + 1)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"finetune.lora_rank": 8}`` -> ``{"finetune": {"lora_rank": 8}}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of :func:`_nest`."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_sample(base: RankerConfig, sample: Mapping[str, Any]) -> RankerConfig:
    """``base`` with sampled values set (nested dicts or dotted keys), validated."""
    return RankerConfig.model_validate(_merge(base.model_dump(), _nest(_flatten(sample))))


def param_space(settings: RankerConfig) -> dict[str, Any]:
    """The Tune ``param_space`` of ``settings.tuning.space`` (nested for dotted keys)."""
    return _nest({key: _domain(dim) for key, dim in settings.tuning.space.items()})


def _corners(dimension: SearchDimension) -> tuple[Any, ...]:
    if dimension.kind == "choice":
        return tuple(dimension.values)
    low, high = float(dimension.low or 0.0), float(dimension.high or 0.0)
    return (int(low), int(high)) if dimension.kind == "int" else (low, high)


def check_space(settings: RankerConfig) -> None:
    """Refuse a space that can sample an invalid ``RankerConfig`` (ValueError naming it).

    Every combination of each dimension's choices or bounds is validated;
    RankerConfig's constraints are bounds and orderings, which the corners
    decide. Unknown keys and fixed fields (``epochs``, ``tuning``) are refused.
    """
    space = settings.tuning.space
    if not space:
        raise ValueError("models.ranker.tuning.space is empty: nothing to search")
    fixed = sorted(k for k in space if k.split(".")[0] in FIXED_FIELDS)
    if fixed:
        raise ValueError(f"the search cannot vary {fixed}: epochs is ASHA's max_t")
    keys = list(space)
    for values in itertools.product(*(_corners(space[k]) for k in keys)):
        sample = dict(zip(keys, values, strict=True))
        try:
            apply_sample(settings, sample)
        except ValidationError as error:
            raise ValueError(
                f"the search space can sample an invalid models.ranker config {sample}: "
                f"{error.errors()[0]['msg']}"
            ) from error


# --------------------------------------------------------------------------- the trial


def peak_memory_mb() -> float:
    """This process's peak resident memory (VmHWM) in MiB; NaN where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _record_start(fault: TrialFault, trial_id: str, first_epoch: int) -> int:
    """Write this start's marker; the 1-based order of this trial among distinct trials."""
    fault.marker_dir.mkdir(parents=True, exist_ok=True)
    seen = sorted({p.name.split(".")[0] for p in fault.marker_dir.iterdir() if p.name != "crashed"})
    (fault.marker_dir / f"{trial_id}.{time.time_ns()}").write_text(str(first_epoch))
    return seen.index(trial_id) + 1 if trial_id in seen else len(seen) + 1


def _trial(
    config: dict[str, Any],
    data: RankerData,
    base: RankerConfig,
    fault: TrialFault | None = None,
) -> None:
    """Train one sampled config for up to ``base.epochs`` epochs, reporting each to Tune.

    Resumes from ``tune.get_checkpoint()`` when Tune restarts the trial.
    Early stopping by ``patience`` still applies (set patience >= epochs to
    leave the stopping to ASHA alone).
    """
    settings = apply_sample(base, config)
    torch.set_num_threads(max(1, int(base.tuning.cpus_per_trial)))
    targets = target_stats(data.train)
    model_config, loop = configs_from(settings, targets)
    torch.manual_seed(loop.seed)
    model = new_reranker(data.layout, model_config, loop, targets)
    optimizer = SparseDenseAdam(model, lr=loop.lr, weight_decay=loop.weight_decay)
    generator = torch.Generator().manual_seed(loop.seed)
    state = EpochState()
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        state = EpochState.from_dict(saved)
    trial_id = tune.get_context().get_trial_id()
    order = _record_start(fault, trial_id, state.epoch + 1) if fault is not None else 0

    def checkpoint_and_report(row: dict[str, Any], _: Reranker, state: EpochState) -> None:
        metrics = {
            **row,
            METRIC: state.best_valid_auc,
            "training_s": state.seconds,
            "peak_memory_mb": peak_memory_mb(),
        }
        with tempfile.TemporaryDirectory() as folder:
            saved = {
                **state.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
            }
            torch.save(saved, Path(folder) / CHECKPOINT_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        if fault is not None:
            fault.after(order, state.epoch, trial_id)

    run_epochs(
        model,
        optimizer,
        memory_batches(data.train, loop.batch_size, generator),
        lambda: [data.valid],
        state,
        epochs=loop.epochs,
        patience=loop.patience,
        on_epoch=checkpoint_and_report,
        eval_batch_size=loop.eval_batch_size,
        tasks=loop.tasks,
    )


def load_best_model(result: TuningResult, data: RankerData) -> Reranker:
    """The best trial's best-epoch model (eval mode), from its checkpoint."""
    if result.best_checkpoint is None:
        raise ValueError("the best trial left no checkpoint")
    saved = torch.load(result.best_checkpoint / CHECKPOINT_FILE, weights_only=True)
    model = Reranker(data.layout, configs_from(result.best, target_stats(data.train))[0])
    model.load_state_dict(saved["best_weights"] or saved["model"])
    return model.eval()


# --------------------------------------------------------------------------- the driver


def experiment_name(settings: RankerConfig, data: RankerData) -> str:
    """Deterministic: the same settings and training data give the same experiment folder."""
    digest = hashlib.sha256(json.dumps(settings.model_dump(mode="json"), sort_keys=True).encode())
    for part in (data.train, data.valid):
        for tensor in (part.categorical, part.numeric, part.labels):
            digest.update(tensor.numpy().tobytes())
    return f"ranker-tune-{digest.hexdigest()[:12]}"


def _trainable(data: RankerData, base: RankerConfig, fault: TrialFault | None) -> Any:
    # with_parameters puts the data in the object store once; trials fetch it.
    return tune.with_resources(
        tune.with_parameters(_trial, data=data, base=base, fault=fault),
        {"cpu": base.tuning.cpus_per_trial},
    )


def _tuner(
    settings: RankerConfig,
    data: RankerData,
    storage: Path,
    name: str,
    fault: TrialFault | None,
) -> tune.Tuner:
    tuning = settings.tuning
    scheduler: Any = FIFOScheduler()
    if tuning.asha:
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=settings.epochs,
            grace_period=min(tuning.grace_period, settings.epochs),
            reduction_factor=tuning.reduction_factor,
        )
    from ray.tune.search.optuna import OptunaSearch  # driver only (see _DRIVER_ONLY)

    searcher = ConcurrencyLimiter(OptunaSearch(seed=tuning.seed), tuning.max_concurrent)
    return tune.Tuner(
        _trainable(data, settings, fault),
        param_space=param_space(settings),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=tuning.trials,
            time_budget_s=tuning.max_wall_s,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage.resolve()),
            # The latest checkpoint resumes a trial and holds its best epoch.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            # A crashed trial restarts from its latest checkpoint.
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            verbose=0,
        ),
    )


def tune_ranker(
    data: RankerData,
    settings: RankerConfig,
    storage: Path,
    mlflow_parent_run_id: str | None = None,
    fault: TrialFault | None = None,
) -> TuningResult:
    """Search ``settings.tuning.space`` on ``data``; the experiment lives in ``storage/<name>``.

    The folder name is deterministic (:func:`experiment_name`): an interrupted
    search with the same inputs is resumed (finished trials are kept), a
    finished one is read back. A crashed trial is retried from its latest
    checkpoint (``settings.max_failures`` times, then it counts as errored
    and the search goes on). A search stopped from outside (Ctrl+C, SIGUSR1)
    raises :class:`TuningInterrupted`; :func:`resume_tuning` continues it. With
    ``mlflow_parent_run_id`` each trial becomes a child run of it and the
    best config and the Pareto plot are logged there.
    """
    if not ray.is_initialized():
        raise RuntimeError("tune_ranker needs Ray started (infra.ray_runtime.ensure_ray)")
    check_space(settings)
    path = storage.resolve() / experiment_name(settings, data)
    if tune.Tuner.can_restore(path):
        return resume_tuning(path, data, mlflow_parent_run_id, fault=fault)
    path.mkdir(parents=True, exist_ok=True)
    (path / SETTINGS_FILE).write_text(settings.model_dump_json(indent=2))
    tuner = _tuner(settings, data, storage, path.name, fault)
    return _finish(tuner, settings, path, mlflow_parent_run_id)


def resume_tuning(
    experiment_path: Path,
    data: RankerData,
    mlflow_parent_run_id: str | None = None,
    fault: TrialFault | None = None,
) -> TuningResult:
    """Continue an interrupted search: finished trials are kept, errored and unfinished
    ones resume from their latest checkpoints, the searcher proposes the rest."""
    if not ray.is_initialized():
        raise RuntimeError("resume_tuning needs Ray started (infra.ray_runtime.ensure_ray)")
    path = Path(experiment_path).resolve()
    if not tune.Tuner.can_restore(path):
        raise FileNotFoundError(f"no restorable Ray Tune experiment at {path}")
    settings = RankerConfig.model_validate_json((path / SETTINGS_FILE).read_text())
    tuner = tune.Tuner.restore(
        str(path), trainable=_trainable(data, settings, fault), resume_errored=True
    )
    return _finish(tuner, settings, path, mlflow_parent_run_id)


def _row(result: Any) -> TrialRow:
    frame = result.metrics_dataframe
    metrics = result.metrics or {}
    has_rows = frame is not None and len(frame) > 0 and METRIC in frame
    return TrialRow(
        trial_id=str(metrics.get("trial_id") or Path(result.path).name),
        config=_flatten(result.config or {}),
        best_valid_auc=float(frame[METRIC].max()) if has_rows else float("nan"),
        epochs=int(frame["epoch"].max()) if has_rows else 0,
        training_s=float(frame["training_s"].max()) if has_rows else 0.0,
        peak_memory_mb=float(frame["peak_memory_mb"].max()) if has_rows else float("nan"),
        status="ERROR" if result.error is not None else "TERMINATED",
    )


def _finish(
    tuner: tune.Tuner,
    settings: RankerConfig,
    path: Path,
    mlflow_parent_run_id: str | None,
) -> TuningResult:
    started = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - started
    results = list(grid)
    # Tune returns normally from a stop signal; the state it saved on disk
    # (unlike the grid, whose trials it has stopped since) tells what is left.
    saved = tune.ExperimentAnalysis(str(path)).trials
    unfinished = sum(t.status not in ("TERMINATED", "ERROR") for t in saved)
    if unfinished:
        raise TuningInterrupted(
            f"the search at {path} was stopped with {unfinished} trial(s) unfinished; "
            "continue it with resume_tuning (or tune_ranker with the same inputs)"
        )
    if len(grid) < settings.tuning.trials:
        log.warning("tuning.short", trials=len(grid), budget=settings.tuning.trials, path=str(path))
    rows = [_row(r) for r in results]
    scored = [(row, r) for row, r in zip(rows, results, strict=True) if row.epochs > 0]
    if not scored:
        raise RuntimeError(f"no trial of the search at {path} reported a metric")
    best_row, best_result = max(scored, key=lambda pair: pair[0].best_valid_auc)
    checkpoint = best_result.checkpoint
    outcome = TuningResult(
        best=apply_sample(settings, best_row.config),
        best_valid_auc=best_row.best_valid_auc,
        best_trial_id=best_row.trial_id,
        rows=rows,
        wall_s=wall,
        experiment_path=path,
        best_checkpoint=Path(checkpoint.path) if checkpoint is not None else None,
    )
    if mlflow_parent_run_id is not None:
        log_tuning(outcome, results, mlflow_parent_run_id)
    return outcome


# --------------------------------------------------------------------------- Pareto front, MLflow


def pareto_front(
    rows: Sequence[TrialRow], costs: Sequence[str] = ("training_s", "peak_memory_mb")
) -> list[TrialRow]:
    """Rows no other row dominates: best_valid_auc at least as high and every cost at
    most as high, one of them strictly. Rows without a metric are left out; sorted by cost."""
    valid = [r for r in rows if r.epochs > 0 and math.isfinite(r.best_valid_auc)]

    def objectives(row: TrialRow) -> tuple[float, ...]:
        # Everything minimised.
        return (-row.best_valid_auc, *(float(getattr(row, c)) for c in costs))

    def dominates(a: TrialRow, b: TrialRow) -> bool:
        oa, ob = objectives(a), objectives(b)
        return all(x <= y for x, y in zip(oa, ob, strict=True)) and oa != ob

    front = [r for r in valid if not any(dominates(o, r) for o in valid if o is not r)]
    return sorted(front, key=lambda r: objectives(r)[1:])


def plot_pareto(rows: Sequence[TrialRow], path: Path) -> None:
    """Validation AUC against training seconds per trial; the (AUC, seconds) front in red."""
    import matplotlib  # driver only (see _DRIVER_ONLY)

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    valid = [r for r in rows if r.epochs > 0]
    front = pareto_front(valid, costs=("training_s",))
    fig, axis = plt.subplots(figsize=(6, 4))
    axis.scatter(
        [r.training_s for r in valid],
        [r.best_valid_auc for r in valid],
        c=[r.epochs for r in valid],
        cmap="viridis",
        label="trial (colour: epochs run)",
    )
    axis.plot(
        [r.training_s for r in front],
        [r.best_valid_auc for r in front],
        color="tab:red",
        marker="o",
        fillstyle="none",
        markersize=10,
        label="Pareto front",
    )
    axis.set_xlabel("training seconds")
    axis.set_ylabel("best validation AUC")
    axis.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_tuning(result: TuningResult, trials: Sequence[Any], parent_run_id: str) -> None:
    """Each trial as a child run of ``parent_run_id`` (params, per-epoch metrics with
    ``step=epoch``); the parent gets the best config (JSON), the Pareto plot and rows.

    Trials already logged under the parent (a restored search) are skipped.
    """
    import mlflow  # driver only (see _DRIVER_ONLY)
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow.get_tracking_uri())
    parent = client.get_run(parent_run_id)
    experiment_id = parent.info.experiment_id
    logged = {
        run.data.tags.get(TRIAL_TAG)
        for run in client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
        )
    }
    per_epoch = ("train_loss", "valid_auc", "valid_logloss", METRIC, "seconds", "peak_memory_mb")
    for row, trial in zip(result.rows, trials, strict=True):
        if row.trial_id in logged:
            continue
        run = client.create_run(
            experiment_id,
            run_name=row.trial_id,
            tags={"mlflow.parentRunId": parent_run_id, TRIAL_TAG: row.trial_id},
        )
        frame = trial.metrics_dataframe
        metrics: list[Metric] = []
        if frame is not None:
            for record in frame.to_dict("records"):
                stamp = int(float(record.get("timestamp", time.time())) * 1000)
                for name in per_epoch:
                    value = record.get(name)
                    if value is not None and math.isfinite(float(value)):
                        metrics.append(Metric(name, float(value), stamp, int(record["epoch"])))
        client.log_batch(
            run.info.run_id,
            metrics=metrics,
            params=[Param(key, str(value)) for key, value in sorted(row.config.items())],
            tags=[RunTag("status", row.status)],
        )
        client.set_terminated(
            run.info.run_id, status="FAILED" if row.status == "ERROR" else "FINISHED"
        )
    best = {
        "trial_id": result.best_trial_id,
        "best_valid_auc": result.best_valid_auc,
        "sampled": next(r.config for r in result.rows if r.trial_id == result.best_trial_id),
        "config": result.best.model_dump(mode="json"),
    }
    client.log_dict(parent_run_id, best, "tuning/best_config.json")
    client.log_dict(
        parent_run_id, {"trials": [asdict(r) for r in result.rows]}, "tuning/trials.json"
    )
    with tempfile.TemporaryDirectory() as folder:
        plot = Path(folder) / "auc_vs_seconds.png"
        plot_pareto(result.rows, plot)
        client.log_artifact(parent_run_id, str(plot), "tuning")
    client.log_batch(
        parent_run_id,
        metrics=[
            Metric("tuning_best_valid_auc", result.best_valid_auc, int(time.time() * 1000), 0),
            Metric("tuning_wall_s", result.wall_s, int(time.time() * 1000), 0),
            Metric("tuning_trials", float(len(result.rows)), int(time.time() * 1000), 0),
        ],
    )
