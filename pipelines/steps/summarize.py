"""summarize: a dataset summary a person can read in MLflow.

Counts, date range, event mix, click-through rate by position (the position
bias every later model must handle) and events per day, as ``summary.json``,
``events_per_day.csv`` and a PNG plot, all logged to the step's MLflow run.

Every number is an aggregate of a scan run by Polars' streaming engine (a
``CTR table`` too), so the step holds a few small tables, never the log.
"""

from __future__ import annotations

import io
import json
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers or in CI
import matplotlib.pyplot as plt
import polars as pl

from features.dataset import dataset_kind, read_ctr_table, read_events, read_table
from features.feature_spec import FeatureSpec
from infra.storage import StoragePath
from pipelines.step import Step, StepContext, StepResult


def run_summarize(ctx: StepContext) -> StepResult:
    data = ctx.input_path("validate")
    meta = dataset_kind(data)
    if meta["kind"] == "ctr":
        summary = _summarize_ctr(data)
        artifacts: tuple[str, ...] = ("summary.json",)
    else:
        summary, per_day, by_position = _summarize_interactions(data)
        ctx.output.join("events_per_day.csv").write_text_atomic(per_day.write_csv())
        _plot(per_day, by_position, ctx.output.join("dataset_summary.png"))
        artifacts = ("summary.json", "events_per_day.csv", "dataset_summary.png")
    ctx.output.join("summary.json").write_text_atomic(json.dumps(summary, indent=2, default=str))
    metrics = {
        k: float(v)
        for k, v in summary.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    return StepResult(row_counts={"summary": 1}, metrics=metrics, artifacts=artifacts)


# Each query scans the whole log: the streaming engine aggregates it in batches
# (explicit, whatever POLARS_ENGINE_AFFINITY says). One query each, not collect_all:
# its shared scan would be cached whole in memory.
STREAMING = "streaming"


def _summarize_interactions(data: StoragePath) -> tuple[dict[str, Any], pl.DataFrame, pl.DataFrame]:
    """The summary, events per day and CTR by position: a few streaming aggregates."""
    events = read_events(data)
    is_impression = pl.col("event_type") == "impression"
    totals = (
        events.select(
            pl.len().alias("events"),
            pl.col("user_id").n_unique().alias("active_users"),
            pl.col("item_id").n_unique().alias("active_items"),
            pl.col("ts").min().alias("first_ts"),
            pl.col("ts").max().alias("last_ts"),
            pl.col("request_id").n_unique().alias("requests"),
            pl.col("label").filter(is_impression).mean().alias("_ctr"),
            pl.col("label").mean().alias("_positive_rate"),
        )
        .collect(engine=STREAMING)
        .row(0, named=True)
    )
    ctr, positive_rate = totals.pop("_ctr"), totals.pop("_positive_rate")
    impressions = events.filter(is_impression)
    by_position = (
        impressions.group_by("position")
        .agg(pl.len().alias("impressions"), pl.col("label").mean().alias("ctr"))
        .sort("position")
        .collect(engine=STREAMING)
    )
    day = pl.col("ts").dt.date().alias("date")
    per_day = (
        events.group_by(day, "event_type")
        .len()
        .collect(engine=STREAMING)
        .pivot(on="event_type", index="date", values="len")
        .join(
            # Clicks ride on impression rows (label 1.0): count them as a series of their own.
            impressions.group_by(day)
            .agg(pl.col("label").sum().cast(pl.Int64).alias("clicks"))
            .collect(engine=STREAMING),
            on="date",
            how="left",
        )
        .sort("date")
        .fill_null(0)
    )
    mix = events.group_by("event_type").len().collect(engine=STREAMING)
    n_impressions = int(by_position["impressions"].sum()) if by_position.height else 0
    n_users = read_table(data.join("users.parquet")).height
    n_items = read_table(data.join("items.parquet")).height
    summary: dict[str, Any] = {
        **totals,
        "users": n_users,
        "items": n_items,
        "days": per_day.height,
        "impressions": n_impressions,
        "ctr": float(ctr or 0.0) if n_impressions else 0.0,
        "density": totals["events"] / max(1, n_users * n_items),
        "event_mix": dict(zip(mix["event_type"], mix["len"], strict=True)),
        "ctr_by_position": dict(
            zip(by_position["position"].cast(pl.String), by_position["ctr"], strict=True)
        ),
    }
    if not n_impressions:
        # Rating-only logs (MovieLens): the share of positive labels is the useful rate.
        summary["positive_rate"] = float(positive_rate)
    return summary, per_day, by_position


def _summarize_ctr(data: StoragePath) -> dict[str, Any]:
    spec = FeatureSpec.load(data)
    rows, positive_rate = (
        read_ctr_table(data)
        .select(pl.len(), pl.col(spec.labels[0]).mean())
        .collect(engine=STREAMING)
        .row(0)
    )
    return {
        "rows": rows,
        "positive_rate": float(positive_rate or 0.0),
        "features": len(spec.features),
        "feature_kinds": {
            k: sum(f.kind == k for f in spec.features)
            for k in {f.kind.value for f in spec.features}
        },
    }


def _plot(per_day: pl.DataFrame, by_position: pl.DataFrame, path: StoragePath) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for column in per_day.columns[1:]:
        left.plot(per_day["date"].to_list(), per_day[column].to_list(), label=column)
    left.set_title("events per day")
    left.legend()
    left.tick_params(axis="x", rotation=30)
    if by_position.height:
        right.bar(by_position["position"].to_list(), by_position["ctr"].to_list())
        right.set_title("click-through rate by position")
        right.set_xlabel("position (0 = top)")
    else:
        right.set_axis_off()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    path.write_bytes_atomic(buffer.getvalue())


SUMMARIZE = Step(
    name="summarize",
    run=run_summarize,
    description="dataset summary (counts, CTR by position, events per day) logged to MLflow",
    inputs=("validate",),
    code=("pipelines.steps.summarize",),
)
