"""Retrieval steps: train the two-tower, build its candidate index, register it.

``train_retrieval``  positives of the validated events -> split (``models.split``)
                     written as files in a scratch folder by a one-off Ray
                     task -> Ray Train -> full-ranking test metrics beside a
                     most-popular baseline; publishes ``model/``, metrics, the
                     per-epoch history and plots.
``index``            item vectors of the trained model, plus content-only vectors
                     of the validated items that arrived after training ->
                     candidate index (``models.index``) with its recall
                     against exact search.
``register_retrieval`` the model, its index and feature spec to MLflow (a nested
                     run with per-epoch metrics and plots), registered as
                     ``challenger``; ``champion`` only when the gated metric wins.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import ray
import torch

from features.dataset import dataset_kind, read_table
from infra.ray_runtime import ensure_ray
from models.artifacts import (
    ITEM_ENCODING_FILE,
    load_item_encoding,
    load_two_tower,
    save_item_encoding,
    save_two_tower,
)
from pipelines.retrieval.cold_start import catalogue_vectors
from pipelines.retrieval.data import RetrievalData, open_retrieval_data, write_validated_split

# Re-exported: the two-stage step reads the same positives.
from pipelines.retrieval.data import positives as positives
from pipelines.retrieval.loop import StepInputs, popularity_report, ranking_report
from pipelines.retrieval.plots import plot_history, plot_recall_at_k
from pipelines.retrieval.registry import (
    log_training_history,
    log_two_tower,
    metric_name,
    register_and_gate,
)
from pipelines.retrieval.trainer import train_retrieval
from pipelines.step import Step, StepContext, StepResult

KS = (10, 20, 50, 100)


def retrieval_data(ctx: StepContext, folder: Path) -> RetrievalData:
    """The step's split written into ``folder`` and opened (O(users + items) read, see
    :mod:`pipelines.retrieval.data`).

    Needs Ray started: the writing runs in a one-off Ray task
    (:func:`pipelines.retrieval.data.write_validated_split`).
    """
    task = ray.remote(num_cpus=1, max_calls=1)(write_validated_split)
    ray.get(task.remote(ctx.input_path("validate").uri, str(folder), ctx.config))
    return open_retrieval_data(folder)


def run_train_retrieval(ctx: StepContext) -> StepResult:
    if dataset_kind(ctx.input_path("validate"))["kind"] == "ctr":
        ctx.output.join("retrieval.json").write_text_atomic(json.dumps({"skipped": "ctr dataset"}))
        return StepResult(extra={"skipped": True})
    ensure_ray(ctx.config.ray)
    workdir = Path(ctx.workdir.local_path())
    (workdir / "scratch").mkdir(parents=True, exist_ok=True)
    # The split as files for the driver and the workers, removed with the step.
    with tempfile.TemporaryDirectory(prefix="train_retrieval-", dir=workdir / "scratch") as tmp:
        return _train_and_publish(ctx, retrieval_data(ctx, Path(tmp)), workdir / "ray_results")


def _train_and_publish(ctx: StepContext, data: RetrievalData, storage: Path) -> StepResult:
    """Train on ``data``, evaluate on its test part and write the step's outputs."""
    config = ctx.config.models.retrieval
    trained = train_retrieval(data, config, storage)
    inputs = StepInputs(data, torch.device("cpu"))
    # Full ranking in user batches (models.metrics.full_ranking_metrics).
    report = ranking_report(trained.model, data, inputs, (*KS, config.eval_k), part="test")
    test = dict(report.metrics)
    # 95% bootstrap CIs over test users: a difference between runs inside them is noise.
    intervals = {
        key: list(bounds)
        for key, bounds in report.confidence_intervals().items()
        if key.split("@")[0] in ("recall", "ndcg", "hit", "mrr")
    }
    popular = popularity_report(data, KS).metrics
    out = Path(ctx.output.local_path())
    save_two_tower(trained.model, out / "model")
    if data.item_encoding is not None:
        save_item_encoding(data.item_encoding, out / "model")
    summary = {
        "test": test,
        "test_ci95": intervals,
        "popularity_test": dict(popular),
        "best_epoch": trained.best_epoch,
        "best_valid": trained.best_valid,
        "train_s": trained.wall_s,
        "users": data.n_users,
        "items": data.n_items,
        "train_pairs": data.n_train,
    }
    (out / "retrieval.json").write_text(json.dumps(summary, indent=2, default=float))
    (out / "history.json").write_text(json.dumps(trained.history, indent=2, default=float))
    plot_history(trained.history, out / "plots" / "loss.png")
    plot_recall_at_k(
        {"two_tower": test, "popularity": popular}, KS, out / "plots" / "recall_at_k.png"
    )
    metrics = {
        metric_name(f"retrieval_{k}"): v
        for k, v in test.items()
        if k.split("@")[0] in ("recall", "ndcg", "hit", "mrr", "coverage")
    }
    metrics.update({metric_name(f"popularity_recall@{k}"): popular[f"recall@{k}"] for k in KS})
    for key in (f"recall@{config.eval_k}", f"ndcg@{config.eval_k}"):
        low, high = intervals[key]
        metrics[metric_name(f"retrieval_{key}_ci_low")] = low
        metrics[metric_name(f"retrieval_{key}_ci_high")] = high
    return StepResult(
        row_counts={"train_pairs": data.n_train, "items": data.n_items, "users": data.n_users},
        metrics=metrics,
        artifacts=("retrieval.json", "history.json", "plots/loss.png", "plots/recall_at_k.png"),
        extra={"best_epoch": trained.best_epoch},
    )


