"""Raw ids -> contiguous int64 codes, and the ``id_map`` table that keeps them.

Every interaction source (MovieLens, generic files, RecBole) encodes ids the
same way, so a dataset's codes do not depend on which reader produced it:

- the *known* ids of an entity (the rows of ``u.user`` / ``movies.csv`` / ...,
  or the ids seen in the events when a source has no entity file) get codes
  ``0..n-1`` in raw-id order: numeric order when every raw id is an integer
  (``"2" < "10"``), string order otherwise;
- an event whose raw id is present but not known gets :data:`UNKNOWN_ID`
  (``-1``). It is *not* dropped: validation quarantines it twice over, as
  ``below 0`` and, with ``known_ids``, as ``id out of range (unknown entity)``,
  and the quarantine's ``_source_row`` is the event's row in the source file,
  which leads back to the raw id. ``-1`` rather than a fresh code ``>= n``
  because a fresh code would look like a real row of an embedding table;
- an empty raw id stays null (``null in a required column``).
"""

from __future__ import annotations

from typing import Literal, TypeVar

import polars as pl

UNKNOWN_ID = -1
EntityName = Literal["user", "item"]
# A table in memory or a scan (a rating file too big to read at once).
Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)


def normalise_raw_ids(raw: pl.Expr) -> pl.Expr:
    """Raw ids as stripped strings; empty strings become null."""
    text = raw.cast(pl.String).str.strip_chars()
    return pl.when(text == "").then(None).otherwise(text)


def build_id_map(raw_ids: pl.Series, entity: EntityName) -> pl.DataFrame:
    """``entity, raw_id, id`` for the distinct non-null ``raw_ids``, ids ``0..n-1``."""
    distinct = (
        pl.DataFrame({"raw_id": raw_ids})
        .select(normalise_raw_ids(pl.col("raw_id")).alias("raw_id"))
        .drop_nulls()
        .unique()
    )
    as_int = distinct.get_column("raw_id").cast(pl.Int64, strict=False)
    # Integer raw ids sort numerically, so MovieLens user "1" is code 0, "2" code 1, "10" code 9.
    if as_int.null_count() == 0:
        distinct = distinct.with_columns(as_int.alias("__key")).sort("__key").drop("__key")
    else:
        distinct = distinct.sort("raw_id")
    return distinct.select(
        pl.lit(entity).alias("entity"),
        pl.col("raw_id"),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("id"),
    )


def encode_column(frame: Frame, column: str, id_map: pl.DataFrame) -> Frame:
    """Replace raw ids in ``column`` by their codes; unknown -> ``UNKNOWN_ID``, empty -> null.

    ``frame`` may be a LazyFrame: the lookup is a join, so a scan is encoded as it streams.
    """
    lookup = id_map.select(pl.col("raw_id").alias("__raw"), pl.col("id").alias("__code"))
    keyed = frame.with_columns(normalise_raw_ids(pl.col(column)).alias("__raw"))
    # A left join keeps the frame's row order (and so each row's place in its file).
    joined = keyed.join(  # the lookup as lazy as the frame
        lookup.lazy() if isinstance(keyed, pl.LazyFrame) else lookup,
        on="__raw",
        how="left",
        maintain_order="left",
    )
    code = (
        pl.when(pl.col("__raw").is_null())
        .then(None)
        .otherwise(pl.col("__code").fill_null(UNKNOWN_ID))
        .cast(pl.Int64)
    )
    return joined.with_columns(code.alias(column)).drop("__raw", "__code")


def entity_table(id_map: pl.DataFrame, id_column: str) -> pl.DataFrame:
    """A users/items table with only the id column, from an entity's id map."""
    return id_map.select(pl.col("id").alias(id_column))
