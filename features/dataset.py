"""What sources produce and the ingest step publishes.

Two shapes of data flow through the platform:

- :class:`InteractionTables`: the canonical ``events`` / ``users`` / ``items``
  tables (plus the raw-id mapping), for anything with users and items.
- :class:`CtrTable`: a generic labelled feature table described by a
  :class:`~features.feature_spec.FeatureSpec` (Criteo, Avazu), with no ids.

Sources hand over *raw* events: canonical column names, but values that may
still be strings; :mod:`features.validation` types them and quarantines what
does not fit. On disk a dataset folder looks like::

    events/date=YYYY-MM-DD/part-*.parquet   users.parquet   items.parquet
    id_map.parquet (when ids were encoded)   dataset.json (kind, name, ts_unit)
    table/part-*.parquet + feature_spec.json (CTR tables)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import polars as pl

from features.feature_spec import FeatureSpec
from infra.storage import StoragePath

DATASET_FILE = "dataset.json"
# Parquet codecs the writers here use: zstd for outputs, lz4 for scratch (half the CPU).
ParquetCompression = Literal["zstd", "lz4", "uncompressed"]
# Events in memory, or a scan a source hands over when its log is too big to read
# at once (MovieLens-25M's ratings.csv): write_interactions streams it.
Events = TypeVar("Events", pl.DataFrame, pl.LazyFrame)
# Rows per events file when a scan is written in chunks: what validate holds at once.
IMPORT_CHUNK_ROWS = 1_000_000


@dataclass(frozen=True)
class InteractionTables(Generic[Events]):
    """Canonical-named tables; ``events`` may still hold raw (string) values.

    ``events`` is a DataFrame, or a LazyFrame for a source read lazily (its
    entity tables are small and come in memory either way).
    """

    name: str
    events: Events
    users: pl.DataFrame
    items: pl.DataFrame
    # entity, raw_id, id; None when the source's ids are already int64 codes.
    id_map: pl.DataFrame | None = None
    # How raw `ts` values are read: unix seconds/ms/us or ISO strings.
    ts_unit: Literal["s", "ms", "us", "iso"] = "s"


@dataclass(frozen=True)
class CtrTable:
    """A labelled feature table (one row per example) and its feature spec."""

    name: str
    table: pl.DataFrame
    spec: FeatureSpec


def write_interactions(
    tables: InteractionTables, folder: StoragePath, chunk_rows: int = IMPORT_CHUNK_ROWS
) -> dict[str, int]:
    """Write ``tables`` into ``folder`` (a staging folder); returns row counts.

    Lazy events are streamed: ``chunk_rows`` rows at a time, each chunk its
    own part (:func:`write_event_chunks`), so neither this nor ``validate``
    (one file at a time) holds the log.
    """
    folder.makedirs()
    if isinstance(tables.events, pl.LazyFrame):
        n_events = write_event_chunks(tables.events, folder.join("events"), chunk_rows)
    else:
        write_events_by_date(tables.events, folder.join("events"))
        n_events = tables.events.height
    write_table(tables.users, folder.join("users.parquet"))
    write_table(tables.items, folder.join("items.parquet"))
    if tables.id_map is not None:
        write_table(tables.id_map, folder.join("id_map.parquet"))
    meta = {"kind": "interactions", "name": tables.name, "ts_unit": tables.ts_unit}
    folder.join(DATASET_FILE).write_text_atomic(json.dumps(meta))
    return {
        "events": n_events,
        "users": tables.users.height,
        "items": tables.items.height,
    }


def write_event_chunks(events: pl.LazyFrame, folder: StoragePath, chunk_rows: int) -> int:
    """:func:`write_events_by_date` of ``events``, ``chunk_rows`` rows at a time; the row count.

    Polars' streaming engine hands the batches over in the scan's order; chunk
    ``i`` is part ``i``, so a row's place in the source is its part and its
    row within it.
    """
    folder.makedirs()
    total = 0
    for part, chunk in enumerate(events.collect_batches(chunk_size=chunk_rows)):
        write_events_by_date(chunk, folder, part=part)
        total += chunk.height
    return total


def write_ctr_table(ctr: CtrTable, folder: StoragePath) -> dict[str, int]:
    folder.makedirs()
    folder.join("table").makedirs()
    write_table(ctr.table, folder.join("table", "part-00000.parquet"))
    ctr.spec.save(folder)
    folder.join(DATASET_FILE).write_text_atomic(json.dumps({"kind": "ctr", "name": ctr.name}))
    return {"rows": ctr.table.height}


def dataset_kind(folder: StoragePath) -> dict[str, str]:
    return json.loads(folder.join(DATASET_FILE).read_text())


def read_events(folder: StoragePath) -> pl.LazyFrame:
    """All events below ``folder/events`` as a LazyFrame of the contract's columns.

    The ``date=`` folders are layout, not data: the partition column is not
    added, so the frame validates against the events contract as it is.
    """
    return _scan(folder.join("events"))


def read_examples(folder: StoragePath) -> pl.LazyFrame:
    """The training frame below ``folder/examples`` (the ``features`` step's output), lazily."""
    return _scan(folder.join("examples"))


def read_ctr_table(folder: StoragePath) -> pl.LazyFrame:
    """The CTR table below ``folder/table`` (a dataset folder of a CTR source), lazily."""
    return _scan(folder.join("table"))


def read_table(path: StoragePath) -> pl.DataFrame:
    with path.fs.open_input_file(path.path) as handle:
        return pl.read_parquet(handle)


def write_table(
    frame: pl.DataFrame, path: StoragePath, compression: ParquetCompression = "zstd"
) -> None:
    """Write one Parquet file (zstd, with statistics); its folder is created.

    Scratch files read back once (a build's spill) pass ``lz4``: half zstd's CPU.
    """
    path.fs.create_dir(path.path.rsplit("/", 1)[0], recursive=True)
    with path.fs.open_output_stream(path.path) as handle:
        frame.write_parquet(handle, compression=compression, statistics=True)


def write_events_by_date(
    events: pl.DataFrame,
    folder: StoragePath,
    part: int = 0,
    compression: ParquetCompression = "zstd",
) -> None:
    """``folder/date=YYYY-MM-DD/part-<part>.parquet`` per UTC date of ``ts``.

    Raw events whose ``ts`` is not yet a timestamp (or is null) go to
    ``date=unknown``; validation types them. Callers writing a table in several
    parts pass a distinct ``part`` for each, so no file is overwritten.
    """
    folder.makedirs()
    if events.is_empty():
        return
    ts = events.get_column("ts")
    if ts.dtype == pl.Datetime("us", "UTC"):
        dates = ts.dt.date().cast(pl.String).fill_null("unknown")
    else:
        dates = pl.Series("date", ["unknown"] * events.height)
    for (date,), frame in (
        events.with_columns(dates.alias("__date"))
        .partition_by("__date", as_dict=True, maintain_order=True)
        .items()
    ):
        write_table(
            frame.drop("__date"),
            folder.join(f"date={date}", f"part-{part:05d}.parquet"),
            compression,
        )


def _scan(folder: StoragePath) -> pl.LazyFrame:
    files = [f for f in folder.files() if f.path.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"no Parquet files below {folder.uri}")
    if folder.is_local:
        return pl.scan_parquet([f.path for f in files], hive_partitioning=False)
    return pl.concat(
        [pl.read_parquet(f.read_bytes()).lazy() for f in files], how="diagonal_relaxed"
    )