def run_index(ctx: StepContext) -> StepResult:
    trained = Path(ctx.input_path("train_retrieval").local_path())
    if not (trained / "model").exists():
        ctx.output.join("index.json").write_text_atomic(json.dumps({"skipped": "no model"}))
        return StepResult(extra={"skipped": True})
    # Imported here: Faiss loads (and logs) on import, which every CLI command would pay.
    from models.index import build_index_with_report

    model = load_two_tower(trained / "model")
    items_path = ctx.input_path("validate").join("items.parquet")
    items = read_table(items_path) if items_path.exists() else None
    # Items that arrived after training are indexed by their attributes alone.
    catalogue = catalogue_vectors(model, load_item_encoding(trained / "model"), items)
    # Recall is checked on sampled item vectors plus noise (user queries need
    # histories, which live in the online store, not beside the model).
    index, report = build_index_with_report(
        catalogue.ids, catalogue.vectors, ctx.config.models.index
    )
    out = Path(ctx.output.local_path())
    index.save(out / "index")
    summary = {**report.metrics(prefix=""), "content_only_items": catalogue.content_only}
    if catalogue.skipped is not None:
        summary["content_only_skipped"] = catalogue.skipped
    (out / "index.json").write_text(json.dumps(summary, indent=2, default=str))
    return StepResult(
        row_counts={"items": len(index), "content_only_items": catalogue.content_only},
        metrics=report.metrics(),
        artifacts=("index.json",),
        extra={"kind": index.kind},
    )


def run_register_retrieval(ctx: StepContext) -> StepResult:
    trained = Path(ctx.input_path("train_retrieval").local_path())
    if not (trained / "model").exists() or mlflow.active_run() is None:
        reason = "no model" if not (trained / "model").exists() else "tracking off"
        ctx.output.join("registered.json").write_text_atomic(json.dumps({"skipped": reason}))
        return StepResult(extra={"skipped": reason})
    config = ctx.config.models.retrieval
    summary = json.loads((trained / "retrieval.json").read_text())
    history = json.loads((trained / "history.json").read_text())
    gate_value = float(summary["test"][config.gate_metric])
    extra = {"index": Path(ctx.input_path("index").local_path()) / "index"}
    encoding = trained / "model" / ITEM_ENCODING_FILE
    if encoding.exists():
        extra["item_encoding"] = encoding
    spec = Path(ctx.input_path("features").local_path()) / "feature_spec.json"
    if spec.exists():
        extra["feature_spec"] = spec
    with mlflow.start_run(run_name="retrieval_model", nested=True):
        mlflow.log_dict(ctx.config.model_dump(mode="json"), "config.json")
        log_training_history(history)
        mlflow.log_metrics({metric_name(f"test_{k}"): float(v) for k, v in summary["test"].items()})
        for plot in (trained / "plots").glob("*.png"):
            mlflow.log_artifact(str(plot), "plots")
        uri = log_two_tower(load_two_tower(trained / "model"), extra)
        registered = register_and_gate(uri, config.registered_model, config.gate_metric, gate_value)
    record = registered.record(config.gate_metric, gate_value)
    ctx.output.join("registered.json").write_text_atomic(json.dumps(record, indent=2))
    return StepResult(
        metrics={"promoted": float(registered.promoted)},
        artifacts=("registered.json",),
        extra=record,
    )


TRAIN_RETRIEVAL = Step(
    name="train_retrieval",
    run=run_train_retrieval,
    description="two-tower retrieval on Ray Train, evaluated by full ranking against most-popular",
    inputs=("validate",),
    config_keys=("models.retrieval", "models.split", "features.sketches"),
    code=(
        "models",
        "pipelines.retrieval",
        "features.splits",
        "features.encoding",
        "pipelines.steps.retrieval",
    ),
)

INDEX = Step(
    name="index",
    run=run_index,
    description=(
        "candidate index of the trained item vectors and content-only vectors of newer items, "
        "with its recall against exact search"
    ),
    inputs=("train_retrieval", "validate"),
    config_keys=("models.index",),
    code=(
        "models.index",
        "pipelines.retrieval.cold_start",
        "features.encoding",
        "pipelines.steps.retrieval",
    ),
)

REGISTER_RETRIEVAL = Step(
    name="register_retrieval",
    run=run_register_retrieval,
    description="log the retrieval model, index and spec to MLflow; challenger, champion when better",
    inputs=("train_retrieval", "index", "features"),
    config_keys=("models.retrieval.registered_model", "models.retrieval.gate_metric"),
    code=("pipelines.retrieval.registry", "pipelines.steps.retrieval"),
)
