"""Encoded examples on storage: the split-and-encode pass, chunked, equals encoding the whole."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from features.dataset import write_table
from features.feature_spec import Entity, Feature, FeatureKind, FeatureSpec, Normalization
from infra.storage import StoragePath
from pipelines.ranker.encoded import (
    concat_parts,
    encode_split_examples,
    iter_file_parts,
    part_from_table,
    part_to_table,
    split_examples_to_parquet,
    temporal_cuts,
)
from pipelines.ranker.spec_data import split_examples
from serving.encoding import RankerPart, encode_examples


def _spec() -> FeatureSpec:
    return FeatureSpec(
        features=(
            Feature(name="user_id", kind=FeatureKind.CATEGORICAL, entity=Entity.USER, dtype="int64", hash_buckets=50),
            Feature(name="item_id", kind=FeatureKind.CATEGORICAL, entity=Entity.ITEM, dtype="int64", hash_buckets=20),
            Feature(name="user_history", kind=FeatureKind.SEQUENCE, entity=Entity.USER, dtype="list[int64]", max_length=3),
            Feature(name="price", kind=FeatureKind.NUMERIC, entity=Entity.ITEM, dtype="float64", normalization=Normalization.STANDARD, mean=1.0, std=2.0),
        ),
        labels=("label", "rating"),
    )  # fmt: skip


def _frame(n: int = 500, seed: int = 0) -> pl.DataFrame:
    """Rows over 5 days, several sharing one instant (a cut must keep them together)."""
    rng = np.random.default_rng(seed)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    minutes = np.sort(rng.integers(0, 5 * 24 * 60 // 7, n)) * 7
    return pl.DataFrame(
        {
            "user_id": rng.integers(0, 40, n),
            "item_id": rng.integers(0, 30, n),
            "ts": [start + dt.timedelta(minutes=int(m)) for m in minutes],
            "label": (rng.random(n) < 0.3).astype(np.float64),
            "rating": pl.Series(
                np.where(rng.random(n) < 0.2, rng.integers(1, 6, n), -1), dtype=pl.Int64
            ).replace(-1, None),
            "user_history": [list(rng.integers(0, 30, rng.integers(0, 5))) for _ in range(n)],
            "price": rng.normal(1.0, 2.0, n),
        }
    )


def _files(frame: pl.DataFrame, folder: Path, pieces: int) -> list[StoragePath]:
    """``frame`` written as ``pieces`` files (a date-partitioned table's shape)."""
    root = StoragePath.from_uri(folder)
    files = []
    for index, piece in enumerate(np.array_split(np.arange(frame.height), pieces)):
        path = root.join(f"part-{index:05d}.parquet")
        write_table(frame[piece], path)
        files.append(path)
    return files


def _same(a: RankerPart, b: RankerPart) -> None:
    assert torch.equal(a.categorical, b.categorical)
    assert torch.equal(a.numeric, b.numeric)
    assert all(torch.equal(x, y) for x, y in zip(a.sequences, b.sequences, strict=True))
    assert torch.equal(a.labels, b.labels)
    assert a.users is not None and b.users is not None and torch.equal(a.users, b.users)
    assert a.targets.keys() == b.targets.keys()
    for name in a.targets:
        assert torch.equal(a.targets[name].isnan(), b.targets[name].isnan())
        assert torch.equal(a.targets[name].nan_to_num(), b.targets[name].nan_to_num())


def test_a_part_survives_arrow_and_slicing() -> None:
    part = encode_examples(_frame(50), _spec())
    table = part_to_table(part)
    _same(part_from_table(table), part)
    # A Ray Data batch is often a slice of a larger table: its offset must be honoured.
    _same(part_from_table(table.slice(10, 7)), part.rows(slice(10, 17)))


def test_the_temporal_cut_is_exact_and_bounded_by_a_day() -> None:
    frame = _frame()
    cuts = temporal_cuts(frame.lazy(), (0.8, 0.1, 0.1))
    _, valid, test = split_examples(frame, "temporal", (0.8, 0.1, 0.1))
    assert cuts[0] == valid.get_column("ts").min()
    assert cuts[1] == test.get_column("ts").min()
    # A ratio of 0 at the end leaves that part empty.
    assert temporal_cuts(frame.lazy(), (0.5, 0.5, 0.0))[1] is None


def test_chunked_split_and_encode_equal_the_in_memory_path(tmp_path: Path) -> None:
    frame = _frame()
    files = _files(frame, tmp_path / "examples", pieces=3)
    scratch = StoragePath.from_uri(tmp_path / "scratch")
    raw = split_examples_to_parquet(
        files, scratch.join("raw"), "temporal", (0.8, 0.1, 0.1), seed=0, chunk_rows=64
    )
    encoded = encode_split_examples(raw, _spec(), scratch.join("encoded"), chunk_rows=50)
    expected = split_examples(frame, "temporal", (0.8, 0.1, 0.1))
    for name, rows in zip(("train", "valid", "test"), expected, strict=True):
        assert encoded.rows[name] == rows.height
        assert encoded.positives[name] == int(rows.get_column("label").sum())
        # Files hold at most a chunk; rows come back in table order.
        read = list(iter_file_parts(encoded.files(name), batch_rows=1000))
        assert all(len(p) <= 50 for p in read)
        _same(concat_parts(read), encode_examples(rows, _spec()))
    ratings = expected[0].get_column("rating").drop_nulls()
    assert encoded.targets["rating"].rows == ratings.len()
    assert encoded.targets["rating"].mean == pytest.approx(float(ratings.mean()))  # type: ignore[arg-type]
    assert encoded.layout.categorical == (51, 21)
    # What the trainers' loop config carries stays small, whatever the rows.
    assert len(repr(encoded)) < 1000


def test_a_random_split_does_not_depend_on_the_chunking(tmp_path: Path) -> None:
    frame = _frame().drop("ts")
    files = _files(frame, tmp_path / "examples", pieces=2)
    counts = []
    for chunk_rows in (37, 500):
        out = StoragePath.from_uri(tmp_path / f"split-{chunk_rows}")
        split = split_examples_to_parquet(files, out, "random", (0.6, 0.2, 0.2), 3, chunk_rows)
        counts.append(split.rows)
        assert (
            split.scan("valid")
            .collect()
            .equals(
                split_examples_to_parquet(
                    files, out.join("again"), "random", (0.6, 0.2, 0.2), 3, 500
                )
                .scan("valid")
                .collect()
            )
        )
    assert counts[0] == counts[1]
    assert sum(counts[0].values()) == frame.height
    assert 0.45 < counts[0]["train"] / frame.height < 0.75


def test_streamed_training_reads_every_row_once_an_epoch_and_learns(tmp_path: Path) -> None:
    from infra.config import RankerConfig
    from pipelines.ranker.loop import configs_from, shuffled_batches, train_streamed

    frame = _frame(3000)
    # A learnable click: the item's parity.
    frame = frame.with_columns((pl.col("item_id") % 2).cast(pl.Float64).alias("label"))
    files = _files(frame, tmp_path / "examples", pieces=4)
    scratch = StoragePath.from_uri(tmp_path / "scratch")
    raw = split_examples_to_parquet(files, scratch.join("raw"), "temporal", (0.8, 0.1, 0.1), 0, 500)
    encoded = encode_split_examples(raw, _spec(), scratch.join("encoded"), chunk_rows=300)
    model, loop = configs_from(
        RankerConfig(kind="logistic", epochs=3, batch_size=64, learning_rate=0.05)
    )
    result = train_streamed(model, loop, encoded, shuffle_rows=700)
    assert [row["train_rows"] for row in result.history] == [encoded.rows["train"]] * 3
    assert result.best_valid_auc > 0.9
    # The buffer mixes rows and loses none.
    parts = list(iter_file_parts(encoded.files("train"), 300))
    batches = list(shuffled_batches(parts, 64, 700, torch.Generator().manual_seed(0)))
    assert all(len(b) == 64 for b in batches[:-1])
    assert sorted(concat_parts(batches).labels.tolist()) == sorted(
        concat_parts(parts).labels.tolist()
    )
