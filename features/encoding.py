"""Static entity attributes as model-ready arrays (the towers' attribute inputs).

:func:`encode_attributes` turns a ``users`` or ``items`` table into an
:class:`AttributeTable` whose row ``i`` is dense id ``i``:

- low-cardinality strings and integers -> a vocabulary code (0 = missing or
  out of vocabulary; at most ``max_vocabulary`` most frequent values),
- other numbers -> standardised floats (missing -> 0, the mean),
- lists of strings (genres, tags) -> multi-hot over the ``max_vocabulary``
  most frequent values,
- near-unique strings (titles, free text) are skipped: they identify rows
  rather than describe them.

The vocabularies and statistics are kept in :class:`AttributeEncoding` so the
same encoding applies to entities that arrive later (new items).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

# A string column with more distinct values than this share of rows is an identifier.
IDENTIFIER_SHARE = 0.5


@dataclass(frozen=True)
class AttributeTable:
    """Attributes of N entities: ``categorical`` (N, C) int64 codes (0 = missing),
    ``cardinalities[c]`` codes of column c (excluding 0), ``numeric`` (N, F)
    float32 standardised, ``multi_hot`` (N, M) float32."""

    categorical: np.ndarray
    cardinalities: tuple[int, ...]
    numeric: np.ndarray
    multi_hot: np.ndarray
    names: tuple[str, ...] = ()

    @classmethod
    def empty(cls, n: int) -> AttributeTable:
        return cls(
            np.zeros((n, 0), np.int64),
            (),
            np.zeros((n, 0), np.float32),
            np.zeros((n, 0), np.float32),
        )

    @property
    def rows(self) -> int:
        return int(self.categorical.shape[0])

    @property
    def width(self) -> int:
        """Number of attribute inputs (0: the entity has no attributes)."""
        return len(self.cardinalities) + self.numeric.shape[1] + self.multi_hot.shape[1]


@dataclass(frozen=True)
class AttributeEncoding:
    """How each attribute column is encoded (fitted on the training entities)."""

    key: str
    categorical: dict[str, tuple[str, ...]] = field(default_factory=dict)
    numeric: dict[str, tuple[float, float]] = field(default_factory=dict)  # mean, std
    multi_hot: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: saved beside a model, so new entities get the training codes."""
        return {
            "key": self.key,
            "categorical": {name: list(vocab) for name, vocab in self.categorical.items()},
            "numeric": {name: list(stats) for name, stats in self.numeric.items()},
            "multi_hot": {name: list(vocab) for name, vocab in self.multi_hot.items()},
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AttributeEncoding:
        """The encoding :meth:`to_dict` wrote (column order kept: it is the code order)."""
        return cls(
            key=str(raw["key"]),
            categorical={
                n: tuple(str(v) for v in vocab) for n, vocab in raw["categorical"].items()
            },
            numeric={n: (float(mean), float(std)) for n, (mean, std) in raw["numeric"].items()},
            multi_hot={n: tuple(str(v) for v in vocab) for n, vocab in raw["multi_hot"].items()},
        )

    def apply(self, table: pl.DataFrame, n: int | None = None) -> AttributeTable:
        """Encode ``table`` (``key`` + attributes); with ``n``, row i is id i (absent ids: missing)."""
        if self.key not in table.columns:
            raise ValueError(f"attribute table lacks its key column {self.key!r}")
        if n is not None:
            frame = pl.DataFrame({self.key: np.arange(n, dtype=np.int64)}).join(
                table, on=self.key, how="left"
            )
        else:
            frame = table
        categorical = [
            _codes(frame.get_column(name), vocab) for name, vocab in self.categorical.items()
        ]
        numeric = [
            frame.get_column(name).cast(pl.Float64).fill_null(mean).fill_nan(mean).to_numpy()
            for name, (mean, _) in self.numeric.items()
        ]
        numeric = [
            (values - mean) / std
            for values, (mean, std) in zip(numeric, self.numeric.values(), strict=True)
        ]
        hot = [_multi_hot(frame.get_column(name), vocab) for name, vocab in self.multi_hot.items()]
        rows = frame.height
        return AttributeTable(
            categorical=np.stack(categorical, axis=1).astype(np.int64)
            if categorical
            else np.zeros((rows, 0), np.int64),
            cardinalities=tuple(len(v) for v in self.categorical.values()),
            numeric=np.stack(numeric, axis=1).astype(np.float32)
            if numeric
            else np.zeros((rows, 0), np.float32),
            multi_hot=np.concatenate(hot, axis=1).astype(np.float32)
            if hot
            else np.zeros((rows, 0), np.float32),
            names=(*self.categorical, *self.numeric, *self.multi_hot),
        )


def fit_encoding(table: pl.DataFrame, key: str, max_vocabulary: int = 1000) -> AttributeEncoding:
    """Choose an encoding for every attribute column of ``table`` (see the module doc)."""
    if key not in table.columns:
        raise ValueError(f"attribute table lacks its key column {key!r}")
    categorical: dict[str, tuple[str, ...]] = {}
    numeric: dict[str, tuple[float, float]] = {}
    multi_hot: dict[str, tuple[str, ...]] = {}
    rows = max(1, table.height)
    for name, dtype in table.schema.items():
        if name == key:
            continue
        column = table.get_column(name)
        if isinstance(dtype, pl.List):
            values = column.explode().drop_nulls().cast(pl.String)
            if values.len():
                multi_hot[name] = _top_values(values, max_vocabulary)
        elif dtype == pl.String or dtype == pl.Categorical or dtype == pl.Boolean:
            distinct = column.drop_nulls().n_unique()
            if dtype == pl.String and distinct > IDENTIFIER_SHARE * rows:
                continue
            categorical[name] = _top_values(column.drop_nulls().cast(pl.String), max_vocabulary)
        elif dtype.is_integer() and column.n_unique() <= 32:
            categorical[name] = _top_values(column.drop_nulls().cast(pl.String), max_vocabulary)
        elif dtype.is_numeric():
            values = column.cast(pl.Float64).drop_nulls().drop_nans()
            mean = float(values.mean() or 0.0) if values.len() else 0.0
            std = float(values.std() or 0.0) if values.len() > 1 else 0.0
            numeric[name] = (mean, std if std > 0 else 1.0)
        # Dates and other types carry no attribute signal the towers use yet.
    return AttributeEncoding(key, categorical, numeric, multi_hot)


def encode_attributes(
    table: pl.DataFrame, key: str, n: int, max_vocabulary: int = 1000
) -> tuple[AttributeEncoding, AttributeTable]:
    """Fit an encoding on ``table`` and apply it to dense ids ``0..n-1``."""
    encoding = fit_encoding(table, key, max_vocabulary)
    return encoding, encoding.apply(table, n)


def _top_values(values: pl.Series, limit: int) -> tuple[str, ...]:
    """The ``limit`` most frequent values, ties by value, then sorted (stable codes)."""
    counts = values.value_counts(name="_n").sort(["_n", values.name], descending=[True, False])
    return tuple(sorted(counts.get_column(values.name).head(limit).to_list()))


def _codes(column: pl.Series, vocabulary: tuple[str, ...]) -> np.ndarray:
    mapping = pl.DataFrame(
        {"_v": list(vocabulary), "_code": np.arange(1, len(vocabulary) + 1, dtype=np.int64)}
    )
    frame = pl.DataFrame({"_v": column.cast(pl.String)}).join(
        mapping, on="_v", how="left", maintain_order="left"
    )
    return frame.get_column("_code").fill_null(0).to_numpy()


def _multi_hot(column: pl.Series, vocabulary: tuple[str, ...]) -> np.ndarray:
    index = {v: i for i, v in enumerate(vocabulary)}
    out = np.zeros((column.len(), len(vocabulary)), np.float32)
    rows = column.cast(pl.List(pl.String)).to_list()
    for r, values in enumerate(rows):
        for value in values or ():
            slot = index.get(value)
            if slot is not None:
                out[r, slot] = 1.0
    return out
