"""Generic CSV/Parquet/user-item-line files and RecBole atomic files, and load_source."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

from features.dataset import CtrTable, InteractionTables
from features.schemas import EVENTS
from features.sources import load_source
from features.sources.files import SYNTHETIC_EPOCH_S, load_interaction_files
from features.sources.recbole import read_recbole
from features.validation import ValidationRules, validate_table
from infra.config import (
    InteractionFilesSourceConfig,
    MovieLensSourceConfig,
    RecBoleSourceConfig,
    SimulatorSourceConfig,
)
from infra.errors import SourceError


def _known(tables: InteractionTables) -> dict[str, pl.Series]:
    return {"user_id": tables.users["user_id"], "item_id": tables.items["item_id"]}


def test_csv_with_column_mapping_and_iso_times(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text(
        "uid,iid,when,clicked,extra\n"
        "u10,i1,2024-03-01T10:00:00Z,1,a\n"
        "u2,i1,2024-03-01T11:00:00Z,0,b\n"
        "u2,i3,not a time,1,c\n"
    )
    config = InteractionFilesSourceConfig(
        path=str(path), columns={"user_id": "uid", "item_id": "iid", "ts": "when", "label": "clicked"},
        ts_unit="iso",
    )  # fmt: skip
    tables = load_interaction_files(config)
    assert tables.ts_unit == "iso"
    assert tables.id_map.filter(pl.col("entity") == "user")["raw_id"].to_list() == ["u10", "u2"]
    assert (tables.users.height, tables.items.height) == (2, 2)
    assert set(tables.events["event_type"]) == {"click"}
    result = validate_table(tables.events, EVENTS, ValidationRules(ts_unit="iso"), _known(tables))
    assert result.valid["ts"][0] == dt.datetime(2024, 3, 1, 10, tzinfo=dt.UTC)
    assert result.quarantined["_source_row"].to_list() == [2]


def test_parquet_folder_with_canonical_names_and_ms(tmp_path: Path) -> None:
    folder = tmp_path / "events"
    folder.mkdir()
    for part, users in enumerate(([5, 7], [7, 9])):
        pl.DataFrame(
            {"user_id": users, "item_id": [100, 200], "ts": [1_700_000_000_000, 1_700_000_001_000]}
        ).write_parquet(folder / f"part-{part}.parquet")
    config = InteractionFilesSourceConfig(
        path=str(folder), format="parquet", ts_unit="ms", event_type="view"
    )
    tables = load_interaction_files(config)
    assert tables.events.height == 4
    assert tables.events["user_id"].to_list() == [0, 1, 1, 2]  # raw 5, 7, 7, 9
    assert tables.events["label"].to_list() == [1.0] * 4
    result = validate_table(tables.events, EVENTS, ValidationRules(ts_unit="ms"), _known(tables))
    assert result.quarantined.height == 0


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user,item\n1,2\n")
    with pytest.raises(SourceError, match="no column for 'user_id'"):
        load_interaction_files(InteractionFilesSourceConfig(path=str(path)))
    mapped = {"user_id": "user", "item_id": "item", "ts": "time"}
    with pytest.raises(SourceError, match=r"log.csv: mapped column\(s\) \['time'\] not found"):
        load_interaction_files(InteractionFilesSourceConfig(path=str(path), columns=mapped))
    with pytest.raises(SourceError, match="not events columns"):
        load_interaction_files(
            InteractionFilesSourceConfig(path=str(path), columns={"uid": "user"})
        )


def test_user_item_lines(tmp_path: Path) -> None:
    path = tmp_path / "seq.txt"
    path.write_text("7 a b c\n3 b\n9\n")
    tables = load_interaction_files(
        InteractionFilesSourceConfig(path=str(path), format="user_item_lines")
    )
    assert tables.users.height == 3  # user 9 has no items but exists
    events = tables.events
    assert events["user_id"].to_list() == [1, 1, 1, 0]  # codes in raw order: 3 -> 0, 7 -> 1, 9 -> 2
    assert events["item_id"].to_list() == [0, 1, 2, 1]
    assert events["ts"].to_list() == [
        SYNTHETIC_EPOCH_S,
        SYNTHETIC_EPOCH_S + 1,
        SYNTHETIC_EPOCH_S + 2,
        SYNTHETIC_EPOCH_S,
    ]
    assert set(events["event_type"]) == {"view"}
    assert validate_table(events, EVENTS, known_ids=_known(tables)).quarantined.height == 0


def _write_atomic(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))


def test_recbole_atomic_files(tmp_path: Path) -> None:
    folder = tmp_path / "ml"
    folder.mkdir()
    _write_atomic(
        folder / "ml.inter",
        ["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
        [
            ["196", "242", "3", "881250949"],
            ["186", "302", "5", "891717742"],
            ["196", "999", "4", "881250950"],
        ],
    )
    _write_atomic(
        folder / "ml.item",
        [
            "item_id:token",
            "movie_title:token_seq",
            "release_year:token",
            "class:token_seq",
            "pop:float",
        ],
        [
            ["242", "Kolya", "1996", "Comedy", "0.5"],
            ["302", "L.A. Confidential", "1997", "Crime Film-Noir", ""],
        ],
    )
    tables = read_recbole(folder)
    assert tables.name == "ml"
    assert tables.users.height == 2  # no .user file: the ids seen
    assert tables.items.columns == ["item_id", "movie_title", "release_year", "class", "pop"]
    assert tables.items["class"].to_list() == [["Comedy"], ["Crime", "Film-Noir"]]
    assert tables.items.schema["pop"] == pl.Float64
    assert tables.events["label"].to_list() == [0.0, 1.0, 1.0]
    assert set(tables.events["event_type"]) == {"rating"}
    result = validate_table(tables.events, EVENTS, known_ids=_known(tables))
    assert result.valid.height == 2
    assert "item_id: id out of range (unknown entity)" in result.quarantined["_reason"].item()


def test_recbole_implicit_without_timestamps_and_bad_header(tmp_path: Path) -> None:
    _write_atomic(
        tmp_path / "seq.inter",
        ["user_id:token", "item_id:token"],
        [["a", "x"], ["a", "y"], ["b", "x"]],
    )
    tables = read_recbole(tmp_path / "seq.inter")
    assert tables.events["ts"].to_list() == [
        SYNTHETIC_EPOCH_S,
        SYNTHETIC_EPOCH_S + 1,
        SYNTHETIC_EPOCH_S,
    ]
    assert set(tables.events["event_type"]) == {"view"}
    assert validate_table(tables.events, EVENTS, known_ids=_known(tables)).quarantined.height == 0
    _write_atomic(tmp_path / "bad.inter", ["user_id", "item_id:token"], [["a", "x"]])
    with pytest.raises(SourceError, match="bad.inter: header field 'user_id'"):
        read_recbole(tmp_path, dataset="bad")


def test_load_source_dispatch(tmp_path: Path, shared_datasets: Path) -> None:
    (tmp_path / "seq.txt").write_text("1 2 3\n")
    files = load_source(
        InteractionFilesSourceConfig(path=str(tmp_path / "seq.txt"), format="user_item_lines")
    )
    assert isinstance(files, InteractionTables) and files.events.height == 2
    _write_atomic(tmp_path / "r.inter", ["user_id:token", "item_id:token"], [["a", "x"]])
    assert load_source(RecBoleSourceConfig(path=str(tmp_path))).events.height == 1
    ml = load_source(MovieLensSourceConfig(path=str(shared_datasets / "ml-100k")))
    # MovieLens hands its ratings over as a scan (the ingest writes it in chunks).
    assert isinstance(ml, InteractionTables) and isinstance(ml.events, pl.LazyFrame)
    assert ml.events.select(pl.len()).collect().item() == 100_000
    with pytest.raises(SourceError, match="simulator source is generated"):
        load_source(SimulatorSourceConfig())


def test_load_source_ctr(shared_datasets: Path) -> None:
    from infra.config import CtrSourceConfig

    ctr = load_source(CtrSourceConfig(kind="avazu", path=str(shared_datasets / "avazu-sample")))
    assert isinstance(ctr, CtrTable) and ctr.table.height == 8_087
