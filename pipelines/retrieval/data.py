"""Retrieval training data: a split written once as files that the driver and the workers open.

Ray Train pickles ``train_loop_config`` into its controller and every worker,
so nothing the size of the interactions may travel in it: the writer
(:func:`write_retrieval_data`) puts one split on local storage, and every
process opens it with :func:`open_retrieval_data` from the folder's path.

Sizes, with ``U`` users, ``I`` items, ``L`` the history length and ``N`` the
distinct training pairs (about 0.8 of the events under an 8:1:1 split):

- O(U + I), loaded whole by each process that opens the folder
  (``meta.pkl``): item probabilities and counts (I,), the attribute tables and
  the item encoding. The recent histories (``history.npy``, (U, L) int64: 240
  MB for 300k users at L = 100) are memory-mapped copy-on-write, so the driver
  and the workers of one machine share one copy.
- O(N), never loaded whole after writing:
  the training pairs, Parquet files ``pairs/part-*.parquet`` in a seeded
  random order, read as a Ray Dataset and iterated in batches; and the CSR
  arrays of the valid, test and seen items (``<name>.indptr.npy`` (U + 1,),
  ``<name>.indices.npy`` (nnz,), int64), memory-mapped read-only: processes on
  one machine share their pages through the page cache, and full-ranking
  evaluation reads them one user batch at a time. At 25M events the index
  arrays total about 8 bytes × (0.8 + 0.9 + 0.1 + 0.1) × 25M ≈ 380 MB on disk.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features.dataset import read_events, read_table
from features.encoding import AttributeEncoding, AttributeTable, encode_attributes
from features.sketches.cms import cms_estimates, cms_from_events, cms_total_weight
from features.sources.movielens import read_movielens
from features.splits import Split, make_split, random_split, user_item_matrix
from infra.config import RayrecConfig, RetrievalConfig, SketchConfig
from infra.storage import StoragePath
from models.metrics import UserItems
from models.two_tower import PAD

META_FILE = "meta.pkl"
HISTORY_FILE = "history.npy"
PAIRS_FOLDER = "pairs"
# Training pairs per Parquet file: several files let Ray Data read in parallel
# and split the data between workers; 512k pairs are 8 MB of int64 columns.
PAIRS_PER_FILE = 1 << 19
# The CSR matrices written beside the pairs (see RetrievalData's properties).
MATRICES = ("valid", "test", "seen_for_valid", "seen_for_test")


@dataclass(frozen=True)
class RetrievalData:
    """One split of an interaction dataset, opened from its folder (module doc).

    ``item_probability``
    (I,) float64 the share of training interactions of each item, from a
    Count-Min sketch (the logQ correction); ``item_counts`` (I,) int64 the
    exact training interactions per item (the most-popular baseline).
    ``item_encoding`` is how item attributes were encoded (None without
    attributes): saved with the model, it encodes items that arrive later for
    their content-only vectors.

    The fields are O(U + I): pickling this object never carries the
    interactions or the histories, which stay in ``folder`` (see
    :attr:`pair_files`, :attr:`history` and the matrix properties).
    """

    folder: Path
    n_users: int
    n_items: int
    n_train: int
    item_probability: np.ndarray
    item_counts: np.ndarray
    user_attributes: AttributeTable
    item_attributes: AttributeTable
    item_encoding: AttributeEncoding | None = None

    @property
    def pair_files(self) -> list[str]:
        """The Parquet files of the training pairs (columns ``user``, ``item``), in order."""
        return sorted(str(p) for p in (self.folder / PAIRS_FOLDER).glob("part-*.parquet"))

    @property
    def history(self) -> np.ndarray:
        """(U, L) int64 each user's most recent ``L`` training items as item embedding rows.

        ``item + 1``; 0 pads the end. Memory-mapped copy-on-write: writable
        (torch wraps it without a copy) yet shared between processes until written.
        """
        return np.load(self.folder / HISTORY_FILE, mmap_mode="c")

    @property
    def valid(self) -> UserItems:
        """Validation items per user (memory-mapped)."""
        return self._matrix("valid")

    @property
    def test(self) -> UserItems:
        """Test items per user (memory-mapped)."""
        return self._matrix("test")

    @property
    def seen_for_valid(self) -> UserItems:
        """Training items per user: excluded when scoring validation (memory-mapped)."""
        return self._matrix("seen_for_valid")

    @property
    def seen_for_test(self) -> UserItems:
        """Training and validation items per user: excluded when scoring test (RecBole's protocol)."""
        return self._matrix("seen_for_test")

    @property
    def train_users(self) -> np.ndarray:
        """(N,) int64 users of the training pairs in their written order: loads all N.

        For raw-loop benchmarks on small data only; the pipeline reads
        :attr:`pair_files` as a Ray Dataset.
        """
        return self._pairs("user")

    @property
    def train_items(self) -> np.ndarray:
        """(N,) int64 items of the training pairs, aligned with :attr:`train_users`: loads all N."""
        return self._pairs("item")

    def _pairs(self, column: str) -> np.ndarray:
        files = self.pair_files
        if not files:
            return np.zeros(0, dtype=np.int64)
        return pl.read_parquet(files, columns=[column])[column].to_numpy().astype(np.int64)

    def _matrix(self, name: str) -> UserItems:
        # Opened on each access: a memory map costs no read, and an object that
        # held the arrays would carry them into every pickle of this one.
        return UserItems(
            np.load(self.folder / f"{name}.indptr.npy", mmap_mode="r"),
            np.load(self.folder / f"{name}.indices.npy", mmap_mode="r"),
        )


def write_retrieval_data(
    split: Split,
    users: pl.DataFrame,
    items: pl.DataFrame,
    n_users: int,
    n_items: int,
    config: RetrievalConfig,
    sketches: SketchConfig,
    folder: Path,
) -> None:
    """Write ``split`` for ids ``0..n_users-1`` and ``0..n_items-1`` into ``folder`` (module doc).

    The caller holds the split (O(events)) while this runs; afterwards nothing
    needs it in memory. The training pairs are written in one seeded random
    order (``config.seed``): sorted by user they would give batches of few
    users, whose in-batch negatives are then mostly one user's own positives
    (masked as accidental hits). Workers reshuffle their shard every epoch
    (:func:`pipelines.retrieval.loop.epoch_batches`).
    """
    for name, part in (("train", split.train), ("valid", split.valid), ("test", split.test)):
        for key, n in (("user_id", n_users), ("item_id", n_items)):
            if part.height and (part[key].min() < 0 or part[key].max() >= n):  # type: ignore[operator]
                raise ValueError(f"{name} part: {key} outside 0..{n - 1}")
    folder.mkdir(parents=True, exist_ok=True)
    train = split.train.sort("user_id", "ts", "item_id")
    _write_pairs(train, folder / PAIRS_FOLDER, config.seed)
    parts = {
        "valid": split.valid,
        "test": split.test,
        "seen_for_valid": train,
        "seen_for_test": pl.concat([train, split.valid.select(train.columns)]),
    }
    for name, frame in parts.items():
        indptr, indices = user_item_matrix(frame, n_users)
        np.save(folder / f"{name}.indptr.npy", indptr)
        np.save(folder / f"{name}.indices.npy", indices)
    _, user_attributes = encode_attributes(users, "user_id", n_users)
    item_encoding: AttributeEncoding | None
    item_encoding, item_attributes = encode_attributes(items, "item_id", n_items)
    if not config.use_attributes:
        user_attributes = AttributeTable.empty(n_users)
        item_attributes = AttributeTable.empty(n_items)
        item_encoding = None
    meta: dict[str, Any] = {
        "n_users": n_users,
        "n_items": n_items,
        "n_train": train.height,
        "item_probability": item_probability(train, n_items, sketches),
        "item_counts": np.bincount(
            train["item_id"].to_numpy().astype(np.int64), minlength=n_items
        ).astype(np.int64),
        "user_attributes": user_attributes,
        "item_attributes": item_attributes,
        "item_encoding": item_encoding,
    }
    np.save(folder / HISTORY_FILE, recent_history(train, n_users, config.history_length))
    # Pickle: a scratch file of this run, read back by the same code version.
    (folder / META_FILE).write_bytes(pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL))


