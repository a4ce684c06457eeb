"""Reranker inputs from a feature spec: any example table the ``features`` step publishes.

The feature spec (:mod:`features.feature_spec`) is the one contract between
the features, the model and serving: this module reads it and nothing else
to turn an example table into tensors, so a point-in-time training frame
(the simulator, MovieLens) and a generic CTR table (Criteo, Avazu) take the
same path, with no id columns required.

Per feature kind (the model's columns keep the spec's order within each group):

- categorical with a vocabulary: value -> its index + 1, compared as strings
  (the spec stores vocabularies as strings); null or out of vocabulary -> 0.
  When the spec says the table is already ``encoded`` (CTR tables), the column
  holds those codes and is only bounds-checked (anything outside -> 0).
- categorical with ``hash_buckets`` (the dense int64 ids): ``id mod buckets
  + 1``; row 0 stays "unknown". Ids are dense codes ``0..n-1`` after ingest,
  so known ids never collide (a mixing hash into ``n`` buckets would collide
  ~37% of them); ids past the training range wrap around.
- sequence (``user_history``): ids of the column of the same entity
  (``item_id``), coded as that column and pooled over its embeddings
  (``SequenceColumn.shared_with``), left-aligned, most recent last,
  truncated to ``max_length`` most recent; 0 = padding.
- numeric: the spec's normalisation — ``standard`` ``(x - mean) / std``,
  ``log1p`` ``sign(x) log1p(|x|)``, ``minmax`` to [0, 1], ``none`` as is;
  null or NaN -> 0 afterwards (the mean, for standardised columns).
- embedding: ``dim`` numeric columns.

Splits: ``temporal`` cuts the rows sorted by ``ts`` at the cumulative ratios
(the last share is the test: the honest protocol for a click log; ties in
``ts`` stay together on one side); ``random`` is a seeded permutation (tables
without time, e.g. the CTR samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import torch

from features.feature_spec import Feature, FeatureKind, FeatureSpec, Normalization
from models.moe import PAD, FeatureLayout, SequenceColumn
from pipelines.ranker.data import ColumnSpec, RankerData, RankerPart

SplitKind = Literal["temporal", "random"]
# A sequence is pooled over the embeddings of the column of its entity.
SEQUENCE_OWNER = {"user_history": "item_id"}


class SpecError(ValueError):
    """The example table does not match its feature spec (names the column)."""


@dataclass(frozen=True)
class SpecColumns:
    """Which spec features feed which group of :class:`FeatureBatch`, in order."""

    categorical: tuple[Feature, ...]
    numeric: tuple[Feature, ...]
    sequences: tuple[Feature, ...]
    label: str
    user: str | None
    # Second-task targets (the spec's labels after the click) present in the table.
    targets: tuple[str, ...] = ()

    @classmethod
    def of(cls, spec: FeatureSpec, columns: Sequence[str] | None = None) -> SpecColumns:
        categorical = tuple(spec.of_kind(FeatureKind.CATEGORICAL))
        numeric = tuple(
            f for f in spec.features if f.kind in (FeatureKind.NUMERIC, FeatureKind.EMBEDDING)
        )
        sequences = tuple(spec.of_kind(FeatureKind.SEQUENCE))
        names = [f.name for f in categorical]
        for sequence in sequences:
            owner = SEQUENCE_OWNER.get(sequence.name)
            if owner not in names:
                raise SpecError(
                    f"sequence feature {sequence.name!r} needs its id column "
                    f"{owner or '(unknown owner)'!r} among the categorical features"
                )
        user = "user_id" if columns is None or "user_id" in columns else None
        targets = tuple(t for t in spec.labels[1:] if columns is None or t in columns)
        return cls(categorical, numeric, sequences, spec.labels[0], user, targets)

    def layout(self) -> FeatureLayout:
        names = [f.name for f in self.categorical]
        return FeatureLayout(
            categorical=tuple(max(2, _rows(f)) for f in self.categorical),
            numeric=sum(f.dim or 1 if f.kind == FeatureKind.EMBEDDING else 1 for f in self.numeric),
            sequences=tuple(
                SequenceColumn(shared_with=names.index(SEQUENCE_OWNER[f.name]))
                for f in self.sequences
            ),
        )

    def column_spec(self) -> ColumnSpec:
        return ColumnSpec(
            categorical=tuple(f.name for f in self.categorical),
            numeric=tuple(f.name for f in self.numeric),
            sequences=tuple(f.name for f in self.sequences),
            label=self.label,
            user=self.user,
        )


def _rows(feature: Feature) -> int:
    """Embedding rows of a categorical: vocabulary + unknown, or buckets + unknown."""
    if feature.vocabulary is not None:
        return len(feature.vocabulary) + 1
    return int(feature.hash_buckets or 0) + 1


def _column(frame: pl.DataFrame, name: str) -> pl.Series:
    if name not in frame.columns:
        raise SpecError(f"column {name!r} of the feature spec is not in the example table")
    return frame.get_column(name)


def _categorical_codes(values: pl.Series, feature: Feature, encoded: bool) -> np.ndarray:
    """(N,) int64 rows of the embedding table; 0 = unknown."""
    rows = _rows(feature)
    if feature.hash_buckets is not None:
        if not values.dtype.is_integer():
            raise SpecError(
                f"hashed id column {feature.name!r} must hold integers, got {values.dtype}"
            )
        ids = values.cast(pl.Int64).to_numpy(allow_copy=True)
        codes = np.zeros(len(values), dtype=np.int64)
        present = ~values.is_null().to_numpy()
        codes[present] = np.mod(ids[present], feature.hash_buckets) + 1
        return codes
    if encoded:
        if not values.dtype.is_integer():
            raise SpecError(
                f"encoded column {feature.name!r} must hold integer codes, got {values.dtype}"
            )
        codes = values.fill_null(PAD).cast(pl.Int64).to_numpy().astype(np.int64)
        codes[(codes < 0) | (codes >= rows)] = PAD
        return codes
    vocabulary = list(feature.vocabulary or ())
    return (
        values.cast(pl.String)
        .replace_strict(
            vocabulary, range(1, len(vocabulary) + 1), default=PAD, return_dtype=pl.Int64
        )
        .fill_null(PAD)
        .to_numpy()
        .astype(np.int64)
    )


def _numeric_values(values: pl.Series, feature: Feature) -> np.ndarray:
    """(N, width) float32 after the spec's normalisation; missing -> 0."""
    if feature.kind == FeatureKind.EMBEDDING:
        width = int(feature.dim or 1)
        matrix = np.zeros((len(values), width), dtype=np.float64)
        filled = values.fill_null([0.0] * width)
        lengths = filled.list.len().to_numpy()
        if (lengths != width).any():
            raise SpecError(
                f"embedding column {feature.name!r} must hold vectors of {width} values"
            )
        matrix[:] = np.stack(filled.to_list()) if len(values) else matrix
        return np.nan_to_num(matrix).astype(np.float32)
    if not (values.dtype.is_numeric() or values.dtype == pl.Boolean):
        raise SpecError(f"numeric column {feature.name!r} holds {values.dtype}")
    x = values.cast(pl.Float64).to_numpy(allow_copy=True).astype(np.float64)
    match feature.normalization:
        case Normalization.STANDARD:
            x = (x - float(feature.mean or 0.0)) / float(feature.std or 1.0)
        case Normalization.LOG1P:
            x = np.sign(x) * np.log1p(np.abs(x))
        case Normalization.MINMAX:
            low, high = feature.min_value, feature.max_value
            if low is not None and high is not None and high > low:
                x = (x - low) / (high - low)
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)[:, None]


