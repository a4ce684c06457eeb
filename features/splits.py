"""Train / valid / test splits of an interaction frame, for offline evaluation.

Input: a frame with at least ``user_id``, ``item_id`` (integer ids) and ``ts``
(a datetime), typically the validated events filtered to the interactions to
learn from (e.g. positives). Every split returns a :class:`Split` whose parts
keep the input's columns, sorted by ``(user_id, ts, item_id)``.

The unit of a split is the interaction key ``(user_id, item_id, ts)``: rows
that repeat a key always land in the same part, so no key is ever in two parts
(a repeated key is one interaction logged twice, and splitting it would leak
the test answer into training). Counts below are counts of distinct keys.

========================= =================================================================
protocol                  rule
========================= =================================================================
``random``                RecBole's ``RO`` + ``RS`` (random ordering, ratio split, grouped
                          by user): each user's keys are shuffled with a seeded RNG and
                          split by :func:`split_counts`, RecBole's ``_calcu_split_ids``.
                          Keys are sorted before the shuffle, so the result depends on
                          the seed only, not on the input's row order.
``temporal``              one global time cut per later part: with ``n`` rows sorted by
                          ``ts``, the test part starts at the ``ts`` of row
                          ``n - round(test_fraction * n)`` and valid at row ``n -
                          round((valid_fraction + test_fraction) * n)``; rows *at* a cut
                          go to the later part, so every train row is strictly before
                          every valid row, and every valid row strictly before every
                          test row (ties at a cut can make a later part a little larger
                          than its fraction).
``leave_last_out``        per user, keys ordered by ``ts`` then ``item_id``: the last is
                          test, the second last valid, the rest train. A user with fewer
                          than 3 keys keeps them all in train (RecBole would move one to
                          test from 2; here a user is evaluated only with a history, a
                          valid and a test item).
``given``                 fixed files the caller has read (e.g. with
                          :func:`features.sources.files.read_user_item_lines` and encoded
                          with one id map for all files): :func:`given_split` only checks
                          the columns and that no key is in two files.
========================= =================================================================

:func:`user_item_matrix` turns a part into the CSR arrays of
``models.metrics.UserItems`` (this layer does not import models).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from infra.config import SplitConfig
from infra.errors import ConfigError, DataValidationError

KEY = ("user_id", "item_id", "ts")
# Canonical order of keys and of every output part.
ORDER = ("user_id", "ts", "item_id")
PARTS = ("train", "valid", "test")
_PART = "_split_part"


@dataclass(frozen=True)
class Split:
    """Three disjoint parts of one frame (``valid`` is empty where the protocol has none)."""

    train: pl.DataFrame
    valid: pl.DataFrame
    test: pl.DataFrame
    # The rule and its parameters, e.g. "random ratios=0.8/0.1/0.1 seed=0".
    protocol: str

    def sizes(self) -> dict[str, int]:
        """Rows per part."""
        return {"train": self.train.height, "valid": self.valid.height, "test": self.test.height}


# --------------------------------------------------------------------------- protocols


def random_split(
    frame: pl.DataFrame, ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> Split:
    """RecBole's random-ordering ratio split grouped by user (module doc); seeded, order-free."""
    _check_frame(frame, "frame")
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"ratios must be 3 non-negative shares, got {tuple(ratios)}")
    keys = _keys(frame)
    rng = np.random.default_rng(seed)
    shuffled = keys.with_columns(pl.Series("_shuffle", rng.permutation(keys.height))).sort(
        "user_id", "_shuffle"
    )
    sizes = shuffled.group_by("user_id").len("_n").get_column("_n").unique()
    bounds = pl.DataFrame(
        [(n, *np.cumsum(split_counts(n, ratios))[:2]) for n in sizes.to_list()],
        schema={"_n": pl.UInt32, "_train_end": pl.Int64, "_valid_end": pl.Int64},
        orient="row",
    )
    assigned = (
        shuffled.with_columns(
            pl.int_range(pl.len()).over("user_id").alias("_pos"),
            pl.len().over("user_id").cast(pl.UInt32).alias("_n"),
        )
        .join(bounds, on="_n", how="left")
        .select(
            *KEY,
            pl.when(pl.col("_pos") < pl.col("_train_end"))
            .then(0)
            .when(pl.col("_pos") < pl.col("_valid_end"))
            .then(1)
            .otherwise(2)
            .alias(_PART),
        )
    )
    shares = "/".join(f"{r:g}" for r in ratios)
    return _partition(frame, assigned, f"random ratios={shares} seed={seed}")