def positives(events: pl.LazyFrame) -> pl.DataFrame:
    """Interactions to retrieve: positive events, one row per (user, item, ts)."""
    return (
        events.filter(pl.col("label") > 0)
        .select("user_id", "item_id", "ts")
        .unique(maintain_order=True)
        .collect()
    )


def write_validated_split(validated: str, folder: str, config: RayrecConfig) -> None:
    """Positives of the validated events at ``validated`` -> split -> files in ``folder``.

    Runs as a Ray task in a process of its own (``pipelines.steps.retrieval``): the
    events, their split and the CSR matrices are O(events) and live only in
    that process, which exits when done (``max_calls=1`` hands its memory back
    to the OS), so the driver never holds them. It lives here, not beside the
    step, so that process imports only what writing needs.
    """
    data = StoragePath.from_uri(validated)
    users = read_table(data.join("users.parquet"))
    items = read_table(data.join("items.parquet"))
    interactions = positives(read_events(data))
    n_users = int(max(users["user_id"].max() or 0, interactions["user_id"].max() or 0)) + 1  # type: ignore[operator]
    n_items = int(max(items["item_id"].max() or 0, interactions["item_id"].max() or 0)) + 1  # type: ignore[operator]
    split = make_split(interactions, config.models.split)
    del interactions
    write_retrieval_data(
        split,
        users,
        items,
        n_users,
        n_items,
        config.models.retrieval,
        config.features.sketches,
        Path(folder),
    )


