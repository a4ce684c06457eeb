"""Encoded reranker examples on storage: the one way rows reach the reranker's trainers.

The ``features`` step publishes raw example rows; the reranker reads tensors.
In between, :func:`encode_examples_to_parquet` splits the raw rows (by time or
a seeded hash) and encodes each part by the feature spec
(:func:`serving.encoding.encode_examples`, the encoder serving uses), one
chunk of at most ``chunk_rows`` rows at a time, into Parquet folders::

    <folder>/train/part-*.parquet   <folder>/valid/…   <folder>/test/…

Ray Train's workers read them as Ray Data datasets (``datasets=`` +
``get_dataset_shard``) and turn each batch back into a :class:`RankerPart`
(:func:`part_from_table`): a batch costs a reshape, not an encoding. No
process holds more than a chunk (the split/encode pass) or a batch plus the
shuffle buffer (training): the bounds are ``models.ranker.chunk_rows`` and
``models.ranker.shuffle_buffer_rows``. What travels in ``train_loop_config``
is :class:`EncodedSplits`: folder names, the layout and a few statistics.

One row's columns (Parquet, readable by any tool):

=================== ======================================================
``categorical``     fixed-size list of C int64 (embedding rows, 0 unknown)
``numeric``         fixed-size list of Nn float32 (normalised by the spec)
``sequence_<s>``    fixed-size list of L_s int64 per sequence column
``label``           float32 0/1
``user``            int64 (GAUC's group; absent when the table has none)
``target_<name>``   float32 second-task target, NaN where the row has none
=================== ======================================================

Empty groups (no numeric column, say) are left out. In-memory data
(benchmarks on MovieLens-100K, tests) takes the same path through
:func:`write_ranker_data`, so there is one trainer.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from features.dataset import write_table
from features.feature_spec import FeatureSpec
from infra.storage import StoragePath
from models.moe import FeatureLayout
from pipelines.ranker.data import RankerData
from serving.encoding import RankerPart, SpecColumns, SpecError, encode_examples

PARTS = ("train", "valid", "test")
SplitKind = Literal["temporal", "random"]
# A row function over raw example chunks, run before the split (the retrieval score).
ChunkTransform = Callable[[pl.DataFrame], pl.DataFrame]


@dataclass(frozen=True)
class TargetStats:
    """What the trainer needs of a second-task target on the training part: rows with a
    value and their mean (a regression head starts at it)."""

    rows: int
    mean: float


@dataclass(frozen=True)
class EncodedSplits:
    """Train/valid/test encoded examples below ``folder`` (a URI) and what describes them.

    Small by construction (O(features), not O(rows)): it is what the trainers'
    ``train_loop_config`` carries.
    """

    folder: str
    layout: FeatureLayout
    rows: dict[str, int]
    # The click label's positives per part (a part with one class gives no AUC).
    positives: dict[str, int]
    # Second-task targets present in the rows, with their training statistics.
    targets: dict[str, TargetStats]
    has_users: bool

    def part(self, name: str) -> StoragePath:
        return StoragePath.from_uri(self.folder).join(name)

    def files(self, name: str) -> list[StoragePath]:
        """The Parquet files of part ``name`` (train, valid or test), sorted."""
        folder = self.part(name)
        if not folder.exists():
            return []
        return sorted((f for f in folder.files() if f.path.endswith(".parquet")), key=str)

    def dataset(self, name: str, read_tasks: int) -> Any:
        """Part ``name`` as a Ray Dataset, one block per file, read on demand by at most
        ``read_tasks`` tasks at a time (each holds a file: a chunk of rows).

        The file list is the dataset and a map reads each file, in tasks that
        take no CPU of their own: the trainers hold the cluster's CPUs, and
        ``read_parquet``'s file-listing task asks for one, so it would wait
        for ever behind them (seen with 2 CPUs and one 2-CPU worker). The
        streaming executor's backpressure still bounds what is read ahead.
        """
        import ray.data

        files = self.files(name)
        if not files:
            raise SpecError(f"the {name} part of {self.folder} has no rows")
        paths = ray.data.from_items([{"uri": f.uri} for f in files], override_num_blocks=len(files))
        return paths.map_batches(
            _read_files, batch_format="pyarrow", batch_size=1, num_cpus=0, concurrency=read_tasks
        )

    def unusable(self, min_rows: int = 2) -> str | None:
        """Why these parts cannot train or judge a click model (None: they can)."""
        for name in PARTS:
            rows, positives = self.rows.get(name, 0), self.positives.get(name, 0)
            classes = int(positives > 0) + int(rows - positives > 0)
            if rows < min_rows or classes < 2:
                return f"the {name} part has {rows} rows and {classes} label class(es)"
        return None


def _read_files(batch: pa.Table) -> pa.Table:
    """The rows of the encoded files named in a batch of ``uri`` rows (a Ray Data map)."""
    tables = []
    for uri in batch.column("uri").to_pylist():
        file = StoragePath.from_uri(uri)
        with file.fs.open_input_file(file.path) as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables)


def part_to_table(part: RankerPart) -> pa.Table:
    """A :class:`RankerPart` as an Arrow table in the module's column layout."""
    columns: dict[str, pa.Array] = {}

    def fixed(matrix: np.ndarray, kind: pa.DataType) -> pa.Array:
        width = matrix.shape[1]
        flat = pa.array(np.ascontiguousarray(matrix).reshape(-1), type=kind)
        return pa.FixedSizeListArray.from_arrays(flat, width)

    if part.categorical.shape[1]:
        columns["categorical"] = fixed(part.categorical.numpy(), pa.int64())
    if part.numeric.shape[1]:
        columns["numeric"] = fixed(part.numeric.numpy(), pa.float32())
    for index, sequence in enumerate(part.sequences):
        columns[f"sequence_{index}"] = fixed(sequence.numpy(), pa.int64())
    columns["label"] = pa.array(part.labels.numpy(), type=pa.float32())
    if part.users is not None:
        columns["user"] = pa.array(part.users.numpy(), type=pa.int64())
    for name, values in part.targets.items():
        columns[f"target_{name}"] = pa.array(values.numpy(), type=pa.float32())
    return pa.table(columns)


