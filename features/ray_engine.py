"""The ``ray`` engine: the same transforms as the ``polars`` engine, run by Ray Data.

Ray Data reads the validated Parquet partitions in parallel. Mergeable parts
go per block and are reduced on the driver: :func:`aggregate_events` on each
block (Arrow in, Arrow out), then :func:`merge_aggregates`. Point-in-time
parts need each entity's whole history, so events are shuffled into ``P``
partitions by ``user_id % P`` (then ``item_id % P``) and
:func:`side_of_partition` runs per partition (the function the ``polars``
engine's out-of-core build runs on the same partitions). The driver joins the
sides with :func:`assemble_by_keys`, so outputs equal the ``polars`` engine's
exactly (a test).
"""

from __future__ import annotations

import io
from typing import Literal

import polars as pl
import pyarrow as pa
import ray
import ray.data
from ray.data.context import DataContext, ShuffleStrategy

from features.aggregates import (
    ENTITY_KEYS,
    CtrPrior,
    aggregate_events,
    compact,
    merge_aggregates,
    prior_from_buckets,
)
from features.build import SIDES, FeatureOutputs, end_of_log, latest_values
from features.dataset import read_events
from features.schemas import EVENTS, check_schema
from features.sketches import SketchTables, build_sketch_tables, merge_sketch_tables
from features.training_frame import (
    assemble_by_keys,
    canonical_rows,
    describe_frame,
    example_rows,
    has_impressions,
    side_of_partition,
)
from infra.config import FeaturesConfig, SketchConfig
from infra.storage import StoragePath


def _buckets_of_files(batch: pa.Table) -> pa.Table:
    """User and item buckets of the Parquet files named in ``batch["path"]``.

    One pass over each file, reading only :data:`BUCKET_COLUMNS` (projection),
    and both entities in one output table (``entity`` + ``id``).
    """
    parts = []
    for path in batch.column("path").to_pylist():
        events = pl.read_parquet(path, columns=BUCKET_COLUMNS)
        parts.extend(
            aggregate_events(events, entity)
            .rename({key: "id"})
            .with_columns(pl.lit(entity).alias("entity"))
            for entity, key in ENTITY_KEYS.items()
        )
    return pl.concat(parts).to_arrow()


def _sketches_of_files(batch: pa.Table, config: SketchConfig) -> pa.Table:
    """Sketch tables of the files in ``batch["path"]``, as rows ``[name, ipc]`` (Arrow IPC bytes)."""
    names, blobs = [], []
    for path in batch.column("path").to_pylist():
        tables = build_sketch_tables(
            pl.read_parquet(path, columns=["user_id", "item_id", "ts"]), config
        )
        for name, frame in tables.as_dict().items():
            sink = io.BytesIO()
            frame.write_ipc(sink)
            names.append(name)
            blobs.append(sink.getvalue())
    return pa.table({"name": names, "ipc": pa.array(blobs, type=pa.binary())})


def sketches_on_ray(files: list[str], config: SketchConfig) -> SketchTables:
    """Sketches built per Parquet partition by Ray Data, merged on the driver (the reduce)."""
    paths = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    rows = _collect(
        paths.map_batches(
            _sketches_of_files, batch_format="pyarrow", batch_size=1, fn_kwargs={"config": config}
        )
    )
    per_file: dict[str, list[pl.DataFrame]] = {name: [] for name in SketchTables.NAMES}
    for name, blob in rows.iter_rows():
        per_file[name].append(pl.read_ipc(io.BytesIO(blob)))
    parts = [
        SketchTables(*(per_file[name][i] for name in SketchTables.NAMES))
        for i in range(len(per_file["dau"]))
    ]
    return merge_sketch_tables(parts, config)


def _with_partition(block: pa.Table, key: str, partitions: int) -> pa.Table:
    frame = pl.from_arrow(block)
    return frame.with_columns((pl.col(key) % partitions).alias("_part")).to_arrow()  # type: ignore[union-attr]


def _side_of_partition(
    block: pa.Table,
    side: Literal["user", "item"],
    items: pl.DataFrame,
    config: FeaturesConfig,
    prior: CtrPrior,
    impressions: bool,
) -> pa.Table:
    """:func:`side_of_partition` of one shuffled group (Arrow in, Arrow out)."""
    events = pl.from_arrow(block).drop("_part")  # type: ignore[union-attr]
    return side_of_partition(events, side, items, config, prior, impressions).to_arrow()


