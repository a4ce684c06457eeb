"""Reranker training data: an interaction table (+ attributes) turned into tensors.

Generic over a :class:`ColumnSpec` (which columns are categorical, numeric,
list-valued, the label, the user column for GAUC), so CTR tables without ids
(Criteo, Avazu) can reuse :func:`encode_splits`; :func:`movielens_ctr_data`
is the ML-100K preset.

Encoding, every statistic fitted on the training part only:

- categorical: the distinct training values (sorted) become rows ``1..V``;
  row 0 is "unknown": nulls and values never seen in training map to 0, so
  the model learns one embedding for the unseen (``FeatureLayout`` rows = V+1).
- numeric: ``(x - mean) / std`` with the training mean and std (std 0 -> 1);
  nulls become the training mean, i.e. 0 after standardising.
- list columns (genres): a pooled sequence with its own vocabulary (same rule
  as categorical, 0 = padding/unknown), padded to the longest training list
  (capped at ``max_sequence_length``) and mean-pooled by the model. Pooling
  instead of multi-hot keeps the input width independent of the vocabulary
  and is the same code path a watch history would take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from features.sources.movielens import read_movielens
from models.moe import PAD, FeatureLayout, SequenceColumn
from serving.encoding import RankerPart, target_tensor

# Fractions of the random split over interactions (train, valid, test): the
# published ML-100K CTR protocol (RecBole's RS 8:1:1).
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
# Lists longer than this are truncated (ML-100K films have at most 6 genres).
MAX_SEQUENCE_LENGTH = 32


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns of the (joined) interaction frame feed the reranker, by kind."""

    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    # List-valued columns (list[str] or list[int]), mean-pooled by the model.
    sequences: tuple[str, ...] = ()
    # 0/1 target of the click task.
    label: str = "label"
    # Grouping column for GAUC (raw values, not encoded); None = no GAUC.
    user: str | None = "user_id"
    max_sequence_length: int = MAX_SEQUENCE_LENGTH
    # Second-task targets (e.g. the 1-5 rating), never features: RankerPart.targets.
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [*self.categorical, *self.numeric, *self.sequences]
        if not names:
            raise ValueError("a ColumnSpec needs at least one feature column")
        if len(set(names)) != len(names):
            raise ValueError(f"feature columns must be distinct, got {names}")
        if self.label in names:
            raise ValueError(f"the label {self.label!r} cannot also be a feature")
        if set(self.targets) & {*names, self.label}:
            raise ValueError(f"targets {self.targets} cannot also be features or the label")
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")


@dataclass(frozen=True)
class RankerData:
    """Train/valid/test parts, the model's :class:`FeatureLayout` and the fitted encoders."""

    layout: FeatureLayout
    spec: ColumnSpec
    train: RankerPart
    valid: RankerPart
    test: RankerPart
    # Training vocabulary of every categorical and sequence column (row i+1 = value i).
    vocabularies: dict[str, list] = field(repr=False)
    # Training mean and std of every numeric column.
    numeric_stats: dict[str, tuple[float, float]] = field(repr=False)


