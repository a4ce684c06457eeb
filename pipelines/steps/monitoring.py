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
from monitoring.columns import ROW, ScanRows
from monitoring.sketch_checks import save_sketches
from pipelines.embedding_checks import reference_embeddings
from pipelines.monitor import (
    PROFILE_FOLDER,
    REFERENCE_META,
    REFERENCE_STEP,
    SUMMARY_FILE,
    held_out_rows,
    load_scorer,
    log_start,
    noise_days,
    reference_from_examples,
    reference_period,
    run_monitoring,
    sketches_between,
)
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
    # A scan, never the table: the held-out part, its reference period and the noise
    # days are filters and streaming aggregates; only the sampled rows are read
    # (ScanRows), so memory follows monitoring.reference_rows and drift.noise_rows.
    examples = read_examples(ctx.input_path("features"))
    timed = "ts" in examples.collect_schema().names()
    split = settings.split if timed else "random"
    # The held-out part: scores on rows the model trained on are sharper and its AUC
    # higher than on any later window, so a reference of training rows flags
    # prediction and concept drift on every healthy window.
    held_out = held_out_rows(examples, split, settings.split_ratios, settings.seed)
    scorer = load_scorer(
        ctx.inputs["train_ranker"],
        ctx.inputs.get("finetune_ranker"),
        ctx.inputs.get("train_retrieval"),
        ctx.config.features.history_length,
    )
    assert scorer is not None
    monitoring = ctx.config.monitoring
    period = None
    if timed:
        period = reference_period(
            examples.with_row_index(ROW).filter(held_out),
            log_start(examples),
            monitoring.reference_days,
        )
        if period is not None:
            held_out = held_out & (pl.col("ts") >= period.start)
    # In the order split_examples gave them: by time for a temporal split, else the table's.
    reference = ScanRows.of(examples, held_out, by="ts" if split == "temporal" else None)
    if reference.height == 0:
        return _skipped(ctx, "the reranker's held-out part (valid + test) is empty")
    # The retrieval score (when the spec reads it) is computed on the sampled rows
    # only (pipelines.steps.ranker.ranker_examples would score every row).
    profile = reference_from_examples(
        reference,
        scorer,
        monitoring.reference_rows,
        settings.seed,
        period=period,
        window_days=monitoring.window_days,
        drift=monitoring.drift,
        history=examples if timed else None,
        reference_days=monitoring.reference_days,
    )
    profile.save(ctx.output.join(PROFILE_FOLDER))
    embeddings = None
    if monitoring.embeddings.enabled:
        days = None
        if period is not None:
            days = noise_days(
                examples,
                profile,
                scorer.spec,
                period.end,
                monitoring.reference_days,
                monitoring.drift,
                settings.seed,
            )
            if days is None:  # too few warm days: the reference's own days, when 3 or more
                days = reference.sample(monitoring.embeddings.rows * 4, settings.seed)
        embeddings = reference_embeddings(
            reference, days, ctx.inputs.get("train_retrieval"), ctx.config, settings.seed
        )
        if embeddings is not None:
            embeddings.save(ctx.output.join(PROFILE_FOLDER))
    bounds = None
    sketch_days = 0
    if period is not None:
        # The period's first row (its first midnight, or the held-out part's first row).
        start = (
            examples.with_row_index(ROW)
            .filter(held_out)
            .select(pl.col("ts").min())
            .collect(engine="streaming")
            .item()
        )
        bounds = {"start": start.isoformat(), "end": period.end.isoformat()}
        # The popularity head's baseline: the same days' events, as sketches.
        sketches = sketches_between(
            ctx.input_path("validate"),
            start,
            period.end + dt.timedelta(seconds=1),
            ctx.config.features.sketches,
        )
        save_sketches(sketches, ctx.output.join(PROFILE_FOLDER))
        sketch_days = sketches.height
    meta = {
        "split": split,
        "split_ratios": list(settings.split_ratios),
        "held_out_rows": reference.height,
        "rows": profile.rows,
        "seed": settings.seed,
        "period": bounds,
        "sketch_days": sketch_days,
        "log_age_days": None if period is None else period.log_age_days,
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
        row_counts={"reference": profile.rows, "source": reference.height},
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
        "pipelines.ranker.encoded",
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
