"""Train / valid / test splits: RecBole's counts, disjoint parts, determinism, the cut rules."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.schemas import EVENTS, TS_DTYPE
from features.sources.movielens import read_movielens
from features.splits import (
    Split,
    given_split,
    leave_last_out,
    make_split,
    random_split,
    split_counts,
    temporal_split,
    user_item_matrix,
)
from features.validation import validate_table
from infra.config import SplitConfig
from infra.errors import ConfigError, DataValidationError

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SCHEMA = {"user_id": pl.Int64, "item_id": pl.Int64, "ts": TS_DTYPE, "label": pl.Float64}

# RecBole's _calcu_split_ids for 8:1:1, by hand. Valid and test first get int(0.1 * n)
# (0 below n = 10, 1 from 10 to 19), train the rest; then, last part first and while
# train keeps more than one, a part whose exact share 0.1 * n lies in (0, 1) takes one
# from train:
#   n=1: (1, 0, 0), train already at 1, nothing moves
#   n=2: (2, 0, 0) -> test takes one -> (1, 0, 1), train at 1, stop
#   n=3: (3, 0, 0) -> (2, 0, 1) -> (1, 1, 1)
#   n=4..9: (n - 2, 1, 1)
#   n=10..12: shares are >= 1, nothing moves: (n - 2, 1, 1)
RECBOLE_8_1_1 = {
    1: (1, 0, 0),
    2: (1, 0, 1),
    3: (1, 1, 1),
    4: (2, 1, 1),
    5: (3, 1, 1),
    6: (4, 1, 1),
    7: (5, 1, 1),
    8: (6, 1, 1),
    9: (7, 1, 1),
    10: (8, 1, 1),
    11: (9, 1, 1),
    12: (10, 1, 1),
}
# 6:2:2: n=4: int(0.8) = 0 for both, both take one -> (2, 1, 1); n=5: int(1.0) = 1 -> (3, 1, 1);
# n=7: int(1.4) = 1 -> (5, 1, 1); n=10: (6, 2, 2).
RECBOLE_6_2_2 = {
    1: (1, 0, 0),
    2: (1, 0, 1),
    4: (2, 1, 1),
    5: (3, 1, 1),
    7: (5, 1, 1),
    10: (6, 2, 2),
}


def _frame(rows: list[tuple[int, int, int]]) -> pl.DataFrame:
    """(user, item, hour) rows -> an interaction frame; label numbers the rows."""
    return pl.DataFrame(
        [(u, i, T0 + dt.timedelta(hours=h), float(k)) for k, (u, i, h) in enumerate(rows)],
        schema=SCHEMA,
        orient="row",
    )


def _users_with_sizes(sizes: list[int]) -> pl.DataFrame:
    rows = [(u, 100 + j, (7 * j) % n) for u, n in enumerate(sizes) for j in range(n)]
    return _frame(rows)


def _random_log(seed: int, n_rows: int = 400) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = list(
        zip(
            rng.integers(0, 30, n_rows).tolist(),
            rng.integers(0, 50, n_rows).tolist(),
            rng.integers(0, 24, n_rows).tolist(),  # coarse hours: many ts ties
            strict=True,
        )
    )
    return _frame(rows + rows[:20])  # 20 repeated keys


def _counts(part: pl.DataFrame) -> dict[int, int]:
    return dict(part.group_by("user_id").len().iter_rows())


def _assert_disjoint_and_complete(frame: pl.DataFrame, split: Split) -> None:
    parts = [split.train, split.valid, split.test]
    for part in parts:
        assert part.columns == frame.columns
    keys = [set(p.select("user_id", "item_id", "ts").iter_rows()) for p in parts]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    together = pl.concat(parts).sort(pl.all())
    assert together.equals(frame.sort(pl.all()))


# --------------------------------------------------------------------------- random


def test_split_counts_match_recbole_by_hand() -> None:
    for n, expected in RECBOLE_8_1_1.items():
        assert split_counts(n, (0.8, 0.1, 0.1)) == expected, n
    for n, expected in RECBOLE_6_2_2.items():
        assert split_counts(n, (0.6, 0.2, 0.2)) == expected, n
    # Ratios need not be normalised (RecBole divides by their sum).
    assert split_counts(10, (8, 1, 1)) == (8, 1, 1)


def test_random_split_per_user_counts_follow_recbole() -> None:
    sizes = list(RECBOLE_8_1_1)
    frame = _users_with_sizes(sizes)
    split = random_split(frame, (0.8, 0.1, 0.1), seed=0)
    counts = [_counts(p) for p in (split.train, split.valid, split.test)]
    for user, n in enumerate(sizes):
        assert tuple(c.get(user, 0) for c in counts) == RECBOLE_8_1_1[n], n
    assert split.protocol == "random ratios=0.8/0.1/0.1 seed=0"


def test_random_split_is_seeded_and_independent_of_row_order() -> None:
    frame = _random_log(0)
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=11)
    a, b = random_split(frame, seed=5), random_split(shuffled, seed=5)
    for part in ("train", "valid", "test"):
        # Rows repeating a key keep their input order (the log repeats 20 keys with other
        # labels), so compare contents; every key lands in the same part either way.
        assert getattr(a, part).sort(pl.all()).equals(getattr(b, part).sort(pl.all()))
    other = random_split(frame, seed=6)
    assert not other.test.equals(a.test)


def test_every_protocol_is_disjoint_and_complete() -> None:
    frame = _random_log(1)
    for split in (
        random_split(frame, seed=2),
        temporal_split(frame, 0.1, 0.2),
        leave_last_out(frame),
    ):
        _assert_disjoint_and_complete(frame, split)


def test_repeated_keys_stay_together() -> None:
    # User 0 logs item 1 twice at hour 4 (labels 4.0 and 5.0): both rows go to the same part.
    frame = _frame([(0, 9, 0), (0, 8, 1), (0, 7, 2), (0, 6, 3), (0, 1, 4), (0, 1, 4)])
    for split in (random_split(frame, seed=s) for s in range(10)):
        holding = [p for p in (split.train, split.valid, split.test) if 1 in p["item_id"]]
        assert len(holding) == 1 and holding[0].filter(pl.col("item_id") == 1).height == 2


def test_empty_frame_gives_empty_parts() -> None:
    empty = _frame([])
    for split in (random_split(empty), temporal_split(empty, 0.1, 0.1), leave_last_out(empty)):
        assert split.sizes() == {"train": 0, "valid": 0, "test": 0}


# --------------------------------------------------------------------------- leave last out


def test_leave_last_out_takes_the_last_by_ts_then_item() -> None:
    # User 0 in time order: item 9 (h1), item 1 (h2), then items 5 and 2 tie at h3 and
    # item_id breaks the tie: 2 before 5. So test = 5, valid = 2, train = {9, 1}.
    # User 1 has two interactions: both stay in train.
    frame = _frame([(0, 5, 3), (0, 2, 3), (0, 9, 1), (0, 1, 2), (1, 4, 0), (1, 3, 1)])
    split = leave_last_out(frame)
    assert split.test.select("user_id", "item_id").rows() == [(0, 5)]
    assert split.valid.select("user_id", "item_id").rows() == [(0, 2)]
    assert split.train.select("user_id", "item_id").rows() == [(0, 9), (0, 1), (1, 4), (1, 3)]


# --------------------------------------------------------------------------- temporal


def test_temporal_cut_puts_later_parts_after_train() -> None:
    frame = _random_log(2)
    split = temporal_split(frame, valid_fraction=0.1, test_fraction=0.2)
    assert split.train["ts"].max() < split.valid["ts"].min()
    assert split.valid["ts"].max() < split.test["ts"].min()
    # Rows at a cut go to the later part, so test holds at least its share.
    assert split.test.height >= round(0.2 * frame.height)


def test_temporal_ties_at_the_cut_go_later() -> None:
    # 10 rows at hours 0..6, 7, 7, 7. test_fraction 0.2: cut at row 10 - 2 = 8 (hour 7), so
    # all three hour-7 rows are test; valid_fraction 0.1: row 10 - 3 = 7, also hour 7, so
    # valid is empty.
    frame = _frame([(0, i, min(i, 7)) for i in range(10)])
    split = temporal_split(frame, valid_fraction=0.1, test_fraction=0.2)
    assert split.sizes() == {"train": 7, "valid": 0, "test": 3}
    with pytest.raises(ValueError, match="sum below 1"):
        temporal_split(frame, 0.5, 0.5)


# --------------------------------------------------------------------------- given, dispatch


def test_given_split_checks_columns_and_overlap() -> None:
    train = _frame([(0, 1, 0), (0, 2, 1)])
    test = _frame([(0, 3, 2)])
    split = given_split(train, test)
    assert split.sizes() == {"train": 2, "valid": 0, "test": 1}
    assert split.protocol == "given"
    with pytest.raises(DataValidationError, match="given test frame has no 'item_id' column"):
        given_split(train, test.drop("item_id"))
    with pytest.raises(DataValidationError, match="in both train and test"):
        given_split(train, pl.concat([test, train.head(1)]))
    with pytest.raises(DataValidationError, match="'ts' must be a datetime"):
        given_split(train.with_columns(pl.col("ts").dt.epoch("s")), test)


def test_make_split_dispatches_by_kind() -> None:
    frame = _random_log(3)
    by_random = make_split(frame, SplitConfig(kind="random", seed=4))
    assert by_random.test.equals(random_split(frame, (0.8, 0.1, 0.1), seed=4).test)
    by_time = make_split(frame, SplitConfig(kind="temporal", ratios=(0.7, 0.1, 0.2)))
    assert by_time.test.equals(temporal_split(frame, 0.1, 0.2).test)
    assert make_split(frame, SplitConfig(kind="leave_last_out")).test.equals(
        leave_last_out(frame).test
    )
    with pytest.raises(ConfigError, match="given_split"):
        make_split(frame, SplitConfig(kind="given"))


def test_split_config_validates_ratios() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        SplitConfig(ratios=(0.8, 0.1, 0.2))
    with pytest.raises(ValueError, match="positive"):
        SplitConfig(ratios=(1.0, 0.0, 0.0))


def test_user_item_matrix_is_csr_of_distinct_items() -> None:
    frame = _frame([(2, 7, 0), (0, 5, 1), (2, 3, 2), (2, 7, 3)])
    indptr, indices = user_item_matrix(frame, n_users=4)
    assert indptr.tolist() == [0, 1, 1, 3, 3]
    assert indices.tolist() == [5, 3, 7]
    assert indptr.dtype == indices.dtype == np.int64
    with pytest.raises(DataValidationError, match="user ids"):
        user_item_matrix(frame, n_users=2)


# --------------------------------------------------------------------------- real data


def test_movielens_100k_random_8_1_1(shared_datasets: Path) -> None:
    tables = read_movielens(shared_datasets / "ml-100k")
    events = validate_table(tables.events, EVENTS).valid
    split = random_split(events, (0.8, 0.1, 0.1), seed=0)
    _assert_disjoint_and_complete(events, split)
    per_user = events.group_by("user_id").len().get_column("len").to_list()
    expected = np.sum([split_counts(n, (0.8, 0.1, 0.1)) for n in per_user], axis=0)
    assert tuple(split.sizes().values()) == tuple(expected.tolist())
    assert split.train["user_id"].n_unique() == split.test["user_id"].n_unique() == 943