def split_counts(total: int, ratios: Sequence[float]) -> tuple[int, ...]:
    """Part sizes of ``total`` interactions, RecBole's ``Dataset._calcu_split_ids`` exactly.

    Ratios are normalised to sum 1; every part but the first gets
    ``int(ratio * total)`` (rounded down); the first gets the rest. Then, from
    the last part backwards and while the first keeps more than one, a part
    whose exact share ``ratio * total`` lies strictly between 0 and 1 (so it
    rounded down to nothing) takes one interaction from the first. Hence 8:1:1
    gives 1 -> (1, 0, 0), 2 -> (1, 0, 1), 3 -> (1, 1, 1), 9 -> (7, 1, 1),
    10 -> (8, 1, 1), 20 -> (16, 2, 2). Float products are Python's, as in
    RecBole (``0.1 * 30`` is ``3.0000000000000004``, ``int`` gives 3).
    """
    tot_ratio = sum(ratios)
    shares = [r / tot_ratio for r in ratios]
    counts = [int(share * total) for share in shares]
    counts[0] = total - sum(counts[1:])
    for i in range(1, len(shares)):
        if counts[0] <= 1:
            break
        if 0 < shares[-i] * total < 1:
            counts[-i] += 1
            counts[0] -= 1
    return tuple(counts)


def temporal_split(frame: pl.DataFrame, valid_fraction: float, test_fraction: float) -> Split:
    """Global time cuts at ts quantiles; rows at a cut go to the later part (module doc)."""
    _check_frame(frame, "frame")
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1:
        raise ValueError(
            "valid_fraction and test_fraction must be >= 0 with a sum below 1, got "
            f"{valid_fraction} and {test_fraction}"
        )
    n = frame.height
    n_test = round(test_fraction * n)
    n_later = round((valid_fraction + test_fraction) * n)
    ts_sorted = frame.get_column("ts").sort()
    test_from = ts_sorted[n - n_test] if n_test > 0 else None
    valid_from = ts_sorted[n - n_later] if n_later > n_test else test_from
    ts = pl.col("ts")
    part = pl.lit(0)
    if valid_from is not None:
        part = pl.when(ts >= pl.lit(valid_from, dtype=ts_sorted.dtype)).then(1).otherwise(part)
    if test_from is not None:
        part = pl.when(ts >= pl.lit(test_from, dtype=ts_sorted.dtype)).then(2).otherwise(part)
    assigned = _keys(frame).with_columns(part.alias(_PART))
    protocol = f"temporal valid_from={valid_from} test_from={test_from}"
    return _partition(frame, assigned, protocol)


def leave_last_out(frame: pl.DataFrame) -> Split:
    """Per user: last key (by ts, then item_id) -> test, second last -> valid (module doc)."""
    _check_frame(frame, "frame")
    from_end = (pl.len() - 1 - pl.int_range(pl.len())).over("user_id")
    n = pl.len().over("user_id")
    assigned = _keys(frame).with_columns(
        pl.when(n < 3)
        .then(0)
        .when(from_end == 0)
        .then(2)
        .when(from_end == 1)
        .then(1)
        .otherwise(0)
        .alias(_PART)
    )
    return _partition(frame, assigned, "leave_last_out")


def given_split(
    train: pl.DataFrame, test: pl.DataFrame, valid: pl.DataFrame | None = None
) -> Split:
    """Fixed parts read by the caller; checks their columns and that they share no key.

    ``valid`` defaults to an empty frame shaped like ``train``. Ids must come from one
    encoding across the files (encode them together).
    """
    parts = {"train": train, "valid": train.clear() if valid is None else valid, "test": test}
    for name, part in parts.items():
        _check_frame(part, f"given {name} frame")
    keys = {name: part.select(KEY).unique() for name, part in parts.items()}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        shared = keys[a].join(keys[b], on=KEY, how="semi")
        if shared.height:
            example = shared.sort(ORDER).row(0, named=True)
            raise DataValidationError(
                f"given split: {shared.height} (user_id, item_id, ts) key(s) are in both {a} "
                f"and {b}, e.g. {example}"
            )
    return Split(
        *(_canonical(parts[name]) for name in PARTS),
        protocol="given",
    )


