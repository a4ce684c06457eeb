"""Reranker steps: tune, train, register and fine-tune the MoE reranker on the published examples.

``tune_ranker``      Ray Tune (ASHA + Optuna TPE) over ``models.ranker.tuning.space``
                     on the same split; trials are MLflow child runs; publishes
                     the best config, every trial's row and the Pareto plot.
                     Off (a "skipped" record) unless ``tuning.enabled``.
``train_ranker``     the ``features`` step's examples and feature spec (and the
                     tuned config, when there is one) -> split
                     (``models.ranker.split``; random for tables without time)
                     -> Ray Train (the click and, when the examples hold
                     enough of its target, ``models.ranker.second_task``, e.g.
                     the rating: its own gate and head) -> calibration on
                     validation -> test CTR metrics beside a logistic-regression
                     baseline trained in the same run on the same rows, and the
                     second task's test metrics; publishes ``model/``
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
from pathlib import Path
from typing import Any

import mlflow
import polars as pl

from features.dataset import read_examples
from features.feature_spec import SPEC_FILE, FeatureSpec
from infra.config import RankerConfig
from infra.ray_runtime import ensure_ray
from models.artifacts import SavedReranker, load_reranker, load_two_tower, save_reranker
from models.calibration import IsotonicCalibration, TemperatureScaling, click_probabilities
from models.ctr_metrics import ctr_report, expected_calibration_error
from models.moe import Reranker
from pipelines.ranker.data import RankerData
from pipelines.ranker.loop import configs_from, second_task, task_report, train_epochs
from pipelines.ranker.plots import plot_history, plot_reliability
from pipelines.ranker.registry import log_reranker
from pipelines.ranker.retrieval_feature import (
    retrieval_score_problem,
    with_retrieval_feature,
    with_retrieval_score,
)
from pipelines.ranker.spec_data import ranker_data_from_parts, split_examples
from pipelines.ranker.trainer import train_ranker
from pipelines.retrieval.registry import log_training_history, metric_name, register_and_gate
from pipelines.step import Step, StepContext, StepResult
from serving.encoding import RETRIEVAL_SCORE, RankerPart, encode_examples
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


def ranker_examples(
    ctx: StepContext, settings: RankerConfig, frame: pl.DataFrame | None = None
) -> pl.DataFrame:
    """The examples published by ``features`` (or ``frame``), with the retrieval score
    column when ``settings.retrieval_score`` asks for it and a two-tower was trained."""
    if frame is None:
        frame = read_examples(ctx.input_path("features")).collect()
    if not settings.retrieval_score:
        return frame
    problem = retrieval_score_problem(ctx.config)
    if problem is not None:
        raise ValueError(f"models.ranker.retrieval_score: {problem}")
    model_folder = Path(ctx.input_path("train_retrieval").local_path()) / "model"
    if not model_folder.exists() or "user_history" not in frame.columns:
        return frame  # a CTR table: no two-tower, no ids to score
    model = load_two_tower(model_folder)
    return with_retrieval_score(frame, model, ctx.config.features.history_length)


def ranker_inputs(
    ctx: StepContext, settings: RankerConfig
) -> tuple[RankerData | None, FeatureSpec, str, str | None]:
    """The examples published by ``features``, split and encoded by the ranker's spec
    (the features' own, plus the retrieval score when it is on); the split used; the
    reason they cannot train a reranker (then the data is None)."""
    spec = FeatureSpec.load(ctx.input_path("features"))
    frame = ranker_examples(ctx, settings)
    # A CTR table has no time: its split can only be random.
    split = settings.split if "ts" in frame.columns else "random"
    train, valid, test = split_examples(frame, split, settings.split_ratios, settings.seed)
    reason = unusable({"train": train, "valid": valid, "test": test}, spec.labels[0])
    if reason is not None:
        return None, spec, split, reason
    if RETRIEVAL_SCORE in frame.columns:
        spec = with_retrieval_feature(spec, train)
    return ranker_data_from_parts(train, valid, test, spec), spec, split, None


def ranker_spec(ctx: StepContext, model_folder: Path) -> FeatureSpec:
    """The spec the trained reranker reads: saved beside it, else the features' own."""
    if (model_folder / SPEC_FILE).exists():
        return FeatureSpec.model_validate_json((model_folder / SPEC_FILE).read_text())
    return FeatureSpec.load(ctx.input_path("features"))


def _skipped(ctx: StepContext, file: str, reason: str) -> StepResult:
    ctx.output.join(file).write_text_atomic(json.dumps({"skipped": reason}))
    return StepResult(extra={"skipped": reason})


def test_report(
    model: Reranker,
    part: RankerPart,
    calibrator: TemperatureScaling | IsotonicCalibration | None,
) -> tuple[dict[str, float], Any]:
    """CTR metrics of ``part`` (calibrated when a calibrator is given) and the reliability table."""
    probabilities = click_probabilities(predict(model, part), calibrator)
    labels = part.labels.numpy()
    users = part.users.numpy() if part.users is not None else None
    report = ctr_report(labels, probabilities, users=users)
    _, table = expected_calibration_error(labels, probabilities)
    return report, table


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

    data, _, split, reason = ranker_inputs(ctx, settings)
    if data is None:
        return _skipped(ctx, "tuning.json", f"too little data: {reason}")
    limit = settings.tuning.max_train_rows
    if limit is not None:
        data = dataclasses.replace(
            data,
            train=data.train.sample(limit, settings.tuning.seed),
            valid=data.valid.sample(max(1, limit // 10), settings.tuning.seed),
        )
    ensure_ray(ctx.config.ray)
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
    data, spec, split, reason = ranker_inputs(ctx, settings)
    if data is None:
        return _skipped(ctx, "ranker.json", f"too little data: {reason}")
    ensure_ray(ctx.config.ray)
    storage = Path(ctx.workdir.local_path()) / "ray_results"
    trained = train_ranker(data, settings, storage)
    second, second_note = second_task(settings, data.train)
    test, reliability = test_report(trained.model, data.test, trained.calibrator)
    uncalibrated, raw_reliability = test_report(trained.model, data.test, None)
    # The baseline, measured in the same run on the same rows: logistic regression.
    lr_model, lr_loop = configs_from(settings.model_copy(update={"kind": "logistic"}))
    baseline = train_epochs(lr_model, lr_loop, data)
    lr_test, _ = test_report(baseline.model, data.test, None)

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
        "rows": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        "second_task": {
            "task": None if second is None else dataclasses.asdict(second),
            "note": second_note,
            "test": None if second is None else task_report(trained.model, data.test, second),
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
    from pipelines.ranker.finetune import finetune, window_split

    settings = tuned_settings(ctx)
    model_folder = Path(ctx.input_path("train_ranker").local_path()) / "model"
    if not model_folder.exists():
        return _skipped(ctx, "finetune.json", "no model")
    spec = ranker_spec(ctx, model_folder)
    frame = read_examples(ctx.input_path("features")).collect()
    if "ts" not in frame.columns:
        return _skipped(ctx, "finetune.json", "a table without time has no newest window")
    _, window = window_split(frame, settings.finetune.window_days)
    if RETRIEVAL_SCORE in spec.names:
        window = ranker_examples(ctx, settings, window)
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
