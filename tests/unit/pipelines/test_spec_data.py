"""Reranker inputs from a feature spec: per-kind encoding, splits and errors."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import polars as pl
import pytest

from features.feature_spec import Entity, Feature, FeatureKind, FeatureSpec, Normalization
from pipelines.ranker.spec_data import ranker_data_from_examples, split_examples
from serving.encoding import SpecError, encode_examples


def _spec(encoded: bool = False) -> FeatureSpec:
    return FeatureSpec(
        encoded=encoded,
        features=(
            Feature(name="user_id", kind=FeatureKind.CATEGORICAL, entity=Entity.USER, dtype="int64", hash_buckets=10),
            Feature(name="item_id", kind=FeatureKind.CATEGORICAL, entity=Entity.ITEM, dtype="int64", hash_buckets=5),
            Feature(name="user_history", kind=FeatureKind.SEQUENCE, entity=Entity.USER, dtype="list[int64]", max_length=2),
            Feature(name="color", kind=FeatureKind.CATEGORICAL, entity=Entity.ITEM, dtype="string", vocabulary=("blue", "red")),
            Feature(name="clicks", kind=FeatureKind.NUMERIC, entity=Entity.USER, dtype="float64", normalization=Normalization.LOG1P),
            Feature(name="price", kind=FeatureKind.NUMERIC, entity=Entity.ITEM, dtype="float64", normalization=Normalization.STANDARD, mean=10.0, std=2.0),
        ),
    )  # fmt: skip


def _frame(n: int = 6) -> pl.DataFrame:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return pl.DataFrame(
        {
            "user_id": [0, 1, 12, None, 3, 4][:n],
            "item_id": [0, 4, 7, 1, 2, 3][:n],
            "ts": [start + dt.timedelta(hours=h) for h in range(n)],
            "label": [1.0, 0.0, 1.0, 0.0, 1.0, 0.0][:n],
            "user_history": [[1, 2, 3], [], None, [4], [0, 9], [2]][:n],
            "color": ["red", "blue", "green", None, "red", "blue"][:n],
            "clicks": [0.0, math.e - 1, None, -1.0, 3.0, 1.0][:n],
            "price": [10.0, 12.0, 8.0, None, 10.0, float("nan")][:n],
        }
    )


def test_each_kind_is_encoded_by_the_spec() -> None:
    part = encode_examples(_frame(), _spec())
    cat = part.categorical.numpy()
    # hashed ids: id mod buckets + 1, null -> 0
    assert cat[:, 0].tolist() == [1, 2, 3, 0, 4, 5]
    assert cat[:, 1].tolist() == [1, 5, 3, 2, 3, 4]
    # vocabulary strings: index + 1; unseen and null -> 0
    assert cat[:, 2].tolist() == [2, 1, 0, 0, 2, 1]
    numeric = part.numeric.numpy()
    assert numeric[:, 0] == pytest.approx([0.0, 1.0, 0.0, -math.log(2), math.log(4), math.log(2)])
    assert numeric[:, 1] == pytest.approx([0.0, 1.0, -1.0, 0.0, 0.0, 0.0])
    # history: the 2 most recent ids, coded as item_id
    history = part.sequences[0].numpy()
    assert history.tolist() == [[3, 4], [0, 0], [0, 0], [5, 0], [1, 5], [3, 0]]
    assert part.labels.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert part.users is not None and part.users.tolist() == [0, 1, 12, -1, 3, 4]


def test_encoded_tables_keep_their_codes_within_bounds() -> None:
    frame = _frame().with_columns(pl.Series("color", [2, 1, 0, 7, -1, None]))
    part = encode_examples(frame, _spec(encoded=True))
    assert part.categorical[:, 2].tolist() == [2, 1, 0, 0, 0, 0]


def test_layout_shares_the_history_with_item_ids() -> None:
    data = ranker_data_from_examples(_frame(), _spec(), "random", (0.5, 0.25, 0.25), seed=1)
    assert data.layout.categorical == (11, 6, 3)
    assert data.layout.numeric == 2
    assert data.layout.sequences[0].shared_with == 1
    assert len(data.train) + len(data.valid) + len(data.test) == 6


def test_temporal_split_never_trains_on_the_future() -> None:
    frame = pl.concat([_frame()] * 5)
    frame = frame.with_columns(
        (pl.col("ts") + pl.duration(minutes=pl.int_range(pl.len()) % 7)).alias("ts")
    )
    train, valid, test = split_examples(frame, "temporal", (0.6, 0.2, 0.2))
    assert train.height + valid.height + test.height == frame.height
    assert train.get_column("ts").max() < valid.get_column("ts").min()
    assert valid.get_column("ts").max() < test.get_column("ts").min()
    # A zero share is an empty part, not the last instant's rows.
    train, valid, test = split_examples(frame, "temporal", (0.7, 0.3, 0.0))
    assert test.height == 0 and train.height + valid.height == frame.height


def test_random_split_is_seeded() -> None:
    frame = pl.concat([_frame()] * 10)
    first = split_examples(frame, "random", seed=3)
    again = split_examples(frame, "random", seed=3)
    other = split_examples(frame, "random", seed=4)
    assert first[2].equals(again[2])
    assert not first[2].equals(other[2])


def test_missing_column_is_named() -> None:
    with pytest.raises(SpecError, match="'price'"):
        encode_examples(_frame().drop("price"), _spec())


def test_non_binary_labels_are_refused() -> None:
    with pytest.raises(SpecError, match="'label' must be 0/1"):
        encode_examples(_frame().with_columns(pl.lit(4.0).alias("label")), _spec())


def test_history_without_its_id_column_is_refused() -> None:
    spec = FeatureSpec(features=tuple(f for f in _spec().features if f.name != "item_id"))
    with pytest.raises(SpecError, match="'item_id'"):
        encode_examples(_frame(), spec)


def test_an_empty_split_part_is_refused() -> None:
    with pytest.raises(SpecError, match="empty"):
        ranker_data_from_examples(_frame(2), _spec(), "temporal", (0.5, 0.5, 0.0))


def test_empty_frames_encode_to_empty_parts() -> None:
    part = encode_examples(_frame().head(0), _spec())
    assert len(part) == 0 and part.numeric.shape == (0, 2)
    assert np.asarray(part.sequences[0]).shape == (0, 2)


def test_sample_keeps_rows_whole_and_in_order() -> None:
    part = encode_examples(pl.concat([_frame()] * 5), _spec())
    sample = part.sample(7, seed=1)
    assert len(sample) == 7 and sample.users is not None
    assert sample.categorical[:, 0].tolist() == [
        u % 10 + 1 if u >= 0 else 0 for u in sample.users.tolist()
    ]
    assert part.sample(7, seed=1).labels.equal(sample.labels)
    assert part.sample(100, seed=1) is part


def test_second_task_targets_keep_missing_values_as_nan() -> None:
    spec = _spec().model_copy(update={"labels": ("label", "rating")})
    frame = _frame().with_columns(
        pl.Series("rating", [5.0, None, 2.0, None, None, 4.0], dtype=pl.Float64)
    )
    part = encode_examples(frame, spec)
    rating = part.targets["rating"].numpy()
    assert np.isnan(rating).tolist() == [False, True, False, True, True, False]
    assert rating[[0, 2, 5]].tolist() == [5.0, 2.0, 4.0]
    # Sampling keeps each target with its row.
    sample = part.sample(3, seed=0)
    assert sample.targets["rating"].shape == (3,)
    # Serving rows have no target; a table without the column has none either.
    assert encode_examples(frame, spec, labelled=False).targets == {}
    assert encode_examples(_frame(), spec).targets == {}


def test_a_non_numeric_target_is_named() -> None:
    spec = _spec().model_copy(update={"labels": ("label", "rating")})
    frame = _frame().with_columns(pl.lit("five").alias("rating"))
    with pytest.raises(SpecError, match="'rating' must be numeric"):
        encode_examples(frame, spec)