def open_retrieval_data(folder: Path) -> RetrievalData:
    """The data :func:`write_retrieval_data` left in ``folder``: O(U + I) read, the rest mapped."""
    meta = pickle.loads((folder / META_FILE).read_bytes())
    return RetrievalData(folder=folder, **meta)


def prepare_retrieval_data(
    split: Split,
    users: pl.DataFrame,
    items: pl.DataFrame,
    n_users: int,
    n_items: int,
    config: RetrievalConfig,
    sketches: SketchConfig,
    folder: Path | None = None,
) -> RetrievalData:
    """:func:`write_retrieval_data` then :func:`open_retrieval_data`, for a split in memory.

    ``folder`` defaults to a new temporary folder, which the caller removes
    (``shutil.rmtree(data.folder)``) when done; the pipeline step writes into
    a scratch folder it removes itself.
    """
    target = folder or Path(tempfile.mkdtemp(prefix="rayrec-retrieval-"))
    try:
        write_retrieval_data(split, users, items, n_users, n_items, config, sketches, target)
    except BaseException:
        if folder is None:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return open_retrieval_data(target)


def _write_pairs(train: pl.DataFrame, folder: Path, seed: int) -> None:
    """``train``'s (user, item) pairs as Parquet files of ``PAIRS_PER_FILE`` rows, seeded order.

    The order is a permutation of ``train``'s rows (sorted by user, ts, item)
    drawn from ``seed``, so a seed gives the same files, and a CPU run the
    same model, on any machine.
    """
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(train.height)
    pairs = train.select(
        pl.col("user_id").cast(pl.Int64).alias("user"),
        pl.col("item_id").cast(pl.Int64).alias("item"),
    )[order]
    for number, start in enumerate(range(0, max(pairs.height, 1), PAIRS_PER_FILE)):
        pairs.slice(start, PAIRS_PER_FILE).write_parquet(folder / f"part-{number:05d}.parquet")


def recent_history(train: pl.DataFrame, n_users: int, length: int) -> np.ndarray:
    """(U, L) int64: each user's last ``length`` items by time as embedding rows, 0-padded."""
    recent = (
        train.sort("user_id", "ts", "item_id")
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").tail(length))
    )
    history = np.full((n_users, length), PAD, dtype=np.int64)
    for user, row in zip(recent["user_id"].to_list(), recent["item_id"].to_list(), strict=True):
        history[user, : len(row)] = np.asarray(row, dtype=np.int64) + 1
    return history


def item_probability(train: pl.DataFrame, n_items: int, sketches: SketchConfig) -> np.ndarray:
    """(I,) the Count-Min estimate of each item's share of the training interactions.

    Count-Min never underestimates, so an item's share is at most ε above its
    true share; every item gets at least one count's share (no log of zero).
    """
    cms = cms_from_events(train.select("item_id"), sketches)
    total = max(cms_total_weight(cms), 1.0)
    counts = np.maximum(cms_estimates(cms, np.arange(n_items, dtype=np.int64)), 1.0)
    return counts / total


def movielens_random_split(folder: Path, seed: int = 0) -> tuple[Split, pl.DataFrame, pl.DataFrame]:
    """RecBole's protocol on a MovieLens folder: every rating implicit, per-user random 8:1:1.

    Returns the split and the users and items tables (ids already dense).
    """
    tables = read_movielens(folder)
    events = tables.events.select(
        "user_id", "item_id", pl.from_epoch(pl.col("ts").cast(pl.Int64), "s").alias("ts")
    )
    return random_split(events, (0.8, 0.1, 0.1), seed), tables.users, tables.items
