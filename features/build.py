"""Build the feature outputs of one dataset: the offline store and the online seed.

:func:`build_features` is engine-agnostic: it takes the validated events as a
Polars LazyFrame and returns frames; the ``polars`` engine runs it in-process,
the ``ray`` engine (:mod:`features.ray_engine`) runs the same transforms per
block and merges. Outputs (see :func:`write_feature_outputs`)::

    examples/date=YYYY-MM-DD/part-00000.parquet   the training frame (offline store)
    feature_spec.json                             its feature spec
    buckets/user.parquet, buckets/item.parquet    compacted day buckets at the log's end
    latest/user.parquet, latest/item.parquet      feature vectors at the log's end
    latest/history.parquet                        each user's recent positive items
    prior.json                                    the smoothing prior (global rate)
    sketches/user_diversity.parquet               HLL of distinct items per user (+ estimate)
    sketches/item_reach.parquet                   HLL of distinct users per item (+ estimate)
    sketches/dau.parquet                          HLL of distinct users per UTC day (+ estimate)
    sketches/item_frequency.parquet               Count-Min of item frequency per UTC day
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

import polars as pl

from features.aggregates import (
    CtrPrior,
    aggregate_events,
    compact,
    entity_features,
    prior_from_buckets,
)
from features.dataset import write_events_by_date, write_table
from features.feature_spec import FeatureSpec
from features.pit import as_of_rows, recent_positives_at
from features.schemas import EVENTS, check_schema
from features.sketches import SketchTables, build_sketch_tables, sketch_memory
from features.training_frame import build_training_frame, describe_frame, example_rows
from infra.config import FeaturesConfig
from infra.storage import StoragePath


@dataclass(frozen=True)
class FeatureOutputs:
    """Everything the ``features`` step publishes, in memory."""

    examples: pl.DataFrame
    spec: FeatureSpec
    user_buckets: pl.DataFrame
    item_buckets: pl.DataFrame
    latest_user: pl.DataFrame
    latest_item: pl.DataFrame
    history: pl.DataFrame
    prior: CtrPrior
    as_of: dt.datetime
    sketches: SketchTables


def end_of_log(events: pl.LazyFrame) -> dt.datetime:
    """One microsecond after the last event: "now" for the latest feature values."""
    last = events.select(pl.col("ts").max()).collect().item()
    if last is None:
        raise ValueError("no events to build features from")
    return last + dt.timedelta(microseconds=1)


def latest_values(
    user_buckets: pl.DataFrame,
    item_buckets: pl.DataFrame,
    events: pl.LazyFrame,
    config: FeaturesConfig,
    prior: CtrPrior,
    as_of: dt.datetime,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Feature vectors and histories at ``as_of``, from merged buckets (the online seed)."""
    latest_user = entity_features(user_buckets, as_of, config.windows_days, prior)
    latest_item = entity_features(item_buckets, as_of, config.windows_days, prior)
    users = as_of_rows(latest_user.get_column("user_id"), as_of, "user_id")
    history = users.join(
        recent_positives_at(users, events, config.history_length), on="_row"
    ).select("user_id", "history")
    return latest_user, latest_item, history


def build_features(
    events: pl.LazyFrame, users: pl.DataFrame, items: pl.DataFrame, config: FeaturesConfig
) -> FeatureOutputs:
    """All feature outputs of a validated interaction dataset, in one process."""
    check_schema(events.collect_schema(), EVENTS, "features: events")
    as_of = end_of_log(events)
    keep = max(config.windows_days)
    user_buckets = compact(aggregate_events(events, "user"), as_of, keep)
    item_buckets = compact(aggregate_events(events, "item"), as_of, keep)
    prior = prior_from_buckets(user_buckets, config.ctr_prior_strength)
    latest_user, latest_item, history = latest_values(
        user_buckets, item_buckets, events, config, prior, as_of
    )
    rows = example_rows(events).collect()
    examples = build_training_frame(rows, events, users, items, config, prior)
    spec = describe_frame(examples, config, users.height, items.height)
    sketches = build_sketch_tables(
        events.select("user_id", "item_id", "ts").collect(), config.sketches
    )
    return FeatureOutputs(
        examples,
        spec,
        user_buckets,
        item_buckets,
        latest_user,
        latest_item,
        history,
        prior,
        as_of,
        sketches,
    )


def write_feature_outputs(outputs: FeatureOutputs, folder: StoragePath) -> dict[str, int]:
    """Write into ``folder`` (a staging folder); returns row counts."""
    write_events_by_date(outputs.examples, folder.join("examples"))
    outputs.spec.save(folder)
    for name, frame in (
        ("buckets/user.parquet", outputs.user_buckets),
        ("buckets/item.parquet", outputs.item_buckets),
        ("latest/user.parquet", outputs.latest_user),
        ("latest/item.parquet", outputs.latest_item),
        ("latest/history.parquet", outputs.history),
    ):
        write_table(frame, folder.join(name))
    for name, frame in outputs.sketches.as_dict().items():
        write_table(frame, folder.join("sketches", f"{name}.parquet"))
    folder.join("prior.json").write_text_atomic(
        json.dumps(
            {
                "rate": outputs.prior.rate,
                "strength": outputs.prior.strength,
                "as_of": outputs.as_of.isoformat(),
            }
        )
    )
    return {
        "examples": outputs.examples.height,
        "users": outputs.latest_user.height,
        "items": outputs.latest_item.height,
        "features": len(outputs.spec.features),
    }


def feature_summary(outputs: FeatureOutputs) -> dict[str, float]:
    """Numbers worth a glance in MLflow: sizes, label rate, null shares, bucket rows."""
    examples = outputs.examples
    numeric = [
        c for c, t in examples.schema.items() if t.is_numeric() and c not in ("user_id", "item_id")
    ]
    nulls = examples.select([pl.col(c).null_count() for c in numeric]).row(0)
    return {
        "examples": float(examples.height),
        "feature_columns": float(len(outputs.spec.features)),
        "label_rate": float(examples.get_column("label").mean() or 0.0),
        "prior_rate": outputs.prior.rate,
        "max_null_share": max(nulls) / max(1, examples.height) if nulls else 0.0,
        "user_bucket_rows_per_user": outputs.user_buckets.height
        / max(1, outputs.latest_user.height),
        "mean_history_length": float(
            outputs.history.get_column("history").list.len().mean() or 0.0
        ),
        **sketch_summary(outputs.sketches),
    }


def sketch_summary(sketches: SketchTables) -> dict[str, float]:
    """Memory per entity (bounded by the sketch sizes) and the headline estimates."""
    users = sketch_memory(sketches.user_diversity, "items_hll")
    items = sketch_memory(sketches.item_reach, "users_hll")
    days = sketch_memory(sketches.item_frequency, "cms")
    return {
        "hll_bytes_per_user_mean": users.mean_bytes,
        "hll_bytes_per_user_max": float(users.max_bytes),
        "hll_bytes_per_item_mean": items.mean_bytes,
        "hll_bytes_per_item_max": float(items.max_bytes),
        "cms_bytes_per_day": days.mean_bytes,
        "dau_estimate_mean": float(sketches.dau.get_column("dau_estimate").mean() or 0.0),
    }
