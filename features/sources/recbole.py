"""RecBole atomic files (``.inter``, ``.user``, ``.item``) -> canonical tables.

Layout: a folder ``<dataset>/`` holding ``<dataset>.inter`` and optionally
``<dataset>.user`` and ``<dataset>.item``. Each file is tab-separated with
one header line of typed fields, ``name:type``::

    user_id:token	item_id:token	rating:float	timestamp:float
    196	242	3	881250949

Types: ``token`` (a string), ``token_seq`` (space-separated strings),
``float``, ``float_seq`` (space-separated numbers).

Mapping:

- ``.inter`` -> ``events``: ``user_id``/``item_id`` (required) encoded as in
  :mod:`features.sources.ids` (``-1`` when a ``.user``/``.item`` file exists
  and lacks the id); ``timestamp`` -> ``ts`` (unix seconds); ``rating`` ->
  ``value``; ``label`` -> ``label``, else ``rating >= positive_threshold``,
  else 1.0 (implicit feedback). ``event_type`` is ``rating`` when there is a
  rating field, ``view`` otherwise. Without a timestamp field, ``ts`` is
  synthesised as for user-item lines (2000-01-01Z + the row's position among
  the user's rows, in seconds). Other fields are dropped. Values stay raw.
- ``.user`` / ``.item`` -> ``users`` / ``items``: the id + every other field,
  typed by its declared type (``float`` -> float64, ``*_seq`` -> lists); when
  the file is absent the table is the ids seen in ``.inter``.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from features.dataset import InteractionTables
from features.schemas import EventType
from features.sources.files import SYNTHETIC_EPOCH_S
from features.sources.ids import build_id_map, encode_column
from features.sources.text import local_path, read_csv_strings
from infra.config import RecBoleSourceConfig
from infra.errors import SourceError

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")


def load_recbole(config: RecBoleSourceConfig) -> InteractionTables:
    """Read the atomic files of ``config`` (see module doc)."""
    return read_recbole(config.path, config.dataset, config.positive_threshold)


def read_recbole(
    path: str | Path, dataset: str | None = None, positive_threshold: float = 4.0
) -> InteractionTables:
    folder, name = _locate(local_path(path), dataset)
    inter_path = folder / f"{name}.inter"
    inter, types = read_atomic_file(inter_path, typed=False)
    for required in ("user_id", "item_id"):
        if required not in inter.columns:
            raise SourceError(f"{inter_path}: no {required!r} field; found {list(types)}")
    users = _entity_file(folder / f"{name}.user", "user_id")
    items = _entity_file(folder / f"{name}.item", "item_id")
    user_map = build_id_map((users if users is not None else inter).get_column("user_id"), "user")
    item_map = build_id_map((items if items is not None else inter).get_column("item_id"), "item")
    events = _events(inter, positive_threshold)
    events = encode_column(encode_column(events, "user_id", user_map), "item_id", item_map)
    return InteractionTables(
        name=name,
        events=events,
        users=_entity_rows(users, "user_id", user_map),
        items=_entity_rows(items, "item_id", item_map),
        id_map=pl.concat([user_map, item_map]),
        ts_unit="s",
    )


def read_atomic_file(path: Path, typed: bool = True) -> tuple[pl.DataFrame, dict[str, str]]:
    """A frame named by field (``user_id``, not ``user_id:token``) and each field's type.

    ``typed=False`` keeps every value a string (for events, which validation types).
    """
    raw = read_csv_strings(path, separator="\t")
    types: dict[str, str] = {}
    for header in raw.columns:
        field, sep, kind = header.rpartition(":")
        if not sep or kind not in FIELD_TYPES:
            raise SourceError(
                f"{path}: header field {header!r} is not name:type with type in {FIELD_TYPES}"
            )
        types[field] = kind
    frame = raw.rename(dict(zip(raw.columns, types, strict=True)))
    if not typed:
        return frame, types
    return frame.with_columns(_typed(field, kind) for field, kind in types.items()), types


def _typed(field: str, kind: str) -> pl.Expr:
    col = pl.col(field)
    if kind == "float":
        return col.str.strip_chars().cast(pl.Float64, strict=False)
    if kind == "token_seq":
        return col.str.extract_all(r"\S+")
    if kind == "float_seq":
        return col.str.extract_all(r"\S+").list.eval(pl.element().cast(pl.Float64, strict=False))
    return col


def _locate(path: Path, dataset: str | None) -> tuple[Path, str]:
    if path.is_file():
        if path.suffix != ".inter":
            raise SourceError(f"{path}: a RecBole source is a folder or a .inter file")
        return path.parent, path.stem
    if dataset is not None:
        if not (path / f"{dataset}.inter").is_file():
            raise SourceError(f"{path / f'{dataset}.inter'}: missing")
        return path, dataset
    inters = sorted(path.glob("*.inter"))
    if len(inters) != 1:
        found = [p.name for p in inters]
        raise SourceError(f"{path}: expected one .inter file (or set dataset); found {found}")
    return path, inters[0].stem


def _entity_file(path: Path, id_field: str) -> pl.DataFrame | None:
    if not path.is_file():
        return None
    frame, types = read_atomic_file(path)
    if id_field not in frame.columns:
        raise SourceError(f"{path}: no {id_field!r} field; found {list(types)}")
    return frame


def _events(inter: pl.DataFrame, positive_threshold: float) -> pl.DataFrame:
    has_rating = "rating" in inter.columns
    rating = pl.col("rating").str.strip_chars().cast(pl.Float64, strict=False)
    if "label" in inter.columns:
        label = pl.col("label")
    elif has_rating:
        label = (
            pl.when(rating >= positive_threshold)
            .then(1.0)
            .when(rating < positive_threshold)
            .then(0.0)
        )
    else:
        label = pl.lit(1.0)
    if "timestamp" in inter.columns:
        ts = pl.col("timestamp")
    else:
        # No times: the row's rank among its user's rows, on a synthetic clock.
        ts = (pl.int_range(pl.len()).over("user_id") + SYNTHETIC_EPOCH_S).cast(pl.Int64)
    event_type = EventType.RATING if has_rating else EventType.VIEW
    return inter.select(
        "user_id",
        "item_id",
        ts.alias("ts"),
        pl.lit(event_type.value).alias("event_type"),
        label.alias("label"),
        pl.lit(None, pl.Int32).alias("position"),
        pl.lit(None, pl.Int64).alias("request_id"),
        pl.lit(None, pl.Float64).alias("propensity"),
        (pl.col("rating") if has_rating else pl.lit(None, pl.String)).alias("value"),
    )


def _entity_rows(frame: pl.DataFrame | None, id_column: str, id_map: pl.DataFrame) -> pl.DataFrame:
    if frame is None:
        return id_map.select(pl.col("id").alias(id_column))
    coded = encode_column(frame, id_column, id_map)
    return coded.filter(pl.col(id_column) >= 0).unique(id_column, keep="first").sort(id_column)