def _matrix(table: pa.Table, name: str, dtype: type) -> np.ndarray:
    """(N, width) of a fixed-size list column; (N, 0) when the column is absent."""
    if name not in table.column_names:
        return np.zeros((table.num_rows, 0), dtype=dtype)
    column = table.column(name).combine_chunks()
    width = column.type.list_size
    # flatten() honours a sliced array's offset (.values would not).
    return column.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, width)


def part_from_table(table: pa.Table) -> RankerPart:
    """Rows in the module's column layout (a Ray Data batch, a file) as a :class:`RankerPart`."""
    sequences = sorted(
        (c for c in table.column_names if c.startswith("sequence_")),
        key=lambda c: int(c.removeprefix("sequence_")),
    )

    def vector(name: str, dtype: type) -> np.ndarray:
        return table.column(name).to_numpy(zero_copy_only=False).astype(dtype)

    return RankerPart(
        categorical=torch.from_numpy(_matrix(table, "categorical", np.int64)),
        numeric=torch.from_numpy(_matrix(table, "numeric", np.float32)),
        sequences=tuple(torch.from_numpy(_matrix(table, name, np.int64)) for name in sequences),
        labels=torch.from_numpy(vector("label", np.float32)),
        users=torch.from_numpy(vector("user", np.int64)) if "user" in table.column_names else None,
        targets={
            c.removeprefix("target_"): torch.from_numpy(vector(c, np.float32))
            for c in table.column_names
            if c.startswith("target_")
        },
    )


def concat_parts(parts: Sequence[RankerPart]) -> RankerPart:
    """Rows of several parts of one layout, in order (an empty list is not allowed)."""
    if not parts:
        raise ValueError("concat_parts needs at least one part")
    first = parts[0]
    return RankerPart(
        categorical=torch.cat([p.categorical for p in parts]),
        numeric=torch.cat([p.numeric for p in parts]),
        sequences=tuple(
            torch.cat([p.sequences[i] for p in parts]) for i in range(len(first.sequences))
        ),
        labels=torch.cat([p.labels for p in parts]),
        users=None if first.users is None else torch.cat([p.users for p in parts]),  # type: ignore[misc]
        targets={name: torch.cat([p.targets[name] for p in parts]) for name in first.targets},
    )


def iter_tables(files: Iterable[StoragePath], batch_rows: int) -> Iterator[pa.Table]:
    """The rows of Parquet files as Arrow tables of at most ``batch_rows`` rows, file by file:
    memory holds one batch."""
    for file in files:
        with file.fs.open_input_file(file.path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows):
                yield pa.Table.from_batches([batch])


def iter_file_parts(files: Iterable[StoragePath], batch_rows: int) -> Iterator[RankerPart]:
    """The rows of encoded files as parts of at most ``batch_rows`` rows (readers outside
    Ray Train: scoring a part in the driver, a sample for tuning)."""
    return (part_from_table(table) for table in iter_tables(files, batch_rows))


def target_stats(part: RankerPart) -> dict[str, TargetStats]:
    """:class:`TargetStats` of every target of ``part`` (in-memory data)."""
    stats = {}
    for name, values in part.targets.items():
        present = values[~torch.isnan(values)]
        stats[name] = TargetStats(
            int(present.numel()), float(present.mean()) if len(present) else 0.0
        )
    return stats


