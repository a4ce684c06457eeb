"""Build the feature outputs of one dataset: the offline store and the online seed.

:func:`build_features` is engine-agnostic: it takes the validated events as a
Polars LazyFrame and returns frames; the ``polars`` engine runs it in-process,
the ``ray`` engine (:mod:`features.ray_engine`) runs the same transforms per
block and merges. With ``features.partitions > 1`` the ``polars`` engine runs
:func:`build_features_out_of_core` instead: the same outputs, one entity
partition or one day at a time, for logs larger than memory. Outputs (see
:func:`write_feature_outputs`)::

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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from features.aggregates import (
    CtrPrior,
    aggregate_events,
    compact,
    entity_features,
    prior_from_buckets,
)
from features.dataset import read_examples, write_events_by_date, write_table
from features.feature_spec import FeatureSpec
from features.pit import as_of_rows, recent_positives_at
from features.schemas import EVENTS, check_schema
from features.sketches import (
    SketchTables,
    build_sketch_tables,
    merge_sketch_tables,
    sketch_memory,
)
from features.training_frame import (
    assemble_by_keys,
    build_training_frame,
    canonical_rows,
    day_bounds,
    describe_frame,
    example_rows,
    has_impressions,
    side_of_partition,
)
from infra.config import FeaturesConfig
from infra.storage import StoragePath

# The two sides of a row's features and the key their partitions follow.
SIDES: tuple[tuple[Literal["user", "item"], str], ...] = (("user", "user_id"), ("item", "item_id"))


@dataclass(frozen=True)
class FeatureOutputs:
    """Everything the ``features`` step publishes.

    ``examples`` is the training frame as a LazyFrame: over memory (the
    in-memory and ``ray`` builds), or over the files the out-of-core build
    already wrote below ``examples_at`` (so :func:`write_feature_outputs`
    leaves them where they are).
    """

    examples: pl.LazyFrame
    n_examples: int
    spec: FeatureSpec
    user_buckets: pl.DataFrame
    item_buckets: pl.DataFrame
    latest_user: pl.DataFrame
    latest_item: pl.DataFrame
    history: pl.DataFrame
    prior: CtrPrior
    as_of: dt.datetime
    sketches: SketchTables
    examples_at: StoragePath | None = None


def end_of_log(events: pl.LazyFrame) -> dt.datetime:
    """One microsecond after the last event: "now" for the latest feature values."""
    last = events.select(pl.col("ts").max()).collect().item()
    if last is None:
        raise ValueError("no events to build features from")
    return last + dt.timedelta(microseconds=1)


def latest_history(
    user_ids: pl.Series, events: pl.LazyFrame, length: int, as_of: dt.datetime
) -> pl.DataFrame:
    """``user_id, history``: each user's last ``length`` positive items before ``as_of``.

    Rows follow ``user_ids``; ``events`` must hold every event of those users.
    """
    users = as_of_rows(user_ids, as_of, "user_id")
    return users.join(
        recent_positives_at(users, events, length), on="_row", maintain_order="left"
    ).select("user_id", "history")


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
    history = latest_history(
        latest_user.get_column("user_id"), events, config.history_length, as_of
    )
    return latest_user, latest_item, history


def _buckets_and_prior(
    events: pl.LazyFrame, config: FeaturesConfig
) -> tuple[dt.datetime, pl.DataFrame, pl.DataFrame, CtrPrior]:
    """``as_of``, compacted user and item buckets, and the prior: the streamed part."""
    check_schema(events.collect_schema(), EVENTS, "features: events")
    as_of = end_of_log(events)
    keep = max(config.windows_days)
    user_buckets = compact(aggregate_events(events, "user"), as_of, keep)
    item_buckets = compact(aggregate_events(events, "item"), as_of, keep)
    return (
        as_of,
        user_buckets,
        item_buckets,
        prior_from_buckets(user_buckets, config.ctr_prior_strength),
    )


def build_features(
    events: pl.LazyFrame, users: pl.DataFrame, items: pl.DataFrame, config: FeaturesConfig
) -> FeatureOutputs:
    """All feature outputs of a validated interaction dataset, in one process, in memory.

    ``config.partitions`` is ignored here: :func:`build_features_out_of_core`
    is the build for logs larger than memory.
    """
    as_of, user_buckets, item_buckets, prior = _buckets_and_prior(events, config)
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
        examples.lazy(),
        examples.height,
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


def build_features_out_of_core(
    events: pl.LazyFrame,
    users: pl.DataFrame,
    items: pl.DataFrame,
    config: FeaturesConfig,
    folder: StoragePath,
) -> FeatureOutputs:
    """:func:`build_features` for logs larger than memory, in ``config.partitions`` partitions.

    Writes the examples into ``folder/examples`` (the layout of
    :func:`write_feature_outputs`) while it builds; the other outputs come
    back in memory, as they grow with the entities, not the events. At any
    time memory holds one entity partition of events (``user_id % P == p``,
    then ``item_id % P == p``) with that side's features, or one UTC day of
    examples:

    1. buckets and prior: the streamed aggregation of :func:`build_features`;
    2. per side and partition: collect that partition's events (a streaming
       filter of the scan), :func:`side_of_partition` (the ``ray`` engine's
       function), spill the result as Parquet, one file per UTC day;
    3. per UTC day of the examples: that day's example rows, both sides'
       spilled files of the day, :func:`assemble_by_keys`, write the day;
    4. the spec from the written examples, day by day; the sketches day by
       day, merged; the latest histories per user partition.

    The canonical order starts with ``ts``, so the days written one after the
    other hold the rows of :func:`build_features` in its order, with equal
    values (a test). The spill folder (in ``folder`` when it is local, where
    the disk is sized for the output, else in the system's temporary folder)
    is removed on the way out, error or not. On object storage the written
    examples are read back whole for the spec (``features.dataset`` scans
    only local folders lazily).
    """
    partitions = config.partitions
    as_of, user_buckets, item_buckets, prior = _buckets_and_prior(events, config)
    latest_user = entity_features(user_buckets, as_of, config.windows_days, prior)
    latest_item = entity_features(item_buckets, as_of, config.windows_days, prior)
    impressions = has_impressions(events)
    histories = []
    spill_root = folder.local_path() if folder.is_local else Path(tempfile.gettempdir())
    spill_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".spill-", dir=spill_root) as spill_dir:
        spill = StoragePath.from_uri(spill_dir)
        for side, key in SIDES:
            for part in range(partitions):
                mine = events.filter(pl.col(key) % partitions == part).collect(engine="streaming")
                keyed = side_of_partition(mine, side, items, config, prior, impressions)
                write_events_by_date(keyed, spill.join(side), part=part)
                if side == "user":
                    ids = latest_user.get_column("user_id")
                    histories.append(
                        latest_history(
                            ids.filter(ids % partitions == part),
                            mine.lazy(),
                            config.history_length,
                            as_of,
                        )
                    )
                del mine, keyed
        n_examples = _assemble_by_day(
            example_rows(events, impressions), spill, users, items, folder.join("examples")
        )
    history = latest_user.select("user_id").join(
        pl.concat(histories), on="user_id", how="left", maintain_order="left"
    )
    examples = read_examples(folder)
    return FeatureOutputs(
        examples,
        n_examples,
        describe_frame(examples, config, users.height, items.height),
        user_buckets,
        item_buckets,
        latest_user,
        latest_item,
        history,
        prior,
        as_of,
        sketches_by_day(events, config),
        examples_at=folder.join("examples"),
    )


def _assemble_by_day(
    rows: pl.LazyFrame,
    spill: StoragePath,
    users: pl.DataFrame,
    items: pl.DataFrame,
    target: StoragePath,
) -> int:
    """Assemble and write the examples one UTC day at a time; returns how many rows."""
    days = rows.select(pl.col("ts").dt.date().unique().sort()).collect().get_column("ts")
    total = 0
    for day in days.to_list():
        start, end = day_bounds(day)
        today = canonical_rows(
            rows.filter((pl.col("ts") >= start) & (pl.col("ts") < end)).collect()
        )
        sides = [_spilled(spill.join(side, f"date={day.isoformat()}")) for side, _ in SIDES]
        frame = assemble_by_keys(today, sides[0], sides[1], users, items)
        write_events_by_date(frame, target)
        total += frame.height
    return total


def _spilled(folder: StoragePath) -> pl.DataFrame:
    """The spilled side files of one day (one per partition that had rows that day)."""
    files = [f.path for f in folder.files() if f.path.endswith(".parquet")]
    if not files:
        # Every example row is in one partition of each side, so a day with rows has files.
        raise RuntimeError(f"no spilled features in {folder.uri}")
    return pl.read_parquet(files)


# Days of sketch tables held before they are merged into the running total: one
# merge of many parts costs about what a merge of two does (the cost is per
# entity), so merging weekly is ~3x faster than daily and holds a week at most.
SKETCH_MERGE_DAYS = 7


def sketches_by_day(events: pl.LazyFrame, config: FeaturesConfig) -> SketchTables:
    """:func:`build_sketch_tables` per UTC day of ``events``, merged as the days come.

    Memory holds one day of ``user_id, item_id, ts`` and at most
    :data:`SKETCH_MERGE_DAYS` days of tables beside the running merge; the
    ``ray`` engine does the same per Parquet (date) partition in parallel.
    """
    columns = events.select("user_id", "item_id", "ts")
    days = columns.select(pl.col("ts").dt.date().unique().sort()).collect().get_column("ts")
    pending: list[SketchTables] = []
    for day in days.to_list():
        start, end = day_bounds(day)
        block = columns.filter((pl.col("ts") >= start) & (pl.col("ts") < end)).collect()
        pending.append(build_sketch_tables(block, config.sketches))
        if len(pending) > SKETCH_MERGE_DAYS:
            pending = [merge_sketch_tables(pending, config.sketches)]
    if not pending:
        raise ValueError("no events to build sketches from")
    return merge_sketch_tables(pending, config.sketches)


def write_feature_outputs(outputs: FeatureOutputs, folder: StoragePath) -> dict[str, int]:
    """Write into ``folder`` (a staging folder); returns row counts.

    Examples the out-of-core build already wrote (``outputs.examples_at``)
    stay where they are; they must be this folder's.
    """
    target = folder.join("examples")
    if outputs.examples_at is None:
        write_events_by_date(outputs.examples.collect(), target)
    elif outputs.examples_at.uri != target.uri:
        raise ValueError(
            f"the examples were built into {outputs.examples_at.uri}, not {target.uri}: "
            "build out of core into the folder that is written"
        )
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
        "examples": outputs.n_examples,
        "users": outputs.latest_user.height,
        "items": outputs.latest_item.height,
        "features": len(outputs.spec.features),
    }


def feature_summary(outputs: FeatureOutputs) -> dict[str, float]:
    """Numbers worth a glance in MLflow: sizes, label rate, null shares, bucket rows.

    One streaming pass over the examples, which may be larger than memory.
    """
    examples = outputs.examples
    numeric = [
        c
        for c, t in examples.collect_schema().items()
        if t.is_numeric() and c not in ("user_id", "item_id")
    ]
    label_rate, *nulls = (
        examples.select(
            pl.col("label").mean().alias("_label_rate"),
            *[pl.col(c).null_count() for c in numeric],
        )
        .collect(engine="streaming")
        .row(0)
    )
    n = outputs.n_examples
    return {
        "examples": float(n),
        "feature_columns": float(len(outputs.spec.features)),
        "label_rate": float(label_rate or 0.0),
        "prior_rate": outputs.prior.rate,
        "max_null_share": max(nulls) / max(1, n) if nulls else 0.0,
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