def random_split_rows(
    frame: pl.DataFrame, seed: int, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Rows shuffled with ``seed`` and cut into train/valid/test by ``fractions`` (sum 1)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(frame.height)
    n_train = round(fractions[0] * frame.height)
    n_valid = round(fractions[1] * frame.height)
    cuts = (order[:n_train], order[n_train : n_train + n_valid], order[n_train + n_valid :])
    return tuple(frame[np.sort(rows)] for rows in cuts)  # type: ignore[return-value]


def _vocabulary(values: pl.Series) -> list:
    return values.drop_nulls().unique().sort().to_list()


def _encode(values: pl.Series, vocabulary: list) -> np.ndarray:
    """Values -> int64 rows (vocabulary index + 1); unseen and null -> 0 (PAD)."""
    if not vocabulary:
        return np.full(values.len(), PAD, dtype=np.int64)
    rows = list(range(1, len(vocabulary) + 1))
    encoded = values.replace_strict(vocabulary, rows, default=PAD, return_dtype=pl.Int64)
    return encoded.fill_null(PAD).to_numpy().astype(np.int64)


def _encode_lists(values: pl.Series, vocabulary: list, length: int) -> np.ndarray:
    """A list column -> (N, length) int64, left-aligned, 0 = padding / unknown."""
    out = np.zeros((values.len(), length), dtype=np.int64)
    exploded = (
        pl.DataFrame({"v": values})
        .with_row_index("row")
        .explode("v")
        .with_columns(pl.int_range(pl.len()).over("row").alias("pos"))
        .filter(pl.col("pos") < length)
    )
    rows = exploded.get_column("row").to_numpy().astype(np.int64)
    pos = exploded.get_column("pos").to_numpy().astype(np.int64)
    out[rows, pos] = _encode(exploded.get_column("v"), vocabulary)
    return out


def encode_splits(
    train: pl.DataFrame, valid: pl.DataFrame, test: pl.DataFrame, spec: ColumnSpec
) -> RankerData:
    """Encode three joined frames with encoders fitted on ``train`` only (see module doc)."""
    vocabularies: dict[str, list] = {}
    for name in (*spec.categorical, *spec.sequences):
        column = train.get_column(name)
        vocabularies[name] = _vocabulary(column.explode() if name in spec.sequences else column)
    stats: dict[str, tuple[float, float]] = {}
    for name in spec.numeric:
        column = train.get_column(name).cast(pl.Float64)
        mean = column.mean()
        std = column.std(ddof=0)
        mean = 0.0 if mean is None else float(mean)
        std = 1.0 if std is None or not np.isfinite(std) or std == 0 else float(std)
        stats[name] = (mean, std)
    lengths = {}
    for name in spec.sequences:
        longest = train.get_column(name).list.len().max()
        lengths[name] = max(1, min(spec.max_sequence_length, int(longest or 1)))

    def part(frame: pl.DataFrame) -> RankerPart:
        n = frame.height
        categorical = np.stack(
            [_encode(frame.get_column(c), vocabularies[c]) for c in spec.categorical], axis=1
        ) if spec.categorical else np.zeros((n, 0), dtype=np.int64)  # fmt: skip
        numeric = np.zeros((n, len(spec.numeric)), dtype=np.float32)
        for j, name in enumerate(spec.numeric):
            mean, std = stats[name]
            raw = frame.get_column(name).cast(pl.Float64).fill_null(mean).to_numpy()
            numeric[:, j] = (raw - mean) / std
        sequences = tuple(
            torch.from_numpy(_encode_lists(frame.get_column(s), vocabularies[s], lengths[s]))
            for s in spec.sequences
        )
        labels = frame.get_column(spec.label).cast(pl.Float32).to_numpy()
        users = None
        if spec.user is not None:
            users = torch.from_numpy(frame.get_column(spec.user).to_numpy().astype(np.int64))
        targets = {name: target_tensor(frame.get_column(name)) for name in spec.targets}
        return RankerPart(
            categorical=torch.from_numpy(categorical),
            numeric=torch.from_numpy(numeric),
            sequences=sequences,
            labels=torch.from_numpy(labels.copy()),
            users=users,
            targets=targets,
        )

    layout = FeatureLayout(
        categorical=tuple(len(vocabularies[c]) + 1 for c in spec.categorical),
        numeric=len(spec.numeric),
        sequences=tuple(SequenceColumn(rows=len(vocabularies[s]) + 1) for s in spec.sequences),
    )
    return RankerData(
        layout=layout,
        spec=spec,
        train=part(train),
        valid=part(valid),
        test=part(test),
        vocabularies=vocabularies,
        numeric_stats=stats,
    )


def prepare_ranker_data(
    interactions: pl.DataFrame,
    spec: ColumnSpec,
    seed: int,
    users: pl.DataFrame | None = None,
    items: pl.DataFrame | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> RankerData:
    """Join attributes (left, on ``user_id`` / ``item_id``), split at random, encode.

    Accepts polars frames (a pandas frame converts with ``pl.from_pandas``).
    Rows with a null label are dropped before the split.
    """
    frame = interactions
    if users is not None:
        frame = frame.join(users, on="user_id", how="left", maintain_order="left")
    if items is not None:
        frame = frame.join(items, on="item_id", how="left", maintain_order="left")
    frame = frame.filter(pl.col(spec.label).is_not_null())
    train, valid, test = random_split_rows(frame, seed, fractions)
    return encode_splits(train, valid, test, spec)


# ML-100K as in the published CTR run: user age/gender/occupation, item release
# year/genres, the timestamp, and the ids. Age and year go in twice (a numeric
# trend + a categorical for non-monotone effects); the timestamp as a
# standardised number plus hour-of-day and weekday categoricals.
MOVIELENS_SPEC = ColumnSpec(
    categorical=(
        "user_id", "item_id", "gender", "occupation", "age_cat", "year_cat", "hour", "weekday",
    ),
    numeric=("age", "year", "ts_seconds"),
    sequences=("genres",),
    label="label",
    user="user_id",
    # The 1-5 rating the label thresholds: the second task's target (MMoE), never an input.
    targets=("rating",),
)  # fmt: skip


def movielens_ctr_frames(folder: Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(interactions, users, items) of a MovieLens folder, label = rating >= 4, time features added."""
    tables = read_movielens(folder, positive_threshold=4.0)
    ts = pl.col("ts").cast(pl.Int64)
    when = pl.from_epoch(ts, "s")
    interactions = tables.events.select(
        "user_id",
        "item_id",
        "label",
        pl.col("value").cast(pl.Float64).alias("rating"),
        ts.cast(pl.Float64).alias("ts_seconds"),
        when.dt.hour().alias("hour"),
        when.dt.weekday().alias("weekday"),
    )
    users = tables.users.select(
        "user_id", "age", "gender", "occupation", pl.col("age").alias("age_cat")
    )
    items = tables.items.select("item_id", "year", pl.col("year").alias("year_cat"), "genres")
    return interactions, users, items


def movielens_ctr_data(folder: Path, seed: int) -> RankerData:
    """ML-100K (any MovieLens layout with users/items) as CTR data, random 8:1:1 by ``seed``."""
    interactions, users, items = movielens_ctr_frames(folder)
    return prepare_ranker_data(interactions, MOVIELENS_SPEC, seed, users=users, items=items)
