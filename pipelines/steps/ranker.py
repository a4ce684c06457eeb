"""Reranker steps: tune, train, register and fine-tune the MoE reranker on the published examples.

``tune_ranker``      Ray Tune (ASHA + Optuna TPE) over ``models.ranker.tuning.space``
                     on a seeded sample of the same split (at most
                     ``tuning.max_train_rows`` rows, in memory: trials compare
                     configs); trials are MLflow child runs; publishes
                     the best config, every trial's row and the Pareto plot.
                     Off (a "skipped" record) unless ``tuning.enabled``.
``train_ranker``     the ``features`` step's examples and feature spec (and the
                     tuned config, when there is one) -> split
                     (``models.ranker.split``; random for tables without time)
                     and encoded a chunk at a time into a scratch folder of the
                     workdir (:mod:`pipelines.ranker.encoded`) -> Ray Train
                     reading them as Ray Data datasets (the click and, when the
                     examples hold enough of its target,
                     ``models.ranker.second_task``, e.g. the rating: its own
                     gate and head) -> calibration on validation -> test CTR
                     metrics beside a logistic-regression baseline trained on
                     the same rows (streamed from the same files in this
                     process), and the second task's
                     test metrics, all scored a batch at a time; publishes ``model/``
                     (weights + calibrator), ``ranker.json``, the per-epoch
                     history and plots.
``register_ranker``  the model and its feature spec to MLflow (a nested run with
                     per-epoch metrics and plots), registered as ``challenger``;
                     ``champion`` only when the gated test metric wins.
``finetune_ranker``  LoRA on the newest ``finetune.window_days``: the trained model
                     is tuned on the window's first part (base frozen, adapters
                     merged) and judged against itself on the window's last part;
                     publishes the merged model when it wins.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch

from features.dataset import read_examples
from features.feature_spec import SPEC_FILE, FeatureSpec
from infra.config import RankerConfig
from infra.ray_runtime import ensure_ray
from models.artifacts import SavedReranker, load_reranker, load_two_tower, save_reranker
from models.calibration import IsotonicCalibration, TemperatureScaling, click_probabilities
from models.ctr_metrics import expected_calibration_error
from models.moe import Reranker
from pipelines.ranker.data import RankerData
from pipelines.ranker.encoded import (
    ChunkTransform,
    EncodedSplits,
    concat_parts,
    encode_split_examples,
    example_files,
    iter_file_parts,
    scratch_folder,
    split_examples_to_parquet,
)
from pipelines.ranker.loop import (
    Scored,
    click_report,
    configs_from,
    score_parts,
    scored_task_report,
    second_task,
    train_streamed,
)
from pipelines.ranker.plots import plot_history, plot_reliability
from pipelines.ranker.registry import log_reranker
from pipelines.ranker.retrieval_feature import (
    retrieval_score_problem,
    with_retrieval_feature,
    with_retrieval_score,
)
from pipelines.ranker.spec_data import column_spec, split_examples
from pipelines.ranker.trainer import train_ranker
from pipelines.retrieval.registry import log_training_history, metric_name, register_and_gate
from pipelines.step import Step, StepContext, StepResult
from serving.encoding import RETRIEVAL_SCORE, RankerPart, SpecColumns, encode_examples
from serving.scoring import predict

TEST_KEYS = ("auc", "gauc", "logloss", "ece")


def unusable(parts: dict[str, pl.DataFrame], label: str, min_rows: int = 2) -> str | None:
    """Why these parts cannot train or judge a click model (None: they can).

    A part with fewer than ``min_rows`` rows or one class only gives no AUC and
    no calibration: too little data is not bad input, so the step records it
    and skips instead of failing the run (as retrieval trains on any size).
    """
    for name, part in parts.items():
        classes = part.get_column(label).drop_nulls().n_unique() if part.height else 0
        if part.height < min_rows or classes < 2:
            return f"the {name} part has {part.height} rows and {classes} label class(es)"
    return None


def retrieval_transform(
    ctx: StepContext, settings: RankerConfig, columns: list[str]
) -> ChunkTransform | None:
    """What adds the retrieval score column to chunks of example rows, when
    ``settings.retrieval_score`` asks for it and a two-tower was trained (else None)."""
    if not settings.retrieval_score:
        return None
    problem = retrieval_score_problem(ctx.config)
    if problem is not None:
        raise ValueError(f"models.ranker.retrieval_score: {problem}")
    model_folder = Path(ctx.input_path("train_retrieval").local_path()) / "model"
    if not model_folder.exists() or "user_history" not in columns:
        return None  # a CTR table: no two-tower, no ids to score
    model = load_two_tower(model_folder)
    history_length = ctx.config.features.history_length
    return lambda frame: with_retrieval_score(frame, model, history_length)


@dataclass(frozen=True)
class RankerInputs:
    """The encoded examples (None when they cannot train a reranker, then ``reason`` says
    why), the spec they were encoded by and the split used."""

    splits: EncodedSplits | None
    spec: FeatureSpec
    split: str
    reason: str | None


@contextmanager
def ranker_inputs(ctx: StepContext, settings: RankerConfig) -> Iterator[RankerInputs]:
    """The examples published by ``features``, split and encoded by the ranker's spec
    (the features' own, plus the retrieval score when it is on) into a scratch folder of
    the workdir that lives as long as the ``with`` block.

    Two bounded passes of ``settings.chunk_rows`` rows at a time: split (adding the
    retrieval score), then encode, after the retrieval score's training statistics are
    known. Nothing holds the whole table.
    """
    spec = FeatureSpec.load(ctx.input_path("features"))
    files = example_files(ctx.input_path("features").join("examples"))
    with files[0].fs.open_input_file(files[0].path) as handle:
        columns = pq.read_schema(handle).names
    # A CTR table has no time: its split can only be random.
    split = settings.split if "ts" in columns else "random"
    transform = retrieval_transform(ctx, settings, columns)
    with scratch_folder(ctx.workdir, "ranker-examples") as folder:
        raw = split_examples_to_parquet(
            files,
            folder.join("raw"),
            split,
            settings.split_ratios,
            settings.seed,
            settings.chunk_rows,
            transform,
        )
        empty = [name for name, rows in raw.rows.items() if rows < 2]
        if empty:
            reason = f"the {empty[0]} part has {raw.rows[empty[0]]} rows"
            yield RankerInputs(None, spec, split, reason)
            return
        if transform is not None:
            spec = with_retrieval_feature(spec, raw.scan("train"))
        encoded = encode_split_examples(raw, spec, folder.join("encoded"), settings.chunk_rows)
        raw.folder.delete_dir()
        reason = encoded.unusable()
        yield RankerInputs(encoded if reason is None else None, spec, split, reason)


def ranker_spec(ctx: StepContext, model_folder: Path) -> FeatureSpec:
    """The spec the trained reranker reads: saved beside it, else the features' own."""
    if (model_folder / SPEC_FILE).exists():
        return FeatureSpec.model_validate_json((model_folder / SPEC_FILE).read_text())
    return FeatureSpec.load(ctx.input_path("features"))


def _skipped(ctx: StepContext, file: str, reason: str) -> StepResult:
    ctx.output.join(file).write_text_atomic(json.dumps({"skipped": reason}))
    return StepResult(extra={"skipped": reason})


def scored_report(
    scored: Scored, calibrator: TemperatureScaling | IsotonicCalibration | None
) -> tuple[dict[str, float], Any]:
    """CTR metrics of scored rows (calibrated when a calibrator is given) and the
    reliability table."""
    report = click_report(scored, "click", calibrator)
    probabilities = click_probabilities(scored.logits["click"], calibrator)
    _, table = expected_calibration_error(scored.labels, probabilities)
    return report, table


def test_report(
    model: Reranker,
    part: RankerPart,
    calibrator: TemperatureScaling | IsotonicCalibration | None,
) -> tuple[dict[str, float], Any]:
    """:func:`scored_report` of an in-memory ``part``."""
    return scored_report(score_parts(model, [part]), calibrator)


def score_split(model: Reranker, splits: EncodedSplits, name: str, batch_rows: int) -> Scored:
    """The model's scores of part ``name``, read from storage a batch at a time."""
    return score_parts(model, iter_file_parts(splits.files(name), batch_rows), batch_rows)


def sample_part(
    splits: EncodedSplits, name: str, rows: int, seed: int, batch_rows: int
) -> RankerPart:
    """At most ``rows`` rows of part ``name`` drawn at random (seeded), in memory.

    Each row is kept with probability ``rows / part rows``, batch by batch, so
    memory never holds more than the sample and a batch.
    """
    share = min(1.0, rows / max(1, splits.rows[name]))
    generator = np.random.default_rng(seed)
    kept = []
    for part in iter_file_parts(splits.files(name), batch_rows):
        keep = generator.random(len(part)) < share
        kept.append(part.rows(torch.from_numpy(np.flatnonzero(keep))))
    sample = concat_parts(kept)
    return sample.rows(slice(0, rows))


def tuned_settings(ctx: StepContext) -> RankerConfig:
    """``models.ranker``, or the tuned config when ``tune_ranker`` published one."""
    best = Path(ctx.input_path("tune_ranker").local_path()) / "best_config.json"
    if not best.exists():
        return ctx.config.models.ranker
    return RankerConfig.model_validate_json(best.read_text())


def run_tune_ranker(ctx: StepContext) -> StepResult:
    settings = ctx.config.models.ranker
    if not settings.tuning.enabled:
        ctx.output.join("tuning.json").write_text_atomic(json.dumps({"skipped": "tuning off"}))
        return StepResult(extra={"skipped": "tuning off"})
    from pipelines.ranker.tuning import plot_pareto, tune_ranker

    ensure_ray(ctx.config.ray)
    with ranker_inputs(ctx, settings) as inputs:
        if inputs.splits is None:
            return _skipped(ctx, "tuning.json", f"too little data: {inputs.reason}")
        # Trials train in memory on a bounded sample (tuning.max_train_rows rows, a
        # tenth of that for validation): they compare configs, not final models.
        limit = settings.tuning.max_train_rows
        batch_rows = configs_from(settings)[1].eval_batch_size
        splits, seed = inputs.splits, settings.tuning.seed
        data = RankerData(
            layout=splits.layout,
            spec=column_spec(SpecColumns.of(inputs.spec)),
            train=sample_part(splits, "train", limit, seed, batch_rows),
            valid=sample_part(splits, "valid", max(1, limit // 10), seed, batch_rows),
            test=sample_part(splits, "test", 0, seed, batch_rows),
            vocabularies={},
            numeric_stats={},
        )
        split = inputs.split
    storage = Path(ctx.workdir.local_path()) / "ray_results"
    run = mlflow.active_run()
    result = tune_ranker(data, settings, storage, run.info.run_id if run else None)
    out = Path(ctx.output.local_path())
    (out / "best_config.json").write_text(result.best.model_dump_json(indent=2))
    record = {
        "split": split,
        "train_rows": len(data.train),
        "valid_rows": len(data.valid),
        "best_valid_auc": result.best_valid_auc,
        "best_trial_id": result.best_trial_id,
        "wall_s": result.wall_s,
        "trials": [dataclasses.asdict(row) for row in result.rows],
    }
    (out / "tuning.json").write_text(json.dumps(record, indent=2, default=float))
    plot_pareto(result.rows, out / "plots" / "tuning_pareto.png")
    return StepResult(
        row_counts={"trials": len(result.rows)},
        metrics={"tuning_best_valid_auc": result.best_valid_auc, "tuning_wall_s": result.wall_s},
        artifacts=("best_config.json", "tuning.json", "plots/tuning_pareto.png"),
        extra={"best_trial_id": result.best_trial_id},
    )


def run_train_ranker(ctx: StepContext) -> StepResult:
    settings = tuned_settings(ctx)
    ensure_ray(ctx.config.ray)
    storage = Path(ctx.workdir.local_path()) / "ray_results"
    with ranker_inputs(ctx, settings) as inputs:
        if inputs.splits is None:
            return _skipped(ctx, "ranker.json", f"too little data: {inputs.reason}")
        splits, spec, split = inputs.splits, inputs.spec, inputs.split
        trained = train_ranker(splits, settings, storage)
        # The baseline, measured in the same run on the same rows: logistic regression,
        # streamed from the same files in this process (no Ray Train start-up for it).
        lr_model, lr_loop = configs_from(settings.model_copy(update={"kind": "logistic"}))
        baseline = train_streamed(lr_model, lr_loop, splits, settings.shuffle_buffer_rows)
        batch_rows = configs_from(settings)[1].eval_batch_size
        scored = score_split(trained.model, splits, "test", batch_rows)
        lr_scored = score_split(baseline.model, splits, "test", batch_rows)
    second, second_note = second_task(settings, splits.targets)
    test, reliability = scored_report(scored, trained.calibrator)
    uncalibrated, raw_reliability = scored_report(scored, None)
    lr_test, _ = scored_report(lr_scored, None)

    out = Path(ctx.output.local_path())
    save_reranker(trained.model, out / "model", trained.calibrator)
    (out / "model" / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
    summary = {
        "kind": settings.kind,
        "split": split,
        "retrieval_score": RETRIEVAL_SCORE in spec.names,
        "test": test,
        "test_uncalibrated": uncalibrated,
        "logistic_test": lr_test,
        "calibration": trained.calibrator.to_dict() if trained.calibrator else None,
        "best_epoch": trained.best_epoch,
        "best_valid_auc": trained.best_valid_auc,
        "train_s": trained.wall_s,
        "logistic_train_s": baseline.seconds,
        "rows": {name: splits.rows[name] for name in ("train", "valid", "test")},
        "second_task": {
            "task": None if second is None else dataclasses.asdict(second),
            "note": second_note,
            "test": None if second is None else scored_task_report(scored, second),
        },
    }
    (out / "ranker.json").write_text(json.dumps(summary, indent=2, default=float))
    (out / "history.json").write_text(json.dumps(trained.history, indent=2, default=float))
    plot_history(trained.history, out / "plots" / "ranker_loss.png")
    plot_reliability(
        {f"{settings.kind} (calibrated)": reliability, f"{settings.kind} (raw)": raw_reliability},
        out / "plots" / "ranker_reliability.png",
    )
    metrics = {f"ranker_test_{k}": float(test[k]) for k in TEST_KEYS}
    metrics.update({f"ranker_logistic_test_{k}": float(lr_test[k]) for k in TEST_KEYS})
    metrics["ranker_test_ece_uncalibrated"] = float(uncalibrated["ece"])
    if second is not None:
        for key, value in summary["second_task"]["test"].items():
            metrics[f"ranker_test_{second.name}_{key}"] = float(value)
    return StepResult(
        row_counts=summary["rows"],
        metrics=metrics,
        artifacts=(
            "ranker.json",
            "history.json",
            "plots/ranker_loss.png",
            "plots/ranker_reliability.png",
        ),
        extra={"best_epoch": trained.best_epoch, "split": split},
    )


def run_register_ranker(ctx: StepContext) -> StepResult:
    trained = Path(ctx.input_path("train_ranker").local_path())
    if not (trained / "model").exists():
        return _skipped(ctx, "registered.json", "no model")
    if mlflow.active_run() is None:
        return _skipped(ctx, "registered.json", "tracking off")
    settings = ctx.config.models.ranker
    summary = json.loads((trained / "ranker.json").read_text())
    history = json.loads((trained / "history.json").read_text())
    gate_value = float(summary["test"][settings.gate_metric])
    spec = ranker_spec(ctx, trained / "model")
    saved: SavedReranker = load_reranker(trained / "model")
    with mlflow.start_run(run_name="ranker_model", nested=True):
        mlflow.log_dict(ctx.config.model_dump(mode="json"), "config.json")
        log_training_history(history)
        mlflow.log_metrics({metric_name(f"test_{k}"): float(summary["test"][k]) for k in TEST_KEYS})
        mlflow.log_metrics(
            {f"logistic_test_{k}": float(summary["logistic_test"][k]) for k in TEST_KEYS}
        )
        second = summary.get("second_task") or {}
        if second.get("test"):
            name = second["task"]["name"]
            mlflow.log_metrics({f"test_{name}_{k}": float(v) for k, v in second["test"].items()})
        for plot in (trained / "plots").glob("*.png"):
            mlflow.log_artifact(str(plot), "plots")
        schema = dict(read_examples(ctx.input_path("features")).collect_schema())
        if RETRIEVAL_SCORE in spec.names:
            schema[RETRIEVAL_SCORE] = pl.Float64()
        uri = log_reranker(saved, spec, schema)
        registered = register_and_gate(
            uri, settings.registered_model, settings.gate_metric, gate_value
        )
    record = registered.record(settings.gate_metric, gate_value)
    ctx.output.join("registered.json").write_text_atomic(json.dumps(record, indent=2))
    return StepResult(
        metrics={"ranker_promoted": float(registered.promoted)},
        artifacts=("registered.json",),
        extra=record,
    )


def run_finetune_ranker(ctx: StepContext) -> StepResult:
    from pipelines.ranker.finetune import finetune, window_start

    settings = tuned_settings(ctx)
    model_folder = Path(ctx.input_path("train_ranker").local_path()) / "model"
    if not model_folder.exists():
        return _skipped(ctx, "finetune.json", "no model")
    spec = ranker_spec(ctx, model_folder)
    examples = read_examples(ctx.input_path("features"))
    columns = examples.collect_schema().names()
    if "ts" not in columns:
        return _skipped(ctx, "finetune.json", "a table without time has no newest window")
    # Only the window is read (a streaming filter): it is the fine-tune's whole data.
    start = window_start(examples, settings.finetune.window_days)
    window = examples.filter(pl.col("ts") >= start).collect(engine="streaming")
    if RETRIEVAL_SCORE in spec.names:
        transform = retrieval_transform(ctx, settings, columns)
        if transform is not None:
            window = transform(window)
    # The window's first part tunes, its last part judges (validation and report).
    tune_rows, holdout, _ = split_examples(window, "temporal", (0.7, 0.3, 0.0))
    reason = unusable({"tuning": tune_rows, "holdout": holdout}, spec.labels[0])
    if reason is not None:
        days = settings.finetune.window_days
        return _skipped(
            ctx, "finetune.json", f"too little data in the newest {days} day(s): {reason}"
        )
    base = load_reranker(model_folder)
    tune_part = encode_examples(tune_rows, spec)
    holdout_part = encode_examples(holdout, spec)
    result = finetune(
        base.model,
        tune_part,
        holdout_part,
        settings.finetune,
        mode="lora",
        batch_size=settings.batch_size,
        seed=settings.seed,
    )
    improved = result.best_epoch > 0
    before, _ = test_report(base.model, holdout_part, None)
    after, _ = test_report(result.model, holdout_part, None)
    out = Path(ctx.output.local_path())
    if improved:
        # The base calibrator no longer fits the tuned logits: refit on the holdout.
        calibrator = None
        if settings.calibration != "none":
            from models.calibration import fit_calibration

            calibrator = fit_calibration(
                settings.calibration,
                predict(result.model, holdout_part),
                holdout_part.labels.numpy(),
            )
        save_reranker(result.model, out / "model", calibrator)
    record = {
        "window_days": settings.finetune.window_days,
        "rows": {"tune": tune_rows.height, "holdout": holdout.height},
        "base": before,
        "finetuned": after,
        "improved": improved,
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
        "adapted_layers": result.adapted_layers,
        "best_epoch": result.best_epoch,
        "seconds": result.seconds,
        "history": result.history,
    }
    (out / "finetune.json").write_text(json.dumps(record, indent=2, default=float))
    return StepResult(
        row_counts=record["rows"],
        metrics={
            "finetune_base_auc": float(before["auc"]),
            "finetune_auc": float(after["auc"]),
            "finetune_trainable_parameters": float(result.trainable_parameters),
            "finetune_s": result.seconds,
        },
        artifacts=("finetune.json",),
        extra={"improved": improved},
    )


# What the tune, train and fine-tune steps read: the ranker's section, the retrieval
# split and history length (the retrieval-score feature), and the modules they run.
RANKER_CONFIG_KEYS = ("models.ranker", "models.split", "features.history_length")
RANKER_CODE = (
    "models",
    "pipelines.ranker",
    "pipelines.steps.ranker",
    "serving.encoding",
    "serving.scoring",
)

TUNE_RANKER = Step(
    name="tune_ranker",
    run=run_tune_ranker,
    description="Ray Tune (ASHA + Optuna TPE) over the reranker's search space; off unless enabled",
    inputs=("features", "train_retrieval"),
    config_keys=RANKER_CONFIG_KEYS,
    code=RANKER_CODE,
)

TRAIN_RANKER = Step(
    name="train_ranker",
    run=run_train_ranker,
    description="MoE reranker on Ray Train over the feature spec's examples, calibrated, against LR",
    inputs=("features", "tune_ranker", "train_retrieval"),
    config_keys=RANKER_CONFIG_KEYS,
    code=RANKER_CODE,
)

REGISTER_RANKER = Step(
    name="register_ranker",
    run=run_register_ranker,
    description="log the reranker and its feature spec to MLflow; challenger, champion when better",
    inputs=("train_ranker", "features"),
    config_keys=("models.ranker.registered_model", "models.ranker.gate_metric"),
    code=("pipelines.ranker.registry", "pipelines.steps.ranker"),
)

FINETUNE_RANKER = Step(
    name="finetune_ranker",
    run=run_finetune_ranker,
    description="LoRA fine-tune of the trained reranker on the newest window, judged on its end",
    inputs=("train_ranker", "features", "tune_ranker", "train_retrieval"),
    config_keys=RANKER_CONFIG_KEYS,
    code=RANKER_CODE,
)
