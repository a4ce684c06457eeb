"""features: the offline feature store and the online seed, from validated data.

Interaction data gets point-in-time training examples, day buckets, latest
vectors and histories (see :mod:`features.build`), by the engine in
``features.engine`` (``polars``: out of core in ``features.partitions`` entity
partitions, ``auto`` by the log's size). A generic CTR table is already one row
per example: it is published as the examples with its spec, unchanged.
"""

from __future__ import annotations

import json

from features.build import build_features, feature_summary, write_feature_outputs
from features.dataset import dataset_kind, read_events, read_table, write_table
from features.feature_spec import FeatureSpec
from pipelines.step import Step, StepContext, StepResult


def run_features(ctx: StepContext) -> StepResult:
    data = ctx.input_path("validate")
    if dataset_kind(data)["kind"] == "ctr":
        return _publish_ctr_examples(ctx)
    config = ctx.config.features
    events = read_events(data)
    users = read_table(data.join("users.parquet"))
    items = read_table(data.join("items.parquet"))
    if config.engine == "ray":
        from features.ray_engine import build_features_on_ray
        from infra.ray_runtime import ensure_ray

        ensure_ray(ctx.config.ray)
        outputs = build_features_on_ray(data, users, items, config)
    else:
        # Out of core at every size: examples go straight into the staging folder
        # (spill files beside them, removed before it returns), so nothing is
        # published on an error.
        outputs = build_features(events, users, items, config, ctx.output)
    counts = write_feature_outputs(outputs, ctx.output)
    summary = feature_summary(outputs)
    ctx.output.join("feature_summary.json").write_text_atomic(json.dumps(summary, indent=2))
    return StepResult(
        row_counts=counts,
        metrics={f"features_{k}": v for k, v in summary.items()},
        artifacts=("feature_spec.json", "feature_summary.json"),
        extra={
            "engine": config.engine,
            "partitions": outputs.partitions,
            "as_of": outputs.as_of.isoformat(),
        },
    )


def _publish_ctr_examples(ctx: StepContext) -> StepResult:
    data = ctx.input_path("validate")
    spec = FeatureSpec.load(data)
    files = [f for f in data.join("table").files() if f.path.endswith(".parquet")]
    rows = 0
    for index, file in enumerate(files):
        table = read_table(file)
        rows += table.height
        write_table(table, ctx.output.join("examples", f"part-{index:05d}.parquet"))
    spec.save(ctx.output)
    return StepResult(
        row_counts={"examples": rows, "features": len(spec.features)},
        artifacts=("feature_spec.json",),
        extra={"engine": "passthrough"},
    )


FEATURES = Step(
    name="features",
    run=run_features,
    description="point-in-time training examples, day buckets and latest vectors (offline store)",
    inputs=("validate",),
    # Neither the engine nor features.partitions changes the output (tested), so
    # they are not part of the fingerprint.
    config_keys=(
        "features.windows_days",
        "features.ctr_prior_strength",
        "features.history_length",
        "features.sketches",
    ),
    code=(
        "features.aggregates",
        "features.pit",
        "features.training_frame",
        "features.build",
        "features.sketches",
        "pipelines.steps.features",
    ),
)
