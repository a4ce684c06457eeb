"""MovieLens layouts: real 100K / latest-small copies and hand-built 1M / 10M folders."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from features.dataset import write_interactions
from features.schemas import EVENTS
from features.sources.ids import UNKNOWN_ID
from features.sources.movielens import detect_layout, load_movielens, read_movielens
from features.validation import validate_table
from infra.config import MovieLensSourceConfig
from infra.errors import SourceError
from infra.storage import StoragePath


def _validate(tables):
    known = {"user_id": tables.users["user_id"], "item_id": tables.items["item_id"]}
    return validate_table(tables.events, EVENTS, known_ids=known)


def test_ml_100k_real_counts_and_clean_validation(shared_datasets: Path) -> None:
    tables = read_movielens(shared_datasets / "ml-100k")
    assert (tables.events.height, tables.users.height, tables.items.height) == (100_000, 943, 1_682)
    assert tables.users["user_id"].to_list() == list(range(943))
    assert tables.users.columns == ["user_id", "age", "gender", "occupation", "zip"]
    assert tables.users.schema["age"] == pl.Int64
    result = _validate(tables)
    assert result.quarantined.height == 0
    assert result.valid.height == 100_000
    # u.data line 1 is "196 242 3 881250949": raw 196 -> code 195, rating 3 -> label 0.
    first = result.valid.row(0, named=True)
    assert (first["user_id"], first["item_id"], first["label"], first["value"]) == (
        195,
        241,
        0.0,
        3.0,
    )
    toy_story = tables.items.row(0, named=True)
    assert toy_story["year"] == 1995
    assert toy_story["genres"] == ["Animation", "Children's", "Comedy"]
    # latin-1 titles decode (item 543 is "Misérables, Les (1995)").
    misérables = tables.items.filter(pl.col("item_id") == 542)["title"].item()
    assert misérables == "Misérables, Les (1995)"
    id_map = tables.id_map
    assert id_map.filter(pl.col("entity") == "item").height == 1_682
    assert (
        id_map.filter((pl.col("entity") == "user") & (pl.col("raw_id") == "196"))["id"].item()
        == 195
    )


def test_ml_latest_small_real_counts_and_clean_validation(shared_datasets: Path) -> None:
    tables = read_movielens(shared_datasets / "ml-latest-small", positive_threshold=4.0)
    assert (tables.events.height, tables.users.height, tables.items.height) == (100_836, 610, 9_742)
    result = _validate(tables)
    assert result.quarantined.height == 0
    # Half-star ratings: 3.5 is negative at threshold 4.0, 4.0 positive.
    labels = result.valid.group_by("value").agg(pl.col("label").unique()).sort("value")
    assert dict(zip(labels["value"], labels["label"].to_list(), strict=True))[3.5] == [0.0]
    toy = tables.items.row(0, named=True)
    assert toy["genres"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert toy["tags"] == ["fun", "pixar"]
    quoted = tables.items.filter(pl.col("title") == "American President, The (1995)")
    assert quoted["year"].item() == 1995


ML1M_MOVIES = "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Misérables, Les (1995)::Drama|Musical\n3::Star Wars: Episode IV - A New Hope (1977)::Action|Sci-Fi\n"
ML1M_USERS = "1::F::1::10::48067\n2::M::56::16::70072\n10::M::25::20::55117\n"
ML1M_RATINGS = (
    "1::1::5::978300760\n"
    "1::2::3::978302109\n"
    "2::3::4::978301968\n"
    "10::1::4::978300275\n"
    "7::1::4::978300275\n"  # user 7 is not in users.dat
    "2::99::1::978300275\n"  # movie 99 is not in movies.dat
)


def _write_1m(folder: Path, with_users: bool = True) -> Path:
    folder.mkdir()
    (folder / "movies.dat").write_bytes(ML1M_MOVIES.encode("latin-1"))
    (folder / "ratings.dat").write_text(ML1M_RATINGS)
    if with_users:
        (folder / "users.dat").write_text(ML1M_USERS)
    return folder


def test_ml_1m_layout_latin1_and_unknown_ids_quarantined(tmp_path: Path) -> None:
    folder = _write_1m(tmp_path / "ml-1m")
    assert detect_layout(folder) == ("1m", folder)
    tables = read_movielens(folder)
    assert tables.name == "ml-1m"
    assert (tables.events.height, tables.users.height, tables.items.height) == (6, 3, 3)
    users = tables.users.to_dicts()
    # users sorted by raw id numerically: 1, 2, 10 -> 0, 1, 2; occupation codes named.
    assert users[2] == {
        "user_id": 2,
        "age": 25,
        "gender": "M",
        "occupation": "writer",
        "zip": "55117",
    }
    assert users[0]["occupation"] == "K-12 student"
    items = tables.items.to_dicts()
    assert items[1]["title"] == "Misérables, Les (1995)"
    assert items[2]["title"].startswith("Star Wars: Episode IV")
    assert items[2]["genres"] == ["Action", "Sci-Fi"]
    # Nothing is dropped: unknown raw ids become -1 and validation quarantines them with a reason.
    assert tables.events["user_id"].to_list()[4] == UNKNOWN_ID
    assert tables.events["item_id"].to_list()[5] == UNKNOWN_ID
    result = _validate(tables)
    assert result.valid.height == 4
    assert result.quarantined["_source_row"].to_list() == [4, 5]
    assert all("unknown entity" in r for r in result.quarantined["_reason"])


def test_ml_10m_layout_without_users_file(tmp_path: Path) -> None:
    folder = _write_1m(tmp_path / "ml-10M100K", with_users=False)
    (folder / "tags.dat").write_text("1::1::Pixar::1139045764\n2::1::pixar::1139045765\n")
    assert detect_layout(folder)[0] == "10m"
    tables = read_movielens(folder)
    # No user file: the users are whoever rated (1, 2, 7, 10).
    assert tables.users.columns == ["user_id"]
    assert tables.users.height == 4
    assert tables.items.filter(pl.col("item_id") == 0)["tags"].to_list() == [["pixar"]]
    assert _validate(tables).quarantined.height == 1  # only the unknown movie 99


def test_latest_layout_found_in_subfolder_and_bad_values_quarantined(tmp_path: Path) -> None:
    folder = tmp_path / "download" / "ml-latest-small"
    folder.mkdir(parents=True)
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.5,964982703\n1,2,abc,964982703\n2,1,2.0,\n"
    )
    (folder / "movies.csv").write_text(
        'movieId,title,genres\n1,"City of Lost Children, The (1995)",Adventure|Drama\n'
        "2,Babylon 5,(no genres listed)\n"
    )
    tables = read_movielens(tmp_path / "download")
    assert tables.items["year"].to_list() == [1995, None]
    assert tables.items["genres"].to_list() == [["Adventure", "Drama"], []]
    assert tables.events["label"].to_list() == [1.0, None, 0.0]
    result = _validate(tables)
    assert result.valid.height == 1
    reasons = dict(
        zip(result.quarantined["_source_row"], result.quarantined["_reason"], strict=True)
    )
    assert "value: not a valid" in reasons[1] and "label: null" in reasons[1]
    assert "ts: null" in reasons[2]


def test_not_a_movielens_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="no MovieLens layout"):
        read_movielens(tmp_path)
    with pytest.raises(SourceError, match="no such file"):
        read_movielens(tmp_path / "absent")


def test_25m_layout_is_imported_lazily_in_chunks_as_read_movielens_reads_it(
    tmp_path: Path,
) -> None:
    """A generated file set in the MovieLens-25M layout (userId-sorted ratings.csv with
    a header, quoted movie titles) goes through the ingest's reader as a scan, written
    ``chunk_rows`` rows a file, and the chunks hold what ``read_movielens`` reads."""
    folder = tmp_path / "ml-25m"
    folder.mkdir()
    n_users, per_user, n_movies = 300, 40, 120
    ratings = pl.DataFrame(
        {
            "userId": [u for u in range(1, n_users + 1) for _ in range(per_user)],
            "movieId": [(u * 7 + i * 13) % n_movies + 1 for u in range(n_users) for i in range(per_user)],
            "rating": [0.5 * (1 + (u + i) % 10) for u in range(n_users) for i in range(per_user)],
            "timestamp": [1_100_000_000 + 3_600 * (u * per_user + i) for u in range(n_users) for i in range(per_user)],
        }
    )  # fmt: skip
    ratings.write_csv(folder / "ratings.csv")
    movies = pl.DataFrame(
        {
            "movieId": range(1, n_movies + 1),
            "title": [f"Movie, The {m} ({1990 + m % 30})" for m in range(1, n_movies + 1)],
            "genres": ["Action|Drama" if m % 2 else "(no genres listed)" for m in range(n_movies)],
        }
    )
    movies.write_csv(folder / "movies.csv", quote_style="non_numeric")
    source = load_movielens(MovieLensSourceConfig(path=str(folder)))
    assert isinstance(source.events, pl.LazyFrame)
    out = StoragePath.from_uri(tmp_path / "raw")
    counts = write_interactions(source, out, chunk_rows=5_000)
    n = n_users * per_user
    assert counts == {"events": n, "users": n_users, "items": n_movies}
    # Raw ts strings are not dated yet: the chunks are parts of date=unknown, in file order.
    parts = sorted(f.path for f in out.join("events").files())
    assert [p.rsplit("/", 2)[1] for p in parts] == ["date=unknown"] * len(parts)
    assert len(parts) >= n // 5_000
    assert all(pl.read_parquet(p).height <= 5_000 for p in parts)
    written = pl.read_parquet(parts)
    assert written.equals(read_movielens(folder).events)
    assert written["user_id"].to_list()[:per_user] == [0] * per_user
    assert _validate(read_movielens(folder)).quarantined.height == 0