class PartWriter:
    """Appends encoded chunks to one part's folder, one file per chunk, counting as it goes."""

    def __init__(self, folder: StoragePath) -> None:
        self.folder = folder
        self.files = 0
        self.rows = 0
        self.positives = 0
        self.target_sums: dict[str, tuple[int, float]] = {}

    def write(self, part: RankerPart) -> None:
        if len(part) == 0:
            return
        table = part_to_table(part)
        path = self.folder.join(f"part-{self.files:05d}.parquet")
        path.fs.create_dir(self.folder.path, recursive=True)
        with path.fs.open_output_stream(path.path) as handle:
            pq.write_table(table, handle, compression="zstd")
        self.files += 1
        self.rows += len(part)
        self.positives += int(part.labels.sum())
        for name, values in part.targets.items():
            present = values[~torch.isnan(values)].double()
            count, total = self.target_sums.get(name, (0, 0.0))
            self.target_sums[name] = (count + present.numel(), total + float(present.sum()))

    def target_stats(self) -> dict[str, TargetStats]:
        return {
            name: TargetStats(count, total / count if count else 0.0)
            for name, (count, total) in self.target_sums.items()
        }


def write_ranker_data(
    data: RankerData, folder: StoragePath, chunk_rows: int = 65_536
) -> EncodedSplits:
    """In-memory :class:`RankerData` (benchmarks, tests) as :class:`EncodedSplits` in ``folder``."""

    def chunks(part: RankerPart) -> Iterator[RankerPart]:
        for start in range(0, len(part), chunk_rows):
            yield part.rows(slice(start, start + chunk_rows))

    return write_encoded_parts(
        folder, data.layout, {name: chunks(getattr(data, name)) for name in PARTS}
    )


def write_encoded_parts(
    folder: StoragePath, layout: FeatureLayout, parts: Mapping[str, Iterable[RankerPart]]
) -> EncodedSplits:
    """Encoded chunks of each part (``train``, ``valid``, ``test``: iterables, consumed one
    chunk at a time, one file each) as :class:`EncodedSplits` in ``folder``."""
    writers = {name: PartWriter(folder.join(name)) for name in PARTS}
    has_users = False
    for name in PARTS:
        for chunk in parts[name]:
            writers[name].write(chunk)
            has_users = has_users or chunk.users is not None
    return EncodedSplits(
        folder=folder.uri,
        layout=layout,
        rows={name: writer.rows for name, writer in writers.items()},
        positives={name: writer.positives for name, writer in writers.items()},
        targets=writers["train"].target_stats(),
        has_users=has_users,
    )


def temporal_cuts(examples: pl.LazyFrame, ratios: Sequence[float]) -> tuple[Any, Any]:
    """The ``ts`` values where valid and test start (None: that part is empty).

    The cut is the ``ts`` of the row at rank ``round(r · n)`` in time order, so
    every row of one instant stays on one side. Exact, and bounded: one pass
    counts rows per UTC day, then only the day holding the rank is sorted.
    """
    per_day = (
        examples.group_by(pl.col("ts").dt.truncate("1d").alias("day"))
        .agg(pl.len().alias("n"))
        .sort("day")
        .collect()
    )
    days = per_day.get_column("day").to_list()
    counts = np.cumsum(per_day.get_column("n").to_numpy())
    n = int(counts[-1]) if len(counts) else 0

    def at_rank(rank: int) -> Any:
        if rank >= n:
            return None  # a ratio of 0 at the end: that part is empty
        day_index = int(np.searchsorted(counts, rank, side="right"))
        before = int(counts[day_index - 1]) if day_index else 0
        day = days[day_index]
        in_day = (
            examples.filter((pl.col("ts") >= day) & (pl.col("ts") < day + dt.timedelta(days=1)))
            .select(pl.col("ts").sort())
            .collect()
            .get_column("ts")
        )
        return in_day[rank - before]

    first = round(ratios[0] * n)
    second = round((ratios[0] + ratios[1]) * n)
    return at_rank(first), at_rank(second)


def _part_of_rows(
    frame: pl.DataFrame,
    split: SplitKind,
    ratios: Sequence[float],
    seed: int,
    cuts: tuple[Any, Any],
    offset: int,
) -> np.ndarray:
    """(N,) int8 part index (0 train, 1 valid, 2 test) of each row of a chunk.

    ``random``: a seeded hash of the row's position in the table (``offset``
    + its index in the chunk) against the cumulative ratios, so the split does
    not depend on how the table is chunked.
    """
    if split == "random":
        index = pl.int_range(offset, offset + frame.height, dtype=pl.UInt64, eager=True)
        uniform = index.hash(seed).to_numpy().astype(np.float64) / float(2**64)
        bounds = np.cumsum(ratios)[:2]
        return np.searchsorted(bounds, uniform, side="right").astype(np.int8)
    if "ts" not in frame.columns:
        raise SpecError("a temporal split needs a 'ts' column; use split 'random' for this table")
    ts = frame.get_column("ts")
    part = np.zeros(frame.height, dtype=np.int8)
    for index, cut in enumerate(cuts, start=1):
        if cut is not None:
            part[(ts >= cut).to_numpy()] = index
    return part


