"""Reranker inputs from a feature spec: an example table (or candidate rows) -> tensors.

The feature spec (:mod:`features.feature_spec`) is the one contract between
the features, the model and serving: this module reads it and nothing else
to turn a table into tensors, so a point-in-time training frame (the
simulator, MovieLens), a generic CTR table (Criteo, Avazu) and the candidates
of a live request take the same path, with no id columns required. It lives
in ``serving`` because the request path needs it and may not import
``pipelines``; training (:mod:`pipelines.ranker.spec_data`) imports it from
here, so there is one encoder.

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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from features.feature_spec import Feature, FeatureKind, FeatureSpec, Normalization
from models.moe import PAD, FeatureBatch, FeatureLayout, SequenceColumn

# A sequence is pooled over the embeddings of the column of its entity.
SEQUENCE_OWNER = {"user_history": "item_id"}
# Each candidate's first-stage score (the index's inner product of user and item
# vectors): a numeric reranker feature when the spec lists it
# (``models.ranker.retrieval_score``), which training rows carry as the same number.
RETRIEVAL_SCORE = "retrieval_score"
# The slot every candidate is scored at: the slot is unknown before ranking, so
# the ``position`` context feature is held at the top slot (the usual "position
# as a training feature, a constant at serving"; see pipelines.ranker.two_stage).
SCORING_POSITION = 0


class SpecError(ValueError):
    """The example table does not match its feature spec (names the column)."""


@dataclass(frozen=True)
class RankerPart:
    """Encoded rows (a data split in training, a request's candidates at serving) as tensors:
    categorical (N, C) int64, numeric (N, Nn) float32,
    sequences one (N, L_s) int64 each, labels (N,) float32, users (N,) int64 or None,
    targets of the second tasks by name (N,) float32 each, NaN where a row has none.
    """

    categorical: torch.Tensor
    numeric: torch.Tensor
    sequences: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    users: torch.Tensor | None = None
    targets: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor | slice) -> FeatureBatch:
        """The rows ``index`` as a :class:`FeatureBatch` (empty groups are None)."""
        return FeatureBatch(
            categorical=self.categorical[index] if self.categorical.shape[1] else None,
            numeric=self.numeric[index] if self.numeric.shape[1] else None,
            sequences=tuple(s[index] for s in self.sequences),
        )

    def sample(self, rows: int, seed: int) -> RankerPart:
        """At most ``rows`` rows drawn without replacement (seeded), in their original order."""
        if rows >= len(self):
            return self
        generator = torch.Generator().manual_seed(seed)
        return self.rows(torch.randperm(len(self), generator=generator)[:rows].sort().values)

    def rows(self, index: torch.Tensor | slice) -> RankerPart:
        """The rows ``index`` (every tensor alike), in the order given."""
        return RankerPart(
            categorical=self.categorical[index],
            numeric=self.numeric[index],
            sequences=tuple(s[index] for s in self.sequences),
            labels=self.labels[index],
            users=None if self.users is None else self.users[index],
            targets={name: target[index] for name, target in self.targets.items()},
        )


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


def _rows(feature: Feature) -> int:
    """Embedding rows of a categorical: vocabulary + unknown, or buckets + unknown."""
    if feature.vocabulary is not None:
        return len(feature.vocabulary) + 1
    return int(feature.hash_buckets or 0) + 1


def _column(frame: pl.DataFrame, name: str) -> pl.Series:
    if name not in frame.columns:
        raise SpecError(f"column {name!r} of the feature spec is not in the example table")
    return frame.get_column(name)


def categorical_codes(values: pl.Series, feature: Feature, encoded: bool) -> np.ndarray:
    """(N,) int64 rows of the embedding table of a column; 0 = unknown (module doc)."""
    if feature.hash_buckets is not None:
        if not values.dtype.is_integer():
            raise SpecError(
                f"hashed id column {feature.name!r} must hold integers, got {values.dtype}"
            )
        ids = values.cast(pl.Int64).to_numpy(allow_copy=True)
        return hashed_codes(ids, ~values.is_null().to_numpy(), feature.hash_buckets)
    if encoded:
        if not values.dtype.is_integer():
            raise SpecError(
                f"encoded column {feature.name!r} must hold integer codes, got {values.dtype}"
            )
        codes = values.fill_null(PAD).cast(pl.Int64).to_numpy().astype(np.int64)
        return bounded_codes(codes, _rows(feature))
    rows = vocabulary_rows(feature)
    return (
        values.cast(pl.String)
        .replace_strict(list(rows), list(rows.values()), default=PAD, return_dtype=pl.Int64)
        .fill_null(PAD)
        .to_numpy()
        .astype(np.int64)
    )


def hashed_codes(ids: np.ndarray, present: np.ndarray, buckets: int) -> np.ndarray:
    """(N,) int64 rows of hashed ids: ``id mod buckets + 1`` where ``present``, else 0."""
    codes = np.zeros(len(ids), dtype=np.int64)
    codes[present] = np.mod(ids[present], buckets) + 1
    return codes


def bounded_codes(codes: np.ndarray, rows: int) -> np.ndarray:
    """(N,) int64 codes of an ``encoded`` table, anything outside ``[0, rows)`` -> 0 (in place)."""
    codes[(codes < 0) | (codes >= rows)] = PAD
    return codes


def vocabulary_rows(feature: Feature) -> dict[str, int]:
    """A vocabulary's value (as a string) -> its row, index + 1 (0 is out of vocabulary)."""
    vocabulary = feature.vocabulary or ()
    rows = {value: row for row, value in enumerate(vocabulary, start=1)}
    if len(rows) != len(vocabulary):
        raise SpecError(f"the vocabulary of {feature.name!r} repeats a value")
    return rows


def normalize(x: np.ndarray, feature: Feature) -> np.ndarray:
    """(N,) float32: float64 values after the spec's normalisation; null (NaN) or inf -> 0."""
    match feature.normalization:
        case Normalization.STANDARD:
            x = (x - float(feature.mean or 0.0)) / float(feature.std or 1.0)
        case Normalization.LOG1P:
            x = np.sign(x) * np.log1p(np.abs(x))
        case Normalization.MINMAX:
            low, high = feature.min_value, feature.max_value
            if low is not None and high is not None and high > low:
                x = (x - low) / (high - low)
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def numeric_values(values: pl.Series, feature: Feature) -> np.ndarray:
    """(N, width) float32 of a column after the spec's normalisation; missing -> 0."""
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
    return normalize(x, feature)[:, None]


def tail_matrix(
    values: pl.Series, length: int, code: Callable[[pl.Series], np.ndarray]
) -> np.ndarray:
    """(N, length) int64: each list's last ``length`` values (most recent last), nulls
    dropped, turned into rows by ``code`` (a flat Series -> int64 array), left-aligned,
    :data:`PAD` after them; a null list is all PAD."""
    out = np.full((len(values), length), PAD, dtype=np.int64)
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
        out[rows, pos] = code(exploded.get_column("v"))
    return out


def _sequence_codes(
    values: pl.Series, feature: Feature, owner: Feature, encoded: bool
) -> np.ndarray:
    """(N, max_length) int64 codes of the owner column, most recent kept, left-aligned."""
    return tail_matrix(
        values,
        int(feature.max_length or 1),
        lambda flat: categorical_codes(flat, owner, encoded),
    )


def target_tensor(values: pl.Series) -> torch.Tensor:
    """(N,) float32 of a second-task target column, NaN where a row has none."""
    if not (values.dtype.is_numeric() or values.dtype == pl.Null):
        raise SpecError(f"target column {values.name!r} must be numeric, got {values.dtype}")
    return torch.from_numpy(
        values.cast(pl.Float32).fill_null(float("nan")).to_numpy().astype(np.float32)
    )


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
        categorical[:, j] = categorical_codes(_column(frame, feature.name), feature, spec.encoded)
    numeric_parts = [numeric_values(_column(frame, f.name), f) for f in columns.numeric]
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
    targets = (
        {name: target_tensor(_column(frame, name)) for name in columns.targets} if labelled else {}
    )
    return RankerPart(
        categorical=torch.from_numpy(categorical),
        numeric=torch.from_numpy(np.ascontiguousarray(numeric, dtype=np.float32)),
        sequences=sequences,
        labels=torch.from_numpy(label_values.copy()),
        users=users,
        targets=targets,
    )