# What the buckets read: like Polars' projection pushdown, skip the other columns.
BUCKET_COLUMNS = ["user_id", "item_id", "ts", "event_type", "label", "value"]


def event_files(data: StoragePath) -> list[str]:
    return [f.path for f in data.join("events").files() if f.path.endswith(".parquet")]


def aggregate_on_ray(files: list[str]) -> dict[str, pl.DataFrame]:
    """User and item day buckets: :func:`aggregate_events` per Parquet file, merged on the driver.

    Ray Data runs one task per file (a date partition): Arrow in, Arrow out, no
    Python per row. The file list is the dataset, rather than
    ``read_parquet``, because Ray Data 2.60 packs files up to 128 MiB into one
    read task, which leaves all but one core idle on partitions of this size.
    """
    paths = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    per_file = _collect(paths.map_batches(_buckets_of_files, batch_format="pyarrow", batch_size=1))
    buckets = {}
    for entity, key in ENTITY_KEYS.items():
        mine = per_file.filter(pl.col("entity") == entity).drop("entity").rename({"id": key})
        buckets[entity] = merge_aggregates(mine)
    return buckets


def read_events_dataset(data: StoragePath) -> ray.data.Dataset:
    """The validated events of a dataset folder as a Ray Dataset, one block per file."""
    files = event_files(data)
    return ray.data.read_parquet(
        files, filesystem=None if data.is_local else data.fs, override_num_blocks=len(files)
    )


def _collect(ds: ray.data.Dataset) -> pl.DataFrame:
    tables = [pl.from_arrow(t) for t in ray.get(ds.to_arrow_refs())]
    frames = [t for t in tables if isinstance(t, pl.DataFrame) and t.height]
    return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()


def build_features_on_ray(
    data: StoragePath,
    users: pl.DataFrame,
    items: pl.DataFrame,
    config: FeaturesConfig,
    partitions: int | None = None,
) -> FeatureOutputs:
    """:func:`features.build.build_features` with Ray Data doing the heavy parts."""
    context = DataContext.get_current()
    previous = context.shuffle_strategy
    # The hash shuffle's aggregator actors cost ~8 s a shuffle on 2 cores; the
    # sort-based pull shuffle runs the same groupby in ~1-2 s here.
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        return _build(data, users, items, config, partitions)
    finally:
        context.shuffle_strategy = previous


def _build(
    data: StoragePath,
    users: pl.DataFrame,
    items: pl.DataFrame,
    config: FeaturesConfig,
    partitions: int | None,
) -> FeatureOutputs:
    if not ray.is_initialized():
        raise RuntimeError("the ray engine needs Ray started (infra.ray_runtime.ensure_ray)")
    events = read_events(data)
    check_schema(events.collect_schema(), EVENTS, "features: events")
    events_ds = read_events_dataset(data)
    parts = partitions or max(2, int(ray.cluster_resources().get("CPU", 2)))
    as_of = end_of_log(events)
    keep = max(config.windows_days)

    buckets = {
        entity: compact(table, as_of, keep)
        for entity, table in aggregate_on_ray(event_files(data)).items()
    }
    prior = prior_from_buckets(buckets["user"], config.ctr_prior_strength)

    impressions = has_impressions(events)
    sides = {}
    for side, key in SIDES:
        partitioned = events_ds.map_batches(
            _with_partition,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"key": key, "partitions": parts},
        )
        # As many shuffle partitions as entity partitions (the default, 200, costs seconds each).
        computed = partitioned.groupby("_part", num_partitions=parts).map_groups(
            _side_of_partition,
            batch_format="pyarrow",
            fn_kwargs={
                "side": side,
                "items": items,
                "config": config,
                "prior": prior,
                "impressions": impressions,
            },
        )
        sides[side] = _collect(computed)

    rows = canonical_rows(example_rows(events, impressions).collect())
    examples = assemble_by_keys(rows, sides["user"], sides["item"], users, items)
    latest_user, latest_item, history = latest_values(
        buckets["user"], buckets["item"], events, config, prior, as_of
    )
    spec = describe_frame(examples, config, users.height, items.height)
    sketches = sketches_on_ray(event_files(data), config.sketches)
    return FeatureOutputs(
        examples.lazy(),
        examples.height,
        spec,
        buckets["user"],
        buckets["item"],
        latest_user,
        latest_item,
        history,
        prior,
        as_of,
        sketches,
    )
