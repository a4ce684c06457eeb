"""Monitoring steps: the reference profile beside the model, and a monitor run on the newest window.

``reference_profile``  ``monitoring.reference_rows`` rows of the last
                       ``monitoring.reference_days`` of the reranker's held-out
                       part (valid + test of the ``features`` examples split as
                       ``train_ranker`` split them), scored by the reranker
                       serving uses; publishes ``profile/`` (a
                       :class:`~monitoring.reference.ReferenceProfile`) and
                       ``reference_meta.json`` (split, period, the model
                       versions that scored it). Skips (with the reason) when
                       no reranker was trained.
``monitor``            :func:`pipelines.monitor.run_monitoring` on the newest
                       ``monitoring.window_days`` of the examples; publishes
                       its ``summary.json`` (the reports themselves live under
                       ``<workdir>/monitoring/reports/``). Fails when an alert
                       could not be delivered under ``on_smtp_failure: fail``
                       (with recipients configured). Skips (with the reason)
                       without a reference profile or on a table without time.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import mlflow
import polars as pl

from features.dataset import read_examples
from infra.errors import StepFailedError
from monitoring.columns import sample_rows
from monitoring.sketch_checks import day_sketches, save_sketches
from pipelines.embedding_checks import reference_embeddings
from pipelines.monitor import (
    PROFILE_FOLDER,
    REFERENCE_META,
    REFERENCE_STEP,
    SUMMARY_FILE,
    events_between,
    load_scorer,
    noise_days,
    reference_from_examples,
    reference_period,
    run_monitoring,
)
from pipelines.ranker.spec_data import split_examples
from pipelines.step import Step, StepContext, StepResult
from pipelines.steps.ranker import tuned_settings


def _skipped(ctx: StepContext, reason: str) -> StepResult:
    ctx.output.join(REFERENCE_META).write_text_atomic(json.dumps({"skipped": reason}))
    return StepResult(extra={"skipped": reason})


def _skip_monitor(ctx: StepContext, reason: str) -> StepResult:
    ctx.output.join(SUMMARY_FILE).write_text_atomic(json.dumps({"skipped": reason}))
    return StepResult(extra={"skipped": reason})


def run_reference_profile(ctx: StepContext) -> StepResult:
    if not (Path(ctx.input_path("train_ranker").local_path()) / "model").exists():
        return _skipped(ctx, "no reranker was trained")
    settings = tuned_settings(ctx)
    frame = read_examples(ctx.input_path("features")).collect()
    split = settings.split if "ts" in frame.columns else "random"
    _, valid, test = split_examples(frame, split, settings.split_ratios, settings.seed)
    # The held-out part: scores on rows the model trained on are sharper and its AUC
    # higher than on any later window, so a reference of training rows flags
    # prediction and concept drift on every healthy window.
    held_out = pl.concat([valid, test], how="vertical_relaxed")
    scorer = load_scorer(
        ctx.inputs["train_ranker"],
        ctx.inputs.get("finetune_ranker"),
        ctx.inputs.get("train_retrieval"),
        ctx.config.features.history_length,
    )
    assert scorer is not None
    if held_out.height == 0:
        return _skipped(ctx, "the reranker's held-out part (valid + test) is empty")
    monitoring = ctx.config.monitoring
    log_age_days: float | None = None
    if "ts" in held_out.columns:
        held_out, log_age_days = reference_period(
            held_out, frame.select(pl.col("ts").min()).item(), monitoring.reference_days
        )
    # The retrieval score (when the spec reads it) is computed on the sampled rows
    # only (pipelines.steps.ranker.ranker_examples would score every row).
    profile = reference_from_examples(
        held_out,
        scorer,
        monitoring.reference_rows,
        settings.seed,
        log_age_days=log_age_days,
        window_days=monitoring.window_days,
        drift=monitoring.drift,
        history=frame if "ts" in frame.columns else None,
        reference_days=monitoring.reference_days,
    )
    profile.save(ctx.output.join(PROFILE_FOLDER))
    embeddings = None
    if monitoring.embeddings.enabled:
        days = None
        if "ts" in held_out.columns:
            days = noise_days(
                frame,
                profile,
                scorer.spec,
                held_out,
                monitoring.reference_days,
                monitoring.drift,
                settings.seed,
            )
            if days is None:  # too few warm days: the reference's own days, when 3 or more
                days = sample_rows(held_out, monitoring.embeddings.rows * 4, settings.seed)
        embeddings = reference_embeddings(
            held_out, days, ctx.inputs.get("train_retrieval"), ctx.config, settings.seed
        )
        if embeddings is not None:
            embeddings.save(ctx.output.join(PROFILE_FOLDER))
    period = None
    sketch_days = 0
    if "ts" in held_out.columns:
        bounds = held_out.select(pl.col("ts").min().alias("start"), pl.col("ts").max().alias("end"))
        start, end = bounds.row(0)
        period = {"start": start.isoformat(), "end": end.isoformat()}
        # The popularity head's baseline: the same days' events, as sketches.
        events = events_between(ctx.input_path("validate"), start, end + dt.timedelta(seconds=1))
        sketches = day_sketches(events, ctx.config.features.sketches)
        save_sketches(sketches, ctx.output.join(PROFILE_FOLDER))
        sketch_days = sketches.height
    meta = {
        "split": split,
        "split_ratios": list(settings.split_ratios),
        "held_out_rows": held_out.height,
        "rows": profile.rows,
        "seed": settings.seed,
        "period": period,
        "sketch_days": sketch_days,
        "log_age_days": log_age_days,
        "unjudged": profile.unjudged,
        "reranker": scorer.reranker_step,
        "scored_with": scorer.sources,
        "features": list(profile.features),
        "labels": list(profile.labels),
        "score_mean": float(profile.frame.get_column("score").mean() or 0.0),
        "embeddings": None
        if embeddings is None
        else {"rows": embeddings.rows, "noise": embeddings.noise, "model": embeddings.model},
    }
    ctx.output.join(REFERENCE_META).write_text_atomic(json.dumps(meta, indent=2))
    return StepResult(
        row_counts={"reference": profile.rows, "source": held_out.height},
        metrics={"reference_score_mean": meta["score_mean"]},
        artifacts=(REFERENCE_META, f"{PROFILE_FOLDER}/reference.json"),
        extra={"reranker": scorer.reranker_step},
    )


def run_monitor(ctx: StepContext) -> StepResult:
    reference = ctx.inputs[REFERENCE_STEP]
    if not reference.path.join(PROFILE_FOLDER, "reference.json").exists():
        reason = f"no reference profile ({reference.manifest.get('skipped', 'not published')})"
        return _skip_monitor(ctx, reason)
    if "ts" not in read_examples(ctx.input_path("features")).collect_schema().names():
        return _skip_monitor(ctx, "a table without time has no windows to monitor")
    record = run_monitoring(ctx.config, track=mlflow.active_run() is not None)
    summary = record.to_dict()
    ctx.output.join(SUMMARY_FILE).write_text_atomic(json.dumps(summary, indent=2))
    if record.delivery_failed:
        raise StepFailedError(
            f"monitor: reports at {record.reports}, but the alert was not delivered: "
            f"{record.delivery_note}"
        )
    drifted = [c for c in record.checks if c["drifted"]]
    return StepResult(
        row_counts={k: int(v) for k, v in record.rows.items()},
        metrics={"monitor_findings": float(len(record.findings)), "monitor_s": record.seconds},
        artifacts=(SUMMARY_FILE,),
        extra={
            "window": record.key,
            "findings": record.findings,
            "drifted": [f"{c['check']}:{c['column']}" for c in drifted],
        },
    )


REFERENCE_PROFILE = Step(
    name=REFERENCE_STEP,
    run=run_reference_profile,
    description="a scored sample of the reranker's held-out rows, their day-to-day noise and "
    "sketches: what drift is measured against",
    inputs=(
        "validate",
        "features",
        "tune_ranker",
        "train_ranker",
        "finetune_ranker",
        "train_retrieval",
    ),
    config_keys=(
        "monitoring.reference_rows",
        "monitoring.reference_days",
        "monitoring.window_days",
        "monitoring.drift",
        "monitoring.embeddings",
        "features.sketches",
        "models.ranker",
        "features.history_length",
    ),
    code=(
        "monitoring.reference",
        "monitoring.columns",
        "monitoring.drift",
        "monitoring.sketch_checks",
        "monitoring.embeddings",
        "monitoring.verdict",
        "features.feature_spec",
        "pipelines.monitor",
        "pipelines.embedding_checks",
        "pipelines.ranker.retrieval_feature",
        "pipelines.steps.monitoring",
        "serving.encoding",
        "serving.scoring",
    ),
)

MONITOR_STEP = Step(
    name="monitor",
    run=run_monitor,
    description="drift of the newest window against the reference; reports, alert e-mail",
    inputs=("reference_profile", "validate", "features", "train_retrieval", "index"),
    config_keys=("monitoring", "features.sketches", "serving.candidates", "models.index"),
    code=(
        "monitoring",
        "pipelines.monitor",
        "pipelines.embedding_checks",
        "pipelines.ranker.retrieval_feature",
        "pipelines.steps.monitoring",
    ),
)