def example_files(folder: StoragePath) -> list[StoragePath]:
    """The Parquet files of an example table (``features`` output's ``examples/``), sorted."""
    files = sorted((f for f in folder.files() if f.path.endswith(".parquet")), key=str)
    if not files:
        raise FileNotFoundError(f"no Parquet files below {folder.uri}")
    return files


def iter_frames(files: Iterable[StoragePath], chunk_rows: int) -> Iterator[pl.DataFrame]:
    """The rows of Parquet files as frames of at most ``chunk_rows`` rows, file by file."""
    return (pl.from_arrow(table) for table in iter_tables(files, chunk_rows))  # type: ignore[misc]


@dataclass(frozen=True)
class SplitExamples:
    """Raw example rows split into parts below ``folder`` (not yet encoded)."""

    folder: StoragePath
    rows: dict[str, int]

    def files(self, name: str) -> list[StoragePath]:
        part = self.folder.join(name)
        return example_files(part) if part.exists() and self.rows.get(name) else []

    def scan(self, name: str) -> pl.LazyFrame:
        """Part ``name`` as a LazyFrame (local folders are scanned, others read per file)."""
        files = self.files(name)
        if not files:
            raise SpecError(f"the {name} part is empty")
        if self.folder.is_local:
            return pl.scan_parquet([f.path for f in files])
        return pl.concat([pl.read_parquet(f.read_bytes()).lazy() for f in files])


def split_examples_to_parquet(
    files: Sequence[StoragePath],
    folder: StoragePath,
    split: SplitKind,
    ratios: Sequence[float],
    seed: int,
    chunk_rows: int,
    transform: ChunkTransform | None = None,
) -> SplitExamples:
    """Split raw example files into ``folder/{train,valid,test}``, a chunk at a time.

    ``transform`` runs on every chunk first (adds the retrieval score).
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-9:
        raise ValueError(f"ratios must be 3 non-negative numbers summing to 1, got {ratios}")
    cuts: tuple[Any, Any] = (None, None)
    if split == "temporal":
        scan = pl.scan_parquet([f.path for f in files]) if files[0].is_local else None
        if scan is None:
            scan = pl.concat(
                [pl.read_parquet(f.read_bytes(), columns=["ts"]).lazy() for f in files]
            )
        if "ts" not in scan.collect_schema().names():
            raise SpecError(
                "a temporal split needs a 'ts' column; use split 'random' for this table"
            )
        cuts = temporal_cuts(scan.select("ts"), ratios)
    counts = dict.fromkeys(PARTS, 0)
    offset = 0
    for chunk, frame in enumerate(iter_frames(files, chunk_rows)):
        if transform is not None:
            frame = transform(frame)
        parts = _part_of_rows(frame, split, ratios, seed, cuts, offset)
        offset += frame.height
        for index, name in enumerate(PARTS):
            rows = frame.filter(pl.Series(parts == index))
            if rows.height:
                write_table(rows, folder.join(name, f"part-{chunk:05d}.parquet"))
                counts[name] += rows.height
    return SplitExamples(folder, counts)


def encode_split_examples(
    split: SplitExamples, spec: FeatureSpec, folder: StoragePath, chunk_rows: int
) -> EncodedSplits:
    """Encode every part of ``split`` by ``spec`` into ``folder``, a chunk at a time."""
    train_files = split.files("train")
    if not train_files:
        raise SpecError("the train part is empty")
    with train_files[0].fs.open_input_file(train_files[0].path) as handle:
        names = pq.read_schema(handle).names
    columns = SpecColumns.of(spec, names)
    parts = {
        name: (
            encode_examples(frame, spec, columns)
            for frame in iter_frames(split.files(name), chunk_rows)
        )
        for name in PARTS
    }
    return write_encoded_parts(folder, columns.layout(), parts)


@contextmanager
def scratch_folder(workdir: StoragePath, prefix: str) -> Iterator[StoragePath]:
    """A fresh folder below ``workdir/tmp`` for a step's intermediate Parquet, removed after.

    In the workdir (not the system's temporary folder) because every node of a
    cluster reads it, and its disk is sized for the data.
    """
    folder = workdir.join("tmp", f"{prefix}-{uuid.uuid4().hex[:12]}")
    folder.makedirs()
    try:
        yield folder
    finally:
        folder.delete_dir()
