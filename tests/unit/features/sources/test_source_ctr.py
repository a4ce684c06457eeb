"""Criteo / Avazu samples -> CtrTable: row counts, shared codes, OOV, header variants."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from features.feature_spec import FeatureKind, FeatureSpec, Normalization
from features.sources.ctr import apply_ctr, fit_ctr_spec, load_ctr, read_ctr_raw
from infra.config import CtrSourceConfig
from infra.errors import SourceError

CRITEO_ROWS = {
    "wide-resdnn_train.tsv": 7_200,
    "wide-resdnn_dev.tsv": 409,
    "wide-resdnn_test.tsv": 391,
    "deepctr_criteo_sample.txt": 200,
}
AVAZU_ROWS = {
    "wide-resdnn_train.csv": 8_087,
    "wide-resdnn_dev.csv": 480,
    "wide-resdnn_test.csv": 432,
    "deepctr_avazu_sample.txt": 100,
}


def _check_table(table: pl.DataFrame, spec: FeatureSpec) -> None:
    assert table.columns == ["label", *spec.names]
    assert table.null_count().sum_horizontal().item() == 0
    assert set(table["label"].unique()) <= {0.0, 1.0}
    for feature in spec.features:
        column = table[feature.name]
        if feature.kind == FeatureKind.CATEGORICAL:
            assert column.dtype == pl.Int64
            assert column.min() >= 0 and column.max() < feature.cardinality
        else:
            assert column.dtype == pl.Float64


def test_criteo_samples(shared_datasets: Path) -> None:
    folder = shared_datasets / "criteo-sample"
    train = load_ctr(CtrSourceConfig(kind="criteo", path=str(folder), min_category_count=2))
    # The folder's train file is the one fit on.
    assert train.table.height == 7_200
    assert len(train.spec.of_kind(FeatureKind.NUMERIC)) == 13
    assert len(train.spec.of_kind(FeatureKind.CATEGORICAL)) == 26
    i1 = train.spec["I1"]
    assert i1.normalization == Normalization.LOG1P and i1.min_value is not None
    _check_table(train.table, train.spec)
    for name, rows in CRITEO_ROWS.items():
        split = apply_ctr(folder / name, "criteo", train.spec)
        assert split.table.height == rows, name
        _check_table(split.table, train.spec)
    # The header+comma variant reads the same columns as the TSV (label 0/1 both).
    assert read_ctr_raw(folder / "deepctr_criteo_sample.txt", "criteo").columns[:3] == [
        "label", "I1", "I2",
    ]  # fmt: skip


def test_avazu_samples(shared_datasets: Path) -> None:
    folder = shared_datasets / "avazu-sample"
    train = load_ctr(CtrSourceConfig(kind="avazu", path=str(folder / "wide-resdnn_train.csv")))
    assert train.table.height == 8_087
    assert "id" not in train.table.columns and "hour" not in train.table.columns
    # All sample rows are from 14102100: 2014-10-21 (a Tuesday), hour 0.
    hour_code = train.spec["hour_of_day"].vocabulary.index("0") + 1
    weekday_code = train.spec["weekday"].vocabulary.index("1") + 1
    assert train.table["hour_of_day"].unique().to_list() == [hour_code]
    assert train.table["weekday"].unique().to_list() == [weekday_code]
    for name, rows in AVAZU_ROWS.items():  # dev/test have no header, the others do
        split = apply_ctr(folder / name, "avazu", train.spec)
        assert split.table.height == rows, name
        _check_table(split.table, train.spec)


def _criteo_line(label: str, ints: list[str], cats: list[str]) -> str:
    return "\t".join([label, *ints, *cats]) + "\n"


def test_vocabulary_fit_on_train_applied_to_dev(tmp_path: Path) -> None:
    ints = ["1"] * 13
    rows = [
        _criteo_line("1", ["", "-2", *ints[2:]], ["aa"] + ["x"] * 25),
        _criteo_line("0", ints, ["aa"] + ["x"] * 25),
        _criteo_line("0", ints, ["bb"] + [""] * 25),
    ]
    (tmp_path / "train.txt").write_text("".join(rows))
    (tmp_path / "dev.txt").write_text(
        _criteo_line("1", ints, ["bb"] + ["x"] * 25) + _criteo_line("0", ints, ["aa"] + ["zz"] * 25)
    )
    raw = read_ctr_raw(tmp_path / "train.txt", "criteo")
    spec = fit_ctr_spec(raw, "criteo", min_category_count=2)
    assert spec["C1"].vocabulary == ("aa",)  # "bb" seen once: out of vocabulary
    assert spec["C2"].vocabulary == ("x",)  # the single "" is rare too
    assert spec["I2"].min_value == -2.0
    # The folder's train file is fit on; dev shares its codes.
    train = load_ctr(CtrSourceConfig(kind="criteo", path=str(tmp_path), min_category_count=2))
    assert train.table["C1"].to_list() == [1, 1, 0]
    assert train.table["I1"].to_list() == [0.0, 1.0, 1.0]  # missing count -> 0
    dev = apply_ctr(tmp_path / "dev.txt", "criteo", train.spec)
    assert dev.table["C1"].to_list() == [0, 1]
    assert dev.table["C2"].to_list() == [1, 0]  # unseen "zz" -> 0


def test_unlabelled_test_file_and_bad_values(tmp_path: Path) -> None:
    ints = ["1"] * 13
    cats = ["x"] * 26
    (tmp_path / "train.txt").write_text(_criteo_line("1", ints, cats) * 2)
    spec = load_ctr(CtrSourceConfig(kind="criteo", path=str(tmp_path / "train.txt"))).spec
    (tmp_path / "test.txt").write_text("\t".join([*ints, *cats]) + "\n")
    test = apply_ctr(tmp_path / "test.txt", "criteo", spec)
    assert test.table["label"].to_list() == [None]
    (tmp_path / "bad_label.txt").write_text(_criteo_line("2", ints, cats))
    with pytest.raises(SourceError, match=r"bad_label.txt: column label: 1 label\(s\) not 0/1"):
        read_ctr_raw(tmp_path / "bad_label.txt", "criteo")
    (tmp_path / "bad_int.txt").write_text(_criteo_line("1", ["x1", *ints[1:]], cats))
    with pytest.raises(SourceError, match="bad_int.txt: column I1"):
        read_ctr_raw(tmp_path / "bad_int.txt", "criteo")
    (tmp_path / "short.txt").write_text("1\t2\t3\n")
    with pytest.raises(SourceError, match="short.txt: 3 fields"):
        read_ctr_raw(tmp_path / "short.txt", "criteo")