def make_split(frame: pl.DataFrame, config: SplitConfig) -> Split:
    """The split ``config.kind`` names, with ``config``'s ratios and seed."""
    if config.kind == "given":
        raise ConfigError(
            "models.split.kind=given: the parts come from fixed files; read them and "
            "call features.splits.given_split(train, test, valid)"
        )
    return _SPLITTERS[config.kind](frame, config)


def _random_from_config(frame: pl.DataFrame, config: SplitConfig) -> Split:
    return random_split(frame, config.ratios, config.seed)


def _temporal_from_config(frame: pl.DataFrame, config: SplitConfig) -> Split:
    return temporal_split(frame, valid_fraction=config.ratios[1], test_fraction=config.ratios[2])


def _leave_last_out_from_config(frame: pl.DataFrame, config: SplitConfig) -> Split:
    return leave_last_out(frame)


_SPLITTERS: dict[str, Callable[[pl.DataFrame, SplitConfig], Split]] = {
    "random": _random_from_config,
    "temporal": _temporal_from_config,
    "leave_last_out": _leave_last_out_from_config,
}


# --------------------------------------------------------------------------- evaluation input


def user_item_matrix(frame: pl.DataFrame, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indptr (n_users + 1,), indices (nnz,))`` int64 CSR of the distinct items per user.

    Items are sorted within a user; wrap with ``models.metrics.UserItems(indptr, indices)``.
    """
    for name in ("user_id", "item_id"):
        if name not in frame.columns:
            raise DataValidationError(f"user_item_matrix: the frame has no {name!r} column")
    pairs = frame.select("user_id", "item_id").unique().sort("user_id", "item_id")
    users = pairs.get_column("user_id").to_numpy().astype(np.int64)
    if users.size and (users.min() < 0 or users.max() >= n_users):
        raise DataValidationError(
            f"user_item_matrix: user ids must lie in [0, {n_users}), "
            f"got {users.min()}..{users.max()}"
        )
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
    return indptr, pairs.get_column("item_id").to_numpy().astype(np.int64)


# --------------------------------------------------------------------------- helpers


def _check_frame(frame: pl.DataFrame, what: str) -> None:
    """``what`` has integer ids and a datetime ``ts``, none of them null."""
    schema = frame.schema
    for name in KEY:
        if name not in schema:
            raise DataValidationError(
                f"{what} has no {name!r} column (needs {', '.join(KEY)}; found {frame.columns})"
            )
    for name in ("user_id", "item_id"):
        if not schema[name].is_integer():
            raise DataValidationError(f"{what}: {name!r} must be an integer id, got {schema[name]}")
    if not isinstance(schema["ts"], pl.Datetime):
        raise DataValidationError(f"{what}: 'ts' must be a datetime, got {schema['ts']}")
    nulls = frame.select(pl.col(KEY).null_count()).row(0, named=True)
    bad = [name for name, count in nulls.items() if count]
    if bad:
        raise DataValidationError(f"{what}: null values in {bad}")


def _keys(frame: pl.DataFrame) -> pl.DataFrame:
    """The distinct keys in canonical order."""
    return frame.select(KEY).unique().sort(ORDER)


def _partition(frame: pl.DataFrame, assigned: pl.DataFrame, protocol: str) -> Split:
    """Split ``frame`` by the part each of its keys got in ``assigned`` (key + ``_PART``)."""
    tagged = _canonical(frame.join(assigned.select(*KEY, _PART), on=KEY, how="left"))
    parts = tagged.partition_by(_PART, as_dict=True, include_key=False)
    empty = frame.clear()
    return Split(*(parts.get((i,), empty) for i in range(3)), protocol=protocol)


def _canonical(frame: pl.DataFrame) -> pl.DataFrame:
    # Stable, so rows repeating a key keep their input order.
    return frame.sort(ORDER, maintain_order=True)
