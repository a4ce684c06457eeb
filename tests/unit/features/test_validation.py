"""Validation: every kind of bad row is quarantined with a reason that names its column."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.feature_spec import Entity, Feature, FeatureKind, FeatureSpec, Normalization
from features.schemas import EVENTS, USERS, contract_for_spec
from features.validation import ValidationRules, combine, validate_table
from infra.errors import DataValidationError
from infra.storage import StoragePath

RULES = ValidationRules(ts_max=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))


def _raw(**columns: list[object]) -> pl.DataFrame:
    base: dict[str, list[object]] = {
        "user_id": ["1", "2", "3"],
        "item_id": ["10", "11", "12"],
        "ts": ["881250949", "881250950", "881250951"],
        "event_type": ["rating"] * 3,
        "label": ["1", "0", "1"],
    }
    base.update(columns)
    return pl.DataFrame(base, schema=dict.fromkeys(base, pl.String))


def test_clean_raw_strings_are_typed_to_the_contract() -> None:
    result = validate_table(_raw(), EVENTS, RULES)
    assert result.quarantined.height == 0
    assert result.valid.schema == EVENTS.polars_schema
    assert result.valid["ts"][0] == dt.datetime(1997, 12, 4, 15, 55, 49, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("user_id", "abc", "user_id: not a valid Int64 ('abc')"),
        ("user_id", "1.5", "user_id: not a valid Int64 ('1.5')"),
        ("user_id", None, "user_id: null in a required column"),
        ("item_id", "", "item_id: null in a required column"),
        ("item_id", "-4", "item_id: below 0 ('-4')"),
        ("ts", "12", "ts: before 1990-01-01 ('12')"),
        ("ts", "4102444800", "ts: after 2030-01-01 00:00 ('4102444800')"),
        ("ts", "yesterday", "ts: not a valid Datetime"),
        (
            "event_type",
            "like",
            "event_type: not one of impression|click|rating|purchase|view ('like')",
        ),
        ("label", "yes", "label: not a valid Float64 ('yes')"),
    ],
)
def test_each_bad_value_is_quarantined_with_its_reason(
    column: str, value: object, reason: str
) -> None:
    values = [value, *_raw()[column].to_list()[1:]]
    result = validate_table(_raw(**{column: values}), EVENTS, RULES)
    assert result.valid.height == 2
    assert result.quarantined.height == 1
    assert result.quarantined["_reason"][0].startswith(reason)
    assert result.quarantined["_source_row"][0] == 0


def test_unknown_ids_are_out_of_range() -> None:
    known = {"user_id": pl.Series([1, 2]), "item_id": pl.Series([10, 11, 12])}
    result = validate_table(_raw(), EVENTS, RULES, known_ids=known)
    assert result.quarantined["_reason"].to_list() == [
        "user_id: id out of range (unknown entity) ('3')"
    ]


def test_duplicate_entity_ids_are_quarantined() -> None:
    users = pl.DataFrame({"user_id": [1, 2, 2], "age": [30, 40, 50]})
    result = validate_table(users, USERS, RULES)
    assert result.valid["user_id"].to_list() == [1]
    assert result.reason_counts == {"user_id: duplicate id": 2}


def test_a_row_with_several_problems_lists_them_all() -> None:
    result = validate_table(_raw(user_id=["x", "2", "3"], label=["?", "0", "1"]), EVENTS, RULES)
    assert (
        result.quarantined["_reason"][0]
        == "user_id: not a valid Int64 ('x'); label: not a valid Float64 ('?')"
    )


def test_missing_required_column_fails_at_once_naming_it() -> None:
    with pytest.raises(DataValidationError, match="required column\\(s\\) item_id missing"):
        validate_table(_raw().drop("item_id"), EVENTS, RULES)


def test_bound_names_table_column_and_count() -> None:
    result = validate_table(_raw(user_id=[None, None, "3"]), EVENTS, RULES)
    result.raise_if_over_bound(0.7)  # 2/3 bad is under a 70% bound
    with pytest.raises(DataValidationError) as err:
        result.raise_if_over_bound(0.5, source="u.data")
    assert str(err.value).startswith(
        "events in u.data: 2 of 3 rows are bad (66.67% > bound 50.00%)"
    )
    assert "worst: user_id: null in a required column (2 rows)" in str(err.value)


def test_combined_parts_add_up() -> None:
    parts = [
        validate_table(_raw(user_id=[None, "2", "3"]), EVENTS, RULES),
        validate_table(_raw(), EVENTS, RULES),
    ]
    total = combine(parts)
    assert (total.n_valid, total.quarantined.height, total.n_rows) == (5, 1, 6)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(st.none(), st.text(max_size=6), st.integers(-5, 10**6).map(str)),
        min_size=1,
        max_size=30,
    )
)
def test_no_row_is_lost(user_ids: list[str | None]) -> None:
    """Whatever comes in, every row ends up either valid or quarantined, never both."""
    n = len(user_ids)
    raw = pl.DataFrame(
        {
            "user_id": user_ids,
            "item_id": ["1"] * n,
            "ts": ["881250949"] * n,
            "event_type": ["click"] * n,
            "label": ["1"] * n,
        },
        schema=dict.fromkeys(["user_id", "item_id", "ts", "event_type", "label"], pl.String),
    )
    result = validate_table(raw, EVENTS, RULES)
    assert result.valid.height + result.quarantined.height == n
    assert (result.valid["user_id"] >= 0).all()


def test_ctr_contract_follows_the_feature_spec(tmp_path) -> None:
    spec = FeatureSpec(
        features=(
            Feature(
                name="C1",
                kind=FeatureKind.CATEGORICAL,
                entity=Entity.EXAMPLE,
                dtype="int64",
                vocabulary=("a", "b"),
            ),
            Feature(
                name="I1",
                kind=FeatureKind.NUMERIC,
                entity=Entity.EXAMPLE,
                dtype="float64",
                normalization=Normalization.LOG1P,
            ),
        )
    )
    table = pl.DataFrame({"label": [0.0, 1.0, 2.0], "C1": [0, 2, 3], "I1": [1.5, None, 3.0]})
    result = validate_table(table, contract_for_spec(spec), RULES)
    assert result.quarantined["_reason"].to_list() == ["label: above 1 ('2.0'); C1: above 2 ('3')"]
    spec.save(StoragePath.from_uri(tmp_path))
    assert FeatureSpec.load(StoragePath.from_uri(tmp_path)) == spec


def test_feature_spec_rejects_inconsistent_features() -> None:
    with pytest.raises(ValueError, match="exactly one of vocabulary or hash_buckets"):
        Feature(name="c", kind=FeatureKind.CATEGORICAL, entity=Entity.ITEM, dtype="string")
    with pytest.raises(ValueError, match="needs max_length"):
        Feature(name="hist", kind=FeatureKind.SEQUENCE, entity=Entity.USER, dtype="list[int64]")
    f = Feature(
        name="c",
        kind=FeatureKind.CATEGORICAL,
        entity=Entity.ITEM,
        dtype="string",
        hash_buckets=1000,
    )
    with pytest.raises(ValueError, match="duplicate feature names"):
        FeatureSpec(features=(f, f))
    assert f.cardinality == 1000


def test_schema_check_names_the_column_and_the_expected_type() -> None:
    from features.schemas import check_schema

    good = EVENTS.polars_schema
    check_schema(good, EVENTS, "features: events")
    wrong = pl.Schema({**dict(good), "label": pl.String()})
    with pytest.raises(
        DataValidationError, match="column 'label' has type String, expected Float64"
    ):
        check_schema(wrong, EVENTS, "features: events")
    missing = pl.Schema({k: v for k, v in good.items() if k != "ts"})
    with pytest.raises(DataValidationError, match="column 'ts' is missing"):
        check_schema(missing, EVENTS, "features: events")
