"""MovieLens, every GroupLens layout, mapped onto the canonical tables.

The layout is detected from the files in the folder (or in its only MovieLens
sub-folder, as a zip extracts):

========== ================================================================
layout     files (GroupLens names)
========== ================================================================
100K       ``u.data``: ``user<TAB>item<TAB>rating<TAB>unix_ts``;
           ``u.user``: ``id|age|gender|occupation|zip``;
           ``u.item`` (latin-1): ``id|title|release date|video release
           date|IMDb URL|`` + 19 ``0/1`` genre flags, named in ``u.genre``
           (``name|index``)
1M         ``ratings.dat``: ``user::item::rating::unix_ts``;
           ``movies.dat`` (latin-1): ``id::title::Genre|Genre``;
           ``users.dat``: ``id::gender::age::occupation::zip`` where age is
           the lower bound of an age band (1 = under 18, 18, 25, 35, 45, 50,
           56) and occupation a code 0-20 (named in :data:`ML1M_OCCUPATIONS`)
10M        as 1M without ``users.dat``; ``tags.dat``: ``user::item::tag::ts``
latest/25M ``ratings.csv``: ``userId,movieId,rating,timestamp`` (header);
           ``movies.csv``: ``movieId,title,genres`` (quoted titles);
           ``tags.csv``: ``userId,movieId,tag,timestamp``
========== ================================================================

Output (:class:`~features.dataset.InteractionTables`, ``ts_unit="s"``;
:func:`load_movielens`, the ingest's reader, keeps ``events`` a LazyFrame
over the rating file, which the ingest writes in chunks: ``ratings.csv`` of
MovieLens-25M is never read whole; :func:`read_movielens` collects it):

- ``events``: ``user_id, item_id`` (int64 codes, see :mod:`features.sources.ids`;
  ``-1`` for a raw id missing from the users/items file), ``ts`` (the raw unix
  seconds, a string), ``event_type = "rating"``, ``label`` (1.0 when rating >=
  ``positive_threshold``, 0.0 below, null when the rating is not a number),
  ``value`` (the raw rating string), ``position/request_id/propensity`` null.
  Rows keep the rating file's order, so a quarantined row's ``_source_row``
  is its line in that file (after the header, for CSV).
- ``users``: ``user_id`` + ``age`` (int64), ``gender``, ``occupation``,
  ``zip`` for 100K and 1M; only ``user_id`` (the ids seen in the ratings) for
  10M and latest/25M, which publish no user file.
- ``items``: ``item_id, title, year`` (int32, from ``"Title (1995)"``, else
  the 100K release date), ``genres`` (list[str]; "unknown" / "(no genres
  listed)" give an empty list), ``tags`` (list[str], distinct lower-cased
  tags, where the layout has a tags file).
- ``id_map``: ``entity, raw_id, id`` for every user and item.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import polars as pl

from features.dataset import InteractionTables
from features.schemas import EventType
from features.sources.ids import Frame, build_id_map, encode_column
from features.sources.text import local_path, read_csv_strings, read_fields, read_lines
from infra.config import MovieLensSourceConfig
from infra.errors import SourceError

Layout = Literal["100k", "1m", "10m", "latest"]

# users.dat occupation codes, from the ML-1M README.
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip
# Genre names that mean "no genre".
_NO_GENRE = ("unknown", "(no genres listed)")
# "Heat (1995)", "Babylon 5 (1994–1998)  ": the first year of the trailing parenthesis.
_TITLE_YEAR = r"\((\d{4})[^()]*\)\s*$"
_RATING_FIELDS = ["user", "item", "rating", "ts"]


def load_movielens(config: MovieLensSourceConfig) -> InteractionTables[pl.LazyFrame]:
    """The MovieLens folder of ``config`` (any layout), its events a scan for the ingest."""
    return scan_movielens(config.path, positive_threshold=config.positive_threshold)


def read_movielens(
    path: str | Path, positive_threshold: float = 4.0, name: str | None = None
) -> InteractionTables[pl.DataFrame]:
    """Read a MovieLens folder in any layout into canonical tables (see module doc)."""
    tables = scan_movielens(path, positive_threshold, name)
    return InteractionTables(
        tables.name,
        tables.events.collect(),
        tables.users,
        tables.items,
        tables.id_map,
        tables.ts_unit,
    )


def scan_movielens(
    path: str | Path, positive_threshold: float = 4.0, name: str | None = None
) -> InteractionTables[pl.LazyFrame]:
    """:func:`read_movielens` with ``events`` a LazyFrame: nothing of the rating file is
    held but its distinct users (the layouts without a user file) and, for the older
    layouts (at most 10M rows, in ``::``-separated files Polars cannot scan), the file."""
    layout, folder = detect_layout(local_path(path))
    readers = {"100k": _read_100k, "1m": _read_dat, "10m": _read_dat, "latest": _read_latest}
    ratings, users, items = readers[layout](folder)
    return _assemble(name or folder.name, ratings, users, items, positive_threshold)


def detect_layout(path: Path) -> tuple[Layout, Path]:
    """The layout of ``path`` and the folder holding its files.

    ``path`` may also be a folder whose only MovieLens sub-folder holds them
    (``dest/ml-1m/ratings.dat`` given ``dest``).
    """
    if not path.is_dir():
        raise SourceError(f"{path}: a MovieLens source is a folder, not a file")
    layout = _layout_of(path)
    if layout is not None:
        return layout, path
    found = [(sub, _layout_of(sub)) for sub in sorted(path.iterdir()) if sub.is_dir()]
    found = [(sub, lay) for sub, lay in found if lay is not None]
    if len(found) == 1:
        return found[0][1], found[0][0]
    raise SourceError(
        f"{path}: no MovieLens layout found (expected u.data, ratings.dat or ratings.csv"
        + (f"; several candidate sub-folders: {[str(s) for s, _ in found]}" if found else "")
        + ")"
    )


def _layout_of(folder: Path) -> Layout | None:
    if (folder / "u.data").is_file():
        return "100k"
    if (folder / "ratings.dat").is_file():
        return "1m" if (folder / "users.dat").is_file() else "10m"
    if (folder / "ratings.csv").is_file():
        return "latest"
    return None


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise SourceError(f"{path}: missing (the MovieLens layout in {folder} needs it)")
    return path


# --------------------------------------------------------------------------- layouts
# Each reader returns raw string frames: ratings (user, item, rating, ts; lazy),
# users (user + attributes), items (item + title, year, genres[, tags]).


def _read_100k(folder: Path) -> tuple[pl.LazyFrame, pl.DataFrame, pl.DataFrame]:
    ratings = read_fields(_require(folder, "u.data"), "\t", _RATING_FIELDS)
    users = read_fields(
        _require(folder, "u.user"), "|", ["user", "age", "gender", "occupation", "zip"]
    )
    genre_names = _genres_100k(_require(folder, "u.genre"))
    item_path = _require(folder, "u.item")
    fixed = ["item", "title", "release_date", "video_release_date", "url"]
    raw_items = read_fields(item_path, "|", fixed + [f"g{i}" for i in range(len(genre_names))])
    flags = [
        pl.when(pl.col(f"g{i}").str.strip_chars() == "1").then(pl.lit(name))
        for i, name in enumerate(genre_names)
        if name not in _NO_GENRE
    ]
    items = raw_items.select(
        "item",
        "title",
        pl.coalesce(
            _year_from_title(pl.col("title")),
            pl.col("release_date").str.extract(r"(\d{4})\s*$", 1).cast(pl.Int32, strict=False),
        ).alias("year"),
        pl.concat_list(flags).list.drop_nulls().alias("genres"),
    )
    return ratings.lazy(), _typed_users(users), items


def _genres_100k(path: Path) -> list[str]:
    """Genre names in flag order; ``u.genre`` lines are ``name|index``."""
    pairs = read_fields(path, "|", ["name", "index"]).drop_nulls()
    index = pairs.get_column("index").cast(pl.Int64, strict=False)
    if index.null_count() or sorted(index.to_list()) != list(range(pairs.height)):
        raise SourceError(f"{path}: expected 'name|index' lines with indices 0..n-1")
    return pairs.with_columns(index.alias("index")).sort("index").get_column("name").to_list()


def _read_dat(folder: Path) -> tuple[pl.LazyFrame, pl.DataFrame, pl.DataFrame]:
    ratings = read_fields(_require(folder, "ratings.dat"), "::", _RATING_FIELDS)
    movies = _movies_dat(_require(folder, "movies.dat"))
    if (folder / "tags.dat").is_file():
        tags = read_fields(folder / "tags.dat", "::", ["user", "item", "tag", "ts"])
        movies = _with_tags(movies, tags)
    if (folder / "users.dat").is_file():
        raw = read_fields(
            folder / "users.dat", "::", ["user", "gender", "age", "occupation", "zip"]
        )
        code = pl.col("occupation").str.strip_chars().cast(pl.Int64, strict=False)
        names = pl.Series(ML1M_OCCUPATIONS)
        occupation = pl.when(code.is_between(0, len(ML1M_OCCUPATIONS) - 1)).then(
            code.replace_strict(
                list(range(len(names))), names, default=None, return_dtype=pl.String
            )
        )
        users = _typed_users(raw.with_columns(occupation.alias("occupation")))
    else:
        # 10M publishes no user file: the users are those who rated.
        users = ratings.select(pl.col("user")).unique(maintain_order=True)
    return ratings.lazy(), users, movies


def _movies_dat(path: Path) -> pl.DataFrame:
    """``id::title::genres``; titles may hold ``:`` but never ``::``."""
    parts = read_lines(path).str.split("::")
    ok = parts.list.len() == 3
    frame = pl.DataFrame({"parts": parts}).filter(pl.lit(ok))
    if frame.height < parts.len():
        raise SourceError(f"{path}: {parts.len() - frame.height} line(s) are not id::title::genres")
    return frame.select(
        pl.col("parts").list.get(0).alias("item"),
        pl.col("parts").list.get(1).alias("title"),
        _year_from_title(pl.col("parts").list.get(1)).alias("year"),
        _split_genres(pl.col("parts").list.get(2)).alias("genres"),
    )


def _read_latest(folder: Path) -> tuple[pl.LazyFrame, pl.DataFrame, pl.DataFrame]:
    ratings_path = _require(folder, "ratings.csv")
    # A scan (25M rows in MovieLens-25M): the ingest streams it into chunked files.
    # Every field a string, as read_csv_strings reads them; the file is ASCII digits.
    ratings = _renamed(
        pl.scan_csv(ratings_path, infer_schema=False),
        {"userId": "user", "movieId": "item", "rating": "rating", "timestamp": "ts"},
        ratings_path,
    )
    movies_path = _require(folder, "movies.csv")
    raw_movies = _renamed(
        read_csv_strings(movies_path),
        {"movieId": "item", "title": "title", "genres": "genres"},
        movies_path,
    )
    movies = raw_movies.select(
        "item",
        pl.col("title").str.strip_chars(),
        _year_from_title(pl.col("title")).alias("year"),
        _split_genres(pl.col("genres")).alias("genres"),
    )
    if (folder / "tags.csv").is_file():
        tags = _renamed(
            read_csv_strings(folder / "tags.csv"),
            {"userId": "user", "movieId": "item", "tag": "tag", "timestamp": "ts"},
            folder / "tags.csv",
        )
        movies = _with_tags(movies, tags)
    # No user file: the users are those who rated (a streaming distinct, 162k in 25M).
    try:
        users = ratings.select(pl.col("user")).unique(maintain_order=True).collect()
    except pl.exceptions.PolarsError as exc:
        raise SourceError(
            f"{ratings_path}: cannot read as CSV ({type(exc).__name__}: {exc})"
        ) from None
    return ratings, users, movies


def _renamed(frame: Frame, columns: dict[str, str], path: Path) -> Frame:
    found = frame.collect_schema().names()
    missing = [c for c in columns if c not in found]
    if missing:
        raise SourceError(f"{path}: missing column(s) {', '.join(missing)}; found {found}")
    return frame.select([pl.col(src).alias(dst) for src, dst in columns.items()])


# --------------------------------------------------------------------------- shared parts


def _year_from_title(title: pl.Expr) -> pl.Expr:
    return title.str.extract(_TITLE_YEAR, 1).cast(pl.Int32, strict=False)


def _split_genres(genres: pl.Expr) -> pl.Expr:
    return (
        genres.fill_null("")
        .str.split("|")
        .list.eval(pl.element().str.strip_chars())
        .list.filter(~pl.element().is_in(["", *_NO_GENRE]))
    )


def _with_tags(items: pl.DataFrame, tags: pl.DataFrame) -> pl.DataFrame:
    """Distinct lower-cased tags per item as a list column (empty when none)."""
    per_item = (
        tags.select(pl.col("item"), pl.col("tag").str.strip_chars().str.to_lowercase())
        .filter(pl.col("tag").is_not_null() & (pl.col("tag") != ""))
        .unique()
        .group_by("item")
        .agg(pl.col("tag").sort().alias("tags"))
    )
    joined = items.join(per_item, on="item", how="left", maintain_order="left")
    return joined.with_columns(pl.col("tags").fill_null(pl.lit([], dtype=pl.List(pl.String))))


def _typed_users(raw: pl.DataFrame) -> pl.DataFrame:
    return raw.select(
        "user",
        pl.col("age").str.strip_chars().cast(pl.Int64, strict=False),
        pl.col("gender").str.strip_chars(),
        pl.col("occupation").str.strip_chars(),
        pl.col("zip").str.strip_chars(),
    )


def _assemble(
    name: str,
    ratings: pl.LazyFrame,
    users: pl.DataFrame,
    items: pl.DataFrame,
    positive_threshold: float,
) -> InteractionTables[pl.LazyFrame]:
    # The entity files define which ids exist; ratings of anyone else get -1.
    user_map = build_id_map(users.get_column("user"), "user")
    item_map = build_id_map(items.get_column("item"), "item")
    rating = pl.col("rating").str.strip_chars().cast(pl.Float64, strict=False)
    events = (
        ratings.rename({"user": "user_id", "item": "item_id"})
        .pipe(encode_column, "user_id", user_map)
        .pipe(encode_column, "item_id", item_map)
        .select(
            "user_id",
            "item_id",
            pl.col("ts"),
            pl.lit(EventType.RATING.value).alias("event_type"),
            pl.when(rating >= positive_threshold)
            .then(1.0)
            .when(rating < positive_threshold)
            .then(0.0)
            .alias("label"),
            pl.lit(None, pl.Int32).alias("position"),
            pl.lit(None, pl.Int64).alias("request_id"),
            pl.lit(None, pl.Float64).alias("propensity"),
            pl.col("rating").alias("value"),
        )
    )
    return InteractionTables(
        name=name,
        events=events,
        users=_entity_rows(users, "user", "user_id", user_map),
        items=_entity_rows(items, "item", "item_id", item_map),
        id_map=pl.concat([user_map, item_map]),
        ts_unit="s",
    )


def _entity_rows(
    frame: pl.DataFrame, raw_column: str, id_column: str, id_map: pl.DataFrame
) -> pl.DataFrame:
    """One row per known id (the first when a file repeats one), ordered by code."""
    coded = encode_column(frame.rename({raw_column: id_column}), id_column, id_map)
    return coded.filter(pl.col(id_column) >= 0).unique(id_column, keep="first").sort(id_column)
