"""Canonical table contracts: ``events``, ``users``, ``items``.

Every source maps onto these. Ids are int64 after encoding (raw ids live in a
mapping table, see :data:`ID_MAP`); ``ts`` is UTC with microseconds. A contract
is data, not code, so validation, docs and later drift checks read one truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import polars as pl

from features.feature_spec import FeatureKind, FeatureSpec
from infra.errors import DataValidationError

TS_DTYPE = pl.Datetime("us", "UTC")


class EventType(StrEnum):
    IMPRESSION = "impression"
    CLICK = "click"
    RATING = "rating"
    PURCHASE = "purchase"
    VIEW = "view"


@dataclass(frozen=True)
class ColumnContract:
    """One column: its type, nullability and the values it may take."""

    name: str
    dtype: pl.DataType
    nullable: bool = False
    min_value: float | None = None
    max_value: float | None = None
    allowed: tuple[str, ...] | None = None
    # Entity keys: a repeated id is quarantined (every copy, since none is "the" row).
    unique: bool = False
    description: str = ""


@dataclass(frozen=True)
class TableContract:
    """A table's columns; extra columns are kept (typed attributes) unless listed."""

    name: str
    columns: tuple[ColumnContract, ...]
    # Columns that hold entity ids and must exist in the entity tables.
    id_columns: tuple[str, ...] = ()
    # Attribute columns beyond the contract are allowed (users/items carry any).
    allow_extra: bool = True

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def polars_schema(self) -> pl.Schema:
        return pl.Schema({c.name: c.dtype for c in self.columns})

    def column(self, name: str) -> ColumnContract:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"{self.name} has no column {name!r}")


EVENTS = TableContract(
    name="events",
    columns=(
        ColumnContract("user_id", pl.Int64(), min_value=0, description="encoded user id"),
        ColumnContract("item_id", pl.Int64(), min_value=0, description="encoded item id"),
        ColumnContract("ts", TS_DTYPE, description="event time, UTC, microseconds"),
        ColumnContract(
            "event_type",
            pl.String(),
            allowed=tuple(e.value for e in EventType),
            description="impression | click | rating | purchase | view",
        ),
        ColumnContract(
            "label",
            pl.Float64(),
            description="impression: 1.0 clicked / 0.0 not; rating: 1.0 if positive",
        ),
        ColumnContract(
            "position",
            pl.Int32(),
            nullable=True,
            min_value=0,
            description="0-based slot in the slate",
        ),
        ColumnContract(
            "request_id", pl.Int64(), nullable=True, min_value=0, description="one slate shown"
        ),
        ColumnContract(
            "propensity",
            pl.Float64(),
            nullable=True,
            min_value=0.0,
            max_value=1.0,
            description="logging policy probability of showing this item (see simulator)",
        ),
        ColumnContract(
            "value", pl.Float64(), nullable=True, description="rating value, dwell time, price"
        ),
    ),
    id_columns=("user_id", "item_id"),
    allow_extra=False,
)

USERS = TableContract(
    name="users",
    columns=(ColumnContract("user_id", pl.Int64(), min_value=0, unique=True),),
    id_columns=("user_id",),
)

ITEMS = TableContract(
    name="items",
    columns=(ColumnContract("item_id", pl.Int64(), min_value=0, unique=True),),
    id_columns=("item_id",),
)

# What serving answered, one row per shown item (serving.prediction_log writes it,
# monitoring reads it; joined with events on request_id and item_id).
PREDICTIONS = TableContract(
    name="predictions",
    columns=(
        ColumnContract("request_id", pl.Int64(), min_value=0, description="the answer's id"),
        ColumnContract("ts", TS_DTYPE, description="when it was answered, UTC"),
        ColumnContract("user_id", pl.Int64(), min_value=0),
        ColumnContract("item_id", pl.Int64(), min_value=0),
        ColumnContract("position", pl.Int32(), min_value=0, description="0-based slot"),
        ColumnContract(
            "score",
            pl.Float64(),
            description="calibrated click probability (reranked), retrieval score, or popularity",
        ),
        ColumnContract("retrieval_score", pl.Float64(), nullable=True),
        ColumnContract("propensity", pl.Float64(), min_value=0.0, max_value=1.0),
        ColumnContract("fallback", pl.Boolean(), description="popularity answer"),
        ColumnContract("reranked", pl.Boolean(), description="ordered by the reranker"),
        ColumnContract("generation", pl.Int64(), nullable=True, description="model push"),
        ColumnContract("reranker_version", pl.String(), nullable=True),
        ColumnContract("two_tower_version", pl.String(), nullable=True),
    ),
    allow_extra=False,
)

# raw id (as a string, whatever its original type) <-> encoded int64 id, per entity.
ID_MAP = TableContract(
    name="id_map",
    columns=(
        ColumnContract("entity", pl.String(), allowed=("user", "item")),
        ColumnContract("raw_id", pl.String()),
        ColumnContract("id", pl.Int64(), min_value=0),
    ),
    allow_extra=False,
)


def contract_for_spec(spec: FeatureSpec, name: str = "examples") -> TableContract:
    """The contract of a generic labelled table (Criteo/Avazu) described by ``spec``.

    The first label (the click) is 0/1; further labels (second-task targets
    such as a rating) are floats, null where the row has none; categorical
    codes lie in ``[0, cardinality)``; numerics are floats and may be null
    (models fill them by the spec's rule).
    """
    click, *others = spec.labels
    columns = [ColumnContract(click, pl.Float64(), min_value=0.0, max_value=1.0)]
    columns += [ColumnContract(label, pl.Float64(), nullable=True) for label in others]
    for feature in spec.features:
        if feature.kind == FeatureKind.CATEGORICAL:
            columns.append(
                ColumnContract(
                    feature.name, pl.Int64(), min_value=0, max_value=feature.cardinality - 1
                )
            )
        elif feature.kind == FeatureKind.NUMERIC:
            columns.append(ColumnContract(feature.name, pl.Float64(), nullable=True))
    return TableContract(name=name, columns=tuple(columns))


def check_schema(schema: pl.Schema, contract: TableContract, where: str) -> None:
    """Raise naming the first column that is missing or of the wrong type.

    For already-validated tables read back from storage: a mismatch means the
    data was written by something else (or an older version), so stop before
    anything is computed or published.
    """
    for column in contract.columns:
        if column.name not in schema:
            if column.nullable:
                continue
            raise DataValidationError(
                f"{where}: column {column.name!r} is missing (expected {column.dtype}); found {list(schema)}"
            )
        if schema[column.name] != column.dtype:
            raise DataValidationError(
                f"{where}: column {column.name!r} has type {schema[column.name]}, expected {column.dtype}"
            )
