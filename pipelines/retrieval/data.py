"""Retrieval training data: a split turned into arrays the training loop reads.

Everything here is small next to the interactions (per-user histories, item
probabilities, attribute tables), so it travels to Ray Train workers in the
loop config; the interactions themselves go as a Ray Dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from features.encoding import AttributeEncoding, AttributeTable, encode_attributes
from features.sketches.cms import cms_estimates, cms_from_events, cms_total_weight
from features.sources.movielens import read_movielens
from features.splits import Split, random_split, user_item_matrix
from infra.config import RetrievalConfig, SketchConfig
from models.metrics import UserItems
from models.two_tower import PAD


@dataclass(frozen=True)
class RetrievalData:
    """One split of an interaction dataset, as arrays.

    ``train_users``/``train_items`` (N,) int64 are the training pairs;
    ``history`` (U, L) int64 each user's most recent ``L`` training items as
    item embedding rows (``item + 1``; 0 pads the end); ``item_probability``
    (I,) float64 the share of training interactions of each item, from a
    Count-Min sketch (the logQ correction); ``seen_for_valid`` excludes
    training items when scoring validation, ``seen_for_test`` training and
    validation items when scoring test (RecBole's protocol).
    ``item_encoding`` is how item attributes were encoded (None without
    attributes): saved with the model, it encodes items that arrive later
    for their content-only vectors.
    """

    n_users: int
    n_items: int
    train_users: np.ndarray
    train_items: np.ndarray
    valid: UserItems
    test: UserItems
    seen_for_valid: UserItems
    seen_for_test: UserItems
    history: np.ndarray
    item_probability: np.ndarray
    user_attributes: AttributeTable
    item_attributes: AttributeTable
    item_encoding: AttributeEncoding | None = None

    @property
    def n_train(self) -> int:
        return int(self.train_users.size)


def prepare_retrieval_data(
    split: Split,
    users: pl.DataFrame,
    items: pl.DataFrame,
    n_users: int,
    n_items: int,
    config: RetrievalConfig,
    sketches: SketchConfig,
) -> RetrievalData:
    """Arrays of ``split`` for ids ``0..n_users-1`` and ``0..n_items-1``."""
    for name, part in (("train", split.train), ("valid", split.valid), ("test", split.test)):
        for key, n in (("user_id", n_users), ("item_id", n_items)):
            if part.height and (part[key].min() < 0 or part[key].max() >= n):  # type: ignore[operator]
                raise ValueError(f"{name} part: {key} outside 0..{n - 1}")
    train = split.train.sort("user_id", "ts", "item_id")

    def matrix(frame: pl.DataFrame) -> UserItems:
        indptr, indices = user_item_matrix(frame, n_users)
        return UserItems(indptr, indices)

    seen_valid = matrix(train)
    seen_test = matrix(pl.concat([train, split.valid.select(train.columns)]))
    _, user_attributes = encode_attributes(users, "user_id", n_users)
    item_encoding: AttributeEncoding | None
    item_encoding, item_attributes = encode_attributes(items, "item_id", n_items)
    if not config.use_attributes:
        user_attributes = AttributeTable.empty(n_users)
        item_attributes = AttributeTable.empty(n_items)
        item_encoding = None
    return RetrievalData(
        n_users=n_users,
        n_items=n_items,
        train_users=train["user_id"].to_numpy().astype(np.int64),
        train_items=train["item_id"].to_numpy().astype(np.int64),
        valid=matrix(split.valid),
        test=matrix(split.test),
        seen_for_valid=seen_valid,
        seen_for_test=seen_test,
        history=recent_history(train, n_users, config.history_length),
        item_probability=item_probability(train, n_items, sketches),
        user_attributes=user_attributes,
        item_attributes=item_attributes,
        item_encoding=item_encoding,
    )


def recent_history(train: pl.DataFrame, n_users: int, length: int) -> np.ndarray:
    """(U, L) int64: each user's last ``length`` items by time as embedding rows, 0-padded."""
    recent = (
        train.sort("user_id", "ts", "item_id")
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").tail(length))
    )
    history = np.full((n_users, length), PAD, dtype=np.int64)
    for user, row in zip(recent["user_id"].to_list(), recent["item_id"].to_list(), strict=True):
        history[user, : len(row)] = np.asarray(row, dtype=np.int64) + 1
    return history


def item_probability(train: pl.DataFrame, n_items: int, sketches: SketchConfig) -> np.ndarray:
    """(I,) the Count-Min estimate of each item's share of the training interactions.

    Count-Min never underestimates, so an item's share is at most ε above its
    true share; every item gets at least one count's share (no log of zero).
    """
    cms = cms_from_events(train.select("item_id"), sketches)
    total = max(cms_total_weight(cms), 1.0)
    counts = np.maximum(cms_estimates(cms, np.arange(n_items, dtype=np.int64)), 1.0)
    return counts / total


def movielens_random_split(folder: Path, seed: int = 0) -> tuple[Split, pl.DataFrame, pl.DataFrame]:
    """RecBole's protocol on a MovieLens folder: every rating implicit, per-user random 8:1:1.

    Returns the split and the users and items tables (ids already dense).
    """
    tables = read_movielens(folder)
    events = tables.events.select(
        "user_id", "item_id", pl.from_epoch(pl.col("ts").cast(pl.Int64), "s").alias("ts")
    )
    return random_split(events, (0.8, 0.1, 0.1), seed), tables.users, tables.items