def _sequence_codes(
    values: pl.Series, feature: Feature, owner: Feature, encoded: bool
) -> np.ndarray:
    """(N, max_length) int64 codes of the owner column, most recent kept, left-aligned."""
    length = int(feature.max_length or 1)
    out = np.zeros((len(values), length), dtype=np.int64)
    exploded = (
        pl.DataFrame({"v": values.list.tail(length)})
        .with_row_index("row")
        .explode("v")
        .filter(pl.col("v").is_not_null())
        .with_columns(pl.int_range(pl.len()).over("row").alias("pos"))
    )
    if exploded.height:
        rows = exploded.get_column("row").to_numpy().astype(np.int64)
        pos = exploded.get_column("pos").to_numpy().astype(np.int64)
        out[rows, pos] = _categorical_codes(exploded.get_column("v"), owner, encoded)
    return out


def encode_examples(
    frame: pl.DataFrame,
    spec: FeatureSpec,
    columns: SpecColumns | None = None,
    labelled: bool = True,
) -> RankerPart:
    """An example table -> a :class:`RankerPart` (see the module doc for the per-kind rules).

    ``labelled=False`` scores rows without a label (serving): labels are zeros
    and there are no second-task targets. A target (``columns.targets``) is
    float32 with NaN where the row has none (a rating exists only for some
    clicks).
    """
    columns = columns or SpecColumns.of(spec, frame.columns)
    n = frame.height
    owners = {f.name: f for f in columns.categorical}
    categorical = np.zeros((n, len(columns.categorical)), dtype=np.int64)
    for j, feature in enumerate(columns.categorical):
        categorical[:, j] = _categorical_codes(_column(frame, feature.name), feature, spec.encoded)
    numeric_parts = [_numeric_values(_column(frame, f.name), f) for f in columns.numeric]
    numeric = (
        np.concatenate(numeric_parts, axis=1) if numeric_parts else np.zeros((n, 0), np.float32)
    )
    sequences = tuple(
        torch.from_numpy(
            _sequence_codes(_column(frame, f.name), f, owners[SEQUENCE_OWNER[f.name]], spec.encoded)
        )
        for f in columns.sequences
    )
    if not labelled:
        labels = pl.Series(columns.label, np.zeros(n, dtype=np.float32))
    else:
        labels = _column(frame, columns.label)
    if labels.null_count():
        raise SpecError(f"label column {columns.label!r} has {labels.null_count()} nulls")
    label_values = labels.cast(pl.Float32).to_numpy(allow_copy=True).astype(np.float32)
    bad = ~np.isin(label_values, (0.0, 1.0))
    if bad.any():
        raise SpecError(
            f"label column {columns.label!r} must be 0/1, got e.g. {label_values[bad][:3].tolist()}"
        )
    users = None
    if columns.user is not None:
        users = torch.from_numpy(
            _column(frame, columns.user).fill_null(-1).cast(pl.Int64).to_numpy().copy()
        )
    targets = {}
    if labelled:
        for name in columns.targets:
            values = _column(frame, name)
            if not (values.dtype.is_numeric() or values.dtype == pl.Null):
                raise SpecError(f"target column {name!r} must be numeric, got {values.dtype}")
            targets[name] = torch.from_numpy(
                values.cast(pl.Float32).fill_null(float("nan")).to_numpy().astype(np.float32)
            )
    return RankerPart(
        categorical=torch.from_numpy(categorical),
        numeric=torch.from_numpy(np.ascontiguousarray(numeric, dtype=np.float32)),
        sequences=sequences,
        labels=torch.from_numpy(label_values.copy()),
        users=users,
        targets=targets,
    )


