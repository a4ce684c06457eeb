"""Generic interaction files: CSV/Parquet with a column mapping, or user-item lines.

Formats (``InteractionFilesSourceConfig.format``):

- ``csv`` / ``parquet``: one event per row. ``columns`` maps a canonical
  events column to a file column (``{"user_id": "uid", "ts": "time"}``);
  canonical columns not mapped are taken from same-named file columns, other
  file columns are ignored. ``user_id``, ``item_id`` and ``ts`` must exist;
  ``ts`` is read with ``ts_unit`` (``s``/``ms`` unix or ``iso`` strings) by
  validation. Without a ``label`` column every row is an observed interaction
  (label 1.0); without an ``event_type`` column rows get the config's
  ``event_type``. ``path`` may be a file or a folder of ``.csv`` / ``.parquet``
  files (read in name order).
- ``user_item_lines``: ``user item item ...`` per line, whitespace-separated
  (the implicit-sequence format of SASRec/GRU4Rec style datasets), items in
  the order the user met them. One ``view`` event with label 1.0 per item;
  the files carry no times, so ``ts`` is synthesised from the order:
  2000-01-01T00:00:00Z + (position in the line) seconds. Only the order within
  a user means anything (every user starts at the same instant); the epoch is
  after validation's ``ts_min`` so the rows pass.

Ids are encoded as in :mod:`features.sources.ids` (0..n-1 in raw-id order,
``id_map`` keeps the raw ids); the users/items tables are the ids seen, with
no attributes. Values stay raw: validation types and quarantines them.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from features.dataset import InteractionTables
from features.schemas import EVENTS, EventType
from features.sources.ids import build_id_map, encode_column, entity_table
from features.sources.text import local_path, read_csv_strings, read_lines
from infra.config import InteractionFilesSourceConfig
from infra.errors import SourceError

# 2000-01-01T00:00:00Z in unix seconds: the start of synthesised timelines.
SYNTHETIC_EPOCH_S = 946_684_800
_SUFFIX = {"csv": ".csv", "parquet": ".parquet"}


def load_interaction_files(config: InteractionFilesSourceConfig) -> InteractionTables:
    """Read the files of ``config`` into canonical tables (see module doc)."""
    path = local_path(config.path)
    users: pl.Series | None = None
    if config.format == "user_item_lines":
        raw, users = read_user_item_lines(path)
        ts_unit = "s"
    else:
        raw = read_event_files(path, config.format, config.columns, config.separator)
        ts_unit = config.ts_unit
        if "label" not in raw.columns:
            raw = raw.with_columns(pl.lit(1.0).alias("label"))
        if "event_type" not in raw.columns:
            raw = raw.with_columns(pl.lit(config.event_type).alias("event_type"))
    return interactions_from_events(path.stem, raw, ts_unit=ts_unit, users=users)


def read_event_files(
    path: Path, format: str, columns: dict[str, str], separator: str = ","
) -> pl.DataFrame:
    """Rows of a CSV/Parquet file (or folder) with canonical column names, values raw."""
    unknown = sorted(set(columns) - set(EVENTS.names))
    if unknown:
        raise SourceError(f"columns: {unknown} are not events columns ({', '.join(EVENTS.names)})")
    files = _files(path, _SUFFIX[format])
    frames = []
    for file in files:
        frame = read_csv_strings(file, separator) if format == "csv" else _read_parquet(file)
        missing = [src for src in columns.values() if src not in frame.columns]
        if missing:
            raise SourceError(
                f"{file}: mapped column(s) {missing} not found; found {frame.columns}"
            )
        chosen = {canon: columns.get(canon, canon) for canon in EVENTS.names}
        present = {canon: src for canon, src in chosen.items() if src in frame.columns}
        for required in ("user_id", "item_id", "ts"):
            if required not in present:
                raise SourceError(
                    f"{file}: no column for {required!r} (map one with columns.{required}); "
                    f"found {frame.columns}"
                )
        frames.append(frame.select([pl.col(src).alias(canon) for canon, src in present.items()]))
    return pl.concat(frames, how="diagonal_relaxed")


def read_user_item_lines(path: Path) -> tuple[pl.DataFrame, pl.Series]:
    """``user item item ...`` lines -> raw ``view`` events (see module doc), and every user.

    The users are returned apart because a line may hold a user and no item.
    """
    frames = []
    for file in _files(path, None):
        tokens = read_lines(file).str.extract_all(r"\S+")
        frames.append(
            pl.DataFrame({"tokens": tokens}).select(
                pl.col("tokens").list.first().alias("user_id"),
                pl.col("tokens").list.slice(1).alias("item_id"),
            )
        )
    lines = pl.concat(frames)
    events = (
        lines.with_columns(pl.int_ranges(pl.col("item_id").list.len()).alias("__pos"))
        .explode("item_id", "__pos")
        .filter(pl.col("item_id").is_not_null())
    )
    return events.select(
        "user_id",
        "item_id",
        (pl.col("__pos") + SYNTHETIC_EPOCH_S).cast(pl.Int64).alias("ts"),
        pl.lit(EventType.VIEW.value).alias("event_type"),
        pl.lit(1.0).alias("label"),
    ), lines.get_column("user_id")


def interactions_from_events(
    name: str, raw: pl.DataFrame, ts_unit: str = "s", users: pl.Series | None = None
) -> InteractionTables:
    """Encode the raw ids of ``raw`` events; users/items are the ids seen (plus ``users``)."""
    users_seen = raw.get_column("user_id").cast(pl.String)
    if users is not None:
        users_seen = pl.concat([users_seen, users.cast(pl.String)])
    user_map = build_id_map(users_seen, "user")
    item_map = build_id_map(raw.get_column("item_id"), "item")
    events = encode_column(encode_column(raw, "user_id", user_map), "item_id", item_map)
    ordered = [pl.col(c.name) for c in EVENTS.columns if c.name in events.columns]
    return InteractionTables(
        name=name,
        events=events.select(ordered),
        users=entity_table(user_map, "user_id"),
        items=entity_table(item_map, "item_id"),
        id_map=pl.concat([user_map, item_map]),
        ts_unit=ts_unit,  # type: ignore[arg-type]
    )


def _files(path: Path, suffix: str | None) -> list[Path]:
    if path.is_file():
        return [path]
    files = [
        f
        for f in sorted(path.iterdir())
        if f.is_file() and not f.name.startswith(".") and (suffix is None or f.suffix == suffix)
    ]
    if not files:
        raise SourceError(f"{path}: no {suffix or 'data'} files in the folder")
    return files


def _read_parquet(file: Path) -> pl.DataFrame:
    try:
        return pl.read_parquet(file)
    except pl.exceptions.PolarsError as exc:
        raise SourceError(f"{file}: cannot read as Parquet ({exc})") from None
