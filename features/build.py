"""Build the feature outputs of one dataset: the offline store and the online seed.

:func:`build_features` is the ``polars`` engine, one code path for every size
(issue 18: tiny runs the same code as a 25M-event log): the events, a Polars
LazyFrame (a scan of the validated files), go through in entity partitions
(``features.partitions``; ``auto`` picks enough that each holds about
``features.events_per_partition`` events), and the examples are assembled and
written one UTC day at a time, so no step of it holds the whole log. The
``ray`` engine (:mod:`features.ray_engine`) runs the same per-partition
functions on Ray Data and merges. Outputs (see
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

import dataclasses
import datetime as dt
import json
import math
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
    ``ray`` engine, :func:`build_features` without a folder), or over the
    files :func:`build_features` already wrote below ``examples_at`` (so
    :func:`write_feature_outputs` leaves them where they are).
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
    # Entity partitions of the polars engine's build; None for the ray engine.
    partitions: int | None = None


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


def partition_count(events: pl.LazyFrame, config: FeaturesConfig) -> int:
    """How many entity partitions :func:`build_features` uses for ``events``.

    ``config.partitions`` when it is a number; with ``auto``, enough that a
    partition holds about ``config.events_per_partition`` events, since a
    partition's events and examples are what the build holds at its peak. The
    count is a streaming ``len`` of the scan (Parquet footers, no pass over
    the rows), so the default preset stays at one partition (no extra passes)
    and a 15x log gets as many as it needs without anyone tuning it.
    """
    if config.partitions != "auto":
        return config.partitions
    n = int(events.select(pl.len()).collect(engine="streaming").item())
    return max(1, math.ceil(n / config.events_per_partition))


def build_features(
    events: pl.LazyFrame,
    users: pl.DataFrame,
    items: pl.DataFrame,
    config: FeaturesConfig,
    folder: StoragePath | None = None,
) -> FeatureOutputs:
    """All feature outputs of a validated interaction dataset, out of core at any size.

    With ``folder`` (the ``features`` step passes its staging folder) the
    examples are written into ``folder/examples`` while they are built and
    come back as a scan of those files; the other outputs come back in
    memory, as they grow with the entities, not the events. Without
    ``folder`` the same build runs in a temporary folder and the examples come
    back in memory: for tests, benchmarks and the two-stage simulation, which
    hand small logs over as frames. Either way it is :func:`_build_partitioned`,
    with :func:`partition_count` partitions.
    """
    if folder is not None:
        return _build_partitioned(events, users, items, config, folder)
    with tempfile.TemporaryDirectory(prefix="rayrec-features-") as scratch:
        outputs = _build_partitioned(events, users, items, config, StoragePath.from_uri(scratch))
        examples = outputs.examples.collect()
    return dataclasses.replace(outputs, examples=examples.lazy(), examples_at=None)


# The name from when the out-of-core build was a second path beside an in-memory
# one; benchmarks/features.py still calls it with a folder.
build_features_out_of_core = build_features


def _build_partitioned(
    events: pl.LazyFrame,
    users: pl.DataFrame,
    items: pl.DataFrame,
    config: FeaturesConfig,
    folder: StoragePath,
) -> FeatureOutputs:
    """:func:`build_features` into ``folder``, one partition or one UTC day at a time.

    At any time memory holds one entity partition of events (``user_id % P
    == p``, then ``item_id % P == p``) with that side's features, or one UTC
    day of examples:

    1. buckets and prior: a streaming aggregation of the scan;
    2. per side and partition: collect that partition's events (a streaming
       filter of the scan), :func:`side_of_partition` (the ``ray`` engine's
       function), spill the result as Parquet, one file per UTC day;
    3. the example rows (:func:`example_rows`) streamed once into a spill
       file, then per UTC day: that day's rows, both sides' spilled files of
       the day, :func:`assemble_by_keys`, write the day;
    4. the spec from the written examples, day by day; the sketches day by
       day, merged; the latest histories per user partition.

    The canonical order starts with ``ts``, so the days written one after the
    other hold the rows in canonical order, and any ``P`` gives the same
    values (a test). The spill folder (in ``folder`` when it is local, where
    the disk is sized for the output, else in the system's temporary folder)
    is removed on the way out, error or not. On object storage the written
    examples are read back whole for the spec (``features.dataset`` scans
    only local folders lazily).
    """
    as_of, user_buckets, item_buckets, prior = _buckets_and_prior(events, config)
    partitions = partition_count(events, config)
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
                write_events_by_date(keyed, spill.join(side), part=part, compression="lz4")
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
        # Streamed once: per day, a filter of this file reads that day's row groups,
        # where a filter of example_rows(events) would redo its ratings join each day.
        rows_file = Path(spill_dir) / "rows.parquet"
        example_rows(events, impressions).sink_parquet(rows_file)
        n_examples = _assemble_by_day(
            pl.scan_parquet(rows_file), spill, users, items, folder.join("examples")
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
        partitions=partitions,
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