def split_examples(
    frame: pl.DataFrame,
    kind: SplitKind,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Train/valid/test rows: by time (``ts``) or a seeded permutation (see module doc)."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-9:
        raise ValueError(f"ratios must be 3 non-negative numbers summing to 1, got {ratios}")
    n = frame.height
    if kind == "random":
        order = np.random.default_rng(seed).permutation(n)
        first = round(ratios[0] * n)
        second = first + round(ratios[1] * n)
        return tuple(frame[np.sort(part)] for part in np.split(order, [first, second]))  # type: ignore[return-value]
    if "ts" not in frame.columns:
        raise SpecError("a temporal split needs a 'ts' column; use split 'random' for this table")
    ordered = frame.sort("ts", maintain_order=True)
    ts = ordered.get_column("ts")
    # Cut at the timestamp of the quantile row: every row of one instant stays on one side.
    # A cut at or past the end leaves the later parts empty (a ratio of 0 means none).
    first = round(ratios[0] * n)
    second = round((ratios[0] + ratios[1]) * n)
    never = pl.lit(False)
    after_valid = pl.col("ts") >= ts[first] if first < n else never
    after_test = pl.col("ts") >= ts[second] if second < n else never
    train = ordered.filter(~after_valid)
    valid = ordered.filter(after_valid & ~after_test)
    test = ordered.filter(after_test)
    return train, valid, test


def ranker_data_from_examples(
    frame: pl.DataFrame,
    spec: FeatureSpec,
    split: SplitKind = "temporal",
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> RankerData:
    """Split an example table and encode each part by ``spec`` (statistics are the spec's own)."""
    parts = split_examples(frame, split, ratios, seed)
    for name, part in zip(("train", "valid", "test"), parts, strict=True):
        if part.height == 0:
            raise SpecError(f"the {split} split left the {name} part empty ({frame.height} rows)")
    return ranker_data_from_parts(*parts, spec=spec)


def ranker_data_from_parts(
    train: pl.DataFrame, valid: pl.DataFrame, test: pl.DataFrame, spec: FeatureSpec
) -> RankerData:
    """Encode given train/valid/test tables (e.g. a dataset's own files) by ``spec``."""
    columns = SpecColumns.of(spec, train.columns)
    encoded = [encode_examples(part, spec, columns) for part in (train, valid, test)]
    return RankerData(
        layout=columns.layout(),
        spec=columns.column_spec(),
        train=encoded[0],
        valid=encoded[1],
        test=encoded[2],
        vocabularies={f.name: list(f.vocabulary or ()) for f in columns.categorical},
        numeric_stats={
            f.name: (float(f.mean or 0.0), float(f.std or 1.0)) for f in columns.numeric
        },
    )
