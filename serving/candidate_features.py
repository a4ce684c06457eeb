"""The reranker's input rows of a request's candidates, encoded straight from numpy.

:meth:`serving.recommender.Recommender.candidate_frame` builds the candidates'
rows with the training frame's own code (:func:`features.online_frame.online_frame`
→ :func:`features.training_frame.assemble`) and :func:`serving.encoding.encode_examples`
turns them into tensors. That is the reference, and it is slow for a request:
some fifty small Polars queries (joins, one ``replace_strict`` per
categorical column), ~17 ms whatever the number of candidates.
:class:`CandidateEncoder` gives the same :class:`~serving.encoding.RankerPart`
with numpy alone. At load it sorts every spec feature by where its value
comes from in that frame and encodes what does not change between requests:

- static attributes (``user_<attr>``, ``item_<attr>`` of the attribute
  tables): encoded once per table row with the encoder's own functions
  (:func:`~serving.encoding.categorical_codes`, :func:`~serving.encoding.numeric_values`),
  plus one row for an id the table lacks (what the left join gives: null);
- ``user_id``, ``item_id`` and the context (``hour``, ``weekday`` of the
  request time in UTC, ``position`` the scoring slot): coded per request from
  the integers (:func:`~serving.encoding.hashed_codes`, a vocabulary lookup);
- the user's stored counters (``user_<counter>``, ``user_distinct_items``;
  ``seconds_since_*`` moved on to the request time by
  :func:`~features.online_frame.advance_seconds`) and the items' from the
  store's read (``seconds_since_*`` moved on by each row's age), the item age
  (from ``first_seen`` when the items table has it, else
  ``item_seconds_since_first``), ``category_affinity``
  (:func:`~features.online_frame.category_affinity` over the stored history)
  and ``retrieval_score``: normalised per request by
  :func:`~serving.encoding.normalize`;
- ``user_history``: the stored history's tail coded as ``item_id``.

Values that are the same for every candidate (the user's, the context's) are
computed once and broadcast. A feature whose source it cannot name makes
:meth:`CandidateEncoder.build` raise :class:`UnsupportedFeature` (naming it):
the caller then keeps the reference path; nothing is guessed. The
integration test holds both paths equal on a real run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import polars as pl
import torch

from features.feature_spec import Feature, FeatureKind, FeatureSpec
from features.online_frame import advance_seconds, category_affinity, category_count
from features.online_store import FeatureRead
from features.online_store.sketch_state import DISTINCT_COLUMNS
from features.online_store.state import SECONDS_COLUMNS, feature_columns
from models.moe import PAD
from serving.bundle import ModelBundle
from serving.encoding import (
    RETRIEVAL_SCORE,
    SCORING_POSITION,
    SEQUENCE_OWNER,
    RankerPart,
    SpecColumns,
    bounded_codes,
    categorical_codes,
    hashed_codes,
    normalize,
    numeric_values,
    vocabulary_rows,
)


class UnsupportedFeature(ValueError):
    """A spec feature the fast path cannot compute (names it): use the reference path."""


class _Source(StrEnum):
    """Where a feature's value comes from in the online frame (see the module doc)."""

    ID = "the request's ids"  # user_id, item_id
    CONTEXT = "the request's context"  # hour, weekday, position
    USER_VALUE = "the user's stored vector"
    ITEM_VALUE = "the items' stored vectors"
    USER_ATTRIBUTE = "the users table"
    ITEM_ATTRIBUTE = "the items table"
    AFFINITY = "the stored history's categories"
    AGE_FIRST_SEEN = "items.first_seen"
    AGE_SECONDS = "item_seconds_since_first"
    SCORE = "the index score"
    HISTORY = "the stored history"
    NOT_A_FEATURE = "the request time"  # ts


_INTEGER_SOURCES = (_Source.ID, _Source.CONTEXT)
_PER_REQUEST_NUMERIC = (
    _Source.ID,
    _Source.CONTEXT,
    _Source.USER_VALUE,
    _Source.ITEM_VALUE,
    _Source.AFFINITY,
    _Source.AGE_FIRST_SEEN,
    _Source.AGE_SECONDS,
    _Source.SCORE,
)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_SECONDS_PER_DAY = 86_400


def frame_sources(
    users: pl.DataFrame, items: pl.DataFrame, windows_days: Sequence[int]
) -> dict[str, tuple[_Source, str]]:
    """Column name of the online frame -> ``(source, name in that source)``.

    In :func:`~features.training_frame.assemble`'s order: a name a later join
    repeats stays the earlier column's (Polars suffixes the later one), the
    item age and ``retrieval_score`` are set last and win.
    """
    counters = feature_columns(windows_days)
    sources: dict[str, tuple[_Source, str]] = {}

    def put(name: str, source: _Source, column: str) -> None:
        sources.setdefault(name, (source, column))

    put("user_id", _Source.ID, "user_id")
    put("item_id", _Source.ID, "item_id")
    put("ts", _Source.NOT_A_FEATURE, "ts")
    for column in (*counters, DISTINCT_COLUMNS["user"]):
        put(f"user_{column}", _Source.USER_VALUE, column)
    put("user_history", _Source.HISTORY, "history")
    if "category" in items.columns:
        put("category_affinity", _Source.AFFINITY, "category")
    for column in (*counters, DISTINCT_COLUMNS["item"]):
        put(f"item_{column}", _Source.ITEM_VALUE, column)
    for column in ("hour", "weekday", "position"):
        put(column, _Source.CONTEXT, column)
    for column in users.columns:
        if column != "user_id":
            put(f"user_{column}", _Source.USER_ATTRIBUTE, column)
    for column in items.columns:
        if column != "item_id":
            put(f"item_{column}", _Source.ITEM_ATTRIBUTE, column)
    if sources.get("item_first_seen") == (_Source.ITEM_ATTRIBUTE, "first_seen"):
        del sources["item_first_seen"]
        sources["item_age_days"] = (_Source.AGE_FIRST_SEEN, "first_seen")
    else:
        sources["item_age_days"] = (_Source.AGE_SECONDS, "seconds_since_first")
    sources[RETRIEVAL_SCORE] = (_Source.SCORE, RETRIEVAL_SCORE)
    return sources


class _IntegerCodes:
    """A categorical feature's rows for integer values (an id, the hour): the rules of
    :func:`~serving.encoding.categorical_codes` for an Int64 column without nulls."""

    def __init__(self, feature: Feature, encoded: bool) -> None:
        self.feature = feature
        self.encoded = encoded
        self.rows = None if feature.hash_buckets is not None else vocabulary_rows(feature)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """(N,) int64 rows of the int64 ``values``."""
        if self.feature.hash_buckets is not None:
            return hashed_codes(values, np.ones(values.size, bool), self.feature.hash_buckets)
        if self.encoded:
            return bounded_codes(values.astype(np.int64), self.feature.cardinality)
        rows = self.rows or {}
        # The reference casts the Int64 column to strings, as str() writes integers.
        return np.fromiter(
            (rows.get(str(v), PAD) for v in values.tolist()), dtype=np.int64, count=values.size
        )


@dataclass(frozen=True)
class _Attributes:
    """One static attribute table's features, encoded per table row once.

    ``keys`` (n,) sorted ids; ``categorical`` (n + 1, c) int64 and ``numeric``
    (n + 1, w) float32, row n for an id the table lacks; the ``*_slots`` are
    their columns in the request's categorical and numeric matrices.
    """

    keys: np.ndarray
    categorical: np.ndarray
    numeric: np.ndarray
    categorical_slots: np.ndarray
    numeric_slots: np.ndarray

    @classmethod
    def build(
        cls,
        table: pl.DataFrame,
        key: str,
        categorical: Sequence[tuple[int, Feature, str]],
        numeric: Sequence[tuple[np.ndarray, Feature, str]],
        encoded: bool,
    ) -> _Attributes:
        """``table`` from :func:`_keyed`; ``categorical``: (slot, feature, column) and
        ``numeric``: (slots, feature, column) of the features it holds."""

        def with_absent(column: str) -> pl.Series:
            values = table.get_column(column)
            return values.extend(pl.Series(column, [None], dtype=values.dtype))

        codes = [categorical_codes(with_absent(c), f, encoded) for _, f, c in categorical]
        values = [numeric_values(with_absent(c), f) for _, f, c in numeric]
        n = table.height + 1
        return cls(
            keys=table.get_column(key).to_numpy(),
            categorical=np.stack(codes, axis=1) if codes else np.zeros((n, 0), np.int64),
            numeric=np.concatenate(values, axis=1) if values else np.zeros((n, 0), np.float32),
            categorical_slots=np.array([slot for slot, _, _ in categorical], dtype=np.int64),
            numeric_slots=(
                np.concatenate([slots for slots, _, _ in numeric])
                if numeric
                else np.zeros(0, np.int64)
            ),
        )

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """(N,) the table rows of ``ids``; the absent row for ids it lacks."""
        n = self.keys.size
        if n == 0:
            return np.zeros(ids.size, dtype=np.int64)
        at = np.searchsorted(self.keys, ids)
        found = self.keys[np.minimum(at, n - 1)] == ids
        return np.where(found, at, n)

    def fill(self, categorical: np.ndarray, numeric: np.ndarray, rows: np.ndarray) -> None:
        """Write the features of table ``rows`` ((M,), or (1,) for every row) into the matrices."""
        if self.categorical_slots.size:
            categorical[:, self.categorical_slots] = self.categorical[rows]
        if self.numeric_slots.size:
            numeric[:, self.numeric_slots] = self.numeric[rows]


@dataclass(frozen=True)
class _NumericGroup:
    """Per-request numeric features that share one normalisation: ``raw`` their columns in
    the raw matrix, ``slots`` in the numeric matrix, ``feature`` one of them (for its rule)."""

    feature: Feature
    raw: np.ndarray
    slots: np.ndarray


class CandidateEncoder:
    """:func:`~serving.encoding.encode_examples` of the online frame, without the frame.

    Build once per model (:meth:`build`); :meth:`encode` per request.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        columns: SpecColumns,
        users: pl.DataFrame,
        items: pl.DataFrame,
        windows_days: Sequence[int],
        position: int = SCORING_POSITION,
    ) -> None:
        """See :meth:`build`; raises :class:`UnsupportedFeature` naming a feature it cannot make."""
        self.windows_days = tuple(windows_days)
        self.position = int(position)
        self.with_user = columns.user is not None
        if columns.user not in (None, "user_id"):
            raise UnsupportedFeature(f"the rows' user column {columns.user!r} is not user_id")
        sources = frame_sources(users, items, self.windows_days)
        encoded = spec.encoded

        def source_of(feature: Feature, allowed: Sequence[_Source]) -> tuple[_Source, str]:
            source = sources.get(feature.name)
            if source is None or source[0] not in allowed:
                where = "no column of the online frame" if source is None else source[0].value
                raise UnsupportedFeature(
                    f"feature {feature.name!r} ({feature.kind.value}) comes from {where}: "
                    "the fast path cannot encode it"
                )
            return source

        self._n_categorical = len(columns.categorical)
        static: dict[_Source, tuple[list, list]] = {
            _Source.USER_ATTRIBUTE: ([], []),
            _Source.ITEM_ATTRIBUTE: ([], []),
        }
        # Integer-valued categoricals: (slot, source column, coder).
        self._integer_categorical: list[tuple[int, str, _IntegerCodes]] = []
        coders: dict[str, _IntegerCodes] = {}
        for slot, feature in enumerate(columns.categorical):
            source, column = source_of(
                feature, (*_INTEGER_SOURCES, _Source.USER_ATTRIBUTE, _Source.ITEM_ATTRIBUTE)
            )
            if source in static:
                static[source][0].append((slot, feature, column))
            else:
                coders[feature.name] = _IntegerCodes(feature, encoded)
                self._integer_categorical.append((slot, column, coders[feature.name]))

        offset = 0
        # Per-request numerics: their (source, column) in raw-matrix order, and groups.
        self._raw: list[tuple[_Source, str]] = []
        groups: dict[tuple, tuple[Feature, list[int], list[int]]] = {}
        for feature in columns.numeric:
            width = int(feature.dim or 1) if feature.kind == FeatureKind.EMBEDDING else 1
            slots = np.arange(offset, offset + width, dtype=np.int64)
            offset += width
            if feature.kind == FeatureKind.EMBEDDING:
                source, column = source_of(
                    feature, (_Source.USER_ATTRIBUTE, _Source.ITEM_ATTRIBUTE)
                )
            else:
                source, column = source_of(
                    feature, (*_PER_REQUEST_NUMERIC, _Source.USER_ATTRIBUTE, _Source.ITEM_ATTRIBUTE)
                )
            if source in static:
                static[source][1].append((slots, feature, column))
                continue
            rule = (
                feature.normalization,
                feature.mean,
                feature.std,
                feature.min_value,
                feature.max_value,
            )
            group = groups.setdefault(rule, (feature, [], []))
            group[1].append(len(self._raw))
            group[2].append(int(slots[0]))
            self._raw.append((source, column))
        self._n_numeric = offset
        self._groups = [
            _NumericGroup(f, np.array(raw, np.int64), np.array(slots, np.int64))
            for f, raw, slots in groups.values()
        ]

        self._sequences: list[tuple[int, _IntegerCodes]] = []
        for feature in columns.sequences:
            source_of(feature, (_Source.HISTORY,))
            owner = SEQUENCE_OWNER[feature.name]
            coder = coders.get(owner)
            if coder is None:
                raise UnsupportedFeature(
                    f"sequence feature {feature.name!r} is coded as {owner!r}, "
                    "which the fast path does not code from integers"
                )
            self._sequences.append((int(feature.max_length or 1), coder))

        keyed_items = _keyed(items, "item_id")
        self._users = _Attributes.build(
            _keyed(users, "user_id"), "user_id", *static[_Source.USER_ATTRIBUTE], encoded
        )
        self._items = _Attributes.build(
            keyed_items, "item_id", *static[_Source.ITEM_ATTRIBUTE], encoded
        )
        used = {source for source, _ in self._raw}
        self._user_values = sorted({c for s, c in self._raw if s == _Source.USER_VALUE})
        self._item_values = sorted(
            {c for s, c in self._raw if s == _Source.ITEM_VALUE}
            | ({"seconds_since_first"} if _Source.AGE_SECONDS in used else set())
        )
        self._first_seen: np.ndarray | None = None
        if _Source.AGE_FIRST_SEEN in used:
            self._first_seen = _first_seen_micros(keyed_items)
        self._categories: np.ndarray | None = None
        self._n_categories = 0
        if _Source.AFFINITY in used:
            self._categories = _category_index(keyed_items)
            self._n_categories = category_count(items)

    @classmethod
    def build(
        cls, bundle: ModelBundle, windows_days: Sequence[int], position: int = SCORING_POSITION
    ) -> CandidateEncoder:
        """The encoder of ``bundle``'s reranker spec over its attribute tables, for an online
        store of ``windows_days``, scoring at ``position`` (raises :class:`UnsupportedFeature`)."""
        return cls(bundle.spec, bundle.columns, bundle.users, bundle.items, windows_days, position)

    def encode(
        self,
        user_id: int,
        user: FeatureRead,
        ids: np.ndarray,
        scores: np.ndarray,
        reads: pl.DataFrame,
        ts: dt.datetime,
    ) -> RankerPart:
        """The unlabelled :class:`RankerPart` of candidates ``ids`` (M,) with index ``scores``
        for ``user_id`` (its store read ``user``) at ``ts``; ``reads`` the store's
        :meth:`~features.online_store.OnlineStore.read_items` of ``ids``, same order."""
        ids = np.asarray(ids, dtype=np.int64)
        m = ids.size
        if reads.height != m:
            raise ValueError(f"reads has {reads.height} rows for {m} candidate items")
        ts = ts if ts.tzinfo is not None else ts.replace(tzinfo=dt.UTC)
        categorical = np.empty((m, self._n_categorical), dtype=np.int64)
        numeric = np.empty((m, self._n_numeric), dtype=np.float32)
        item_rows = self._items.rows(ids)
        self._items.fill(categorical, numeric, item_rows)
        self._users.fill(categorical, numeric, self._users.rows(np.array([user_id], np.int64)))

        utc = ts.astimezone(dt.UTC)
        integers = {
            "user_id": np.array([user_id], dtype=np.int64),
            "item_id": ids,
            "hour": np.array([utc.hour], dtype=np.int64),
            "weekday": np.array([utc.isoweekday()], dtype=np.int64),
            "position": np.array([self.position], dtype=np.int64),
        }
        for slot, column, coder in self._integer_categorical:
            categorical[:, slot] = coder(integers[column])

        if self._raw:
            raw = np.empty((m, len(self._raw)), dtype=np.float64)
            self._raw_values(raw, user, item_rows, scores, reads, ts, integers)
            for group in self._groups:
                numeric[:, group.slots] = normalize(raw[:, group.raw], group.feature)

        sequences = []
        for length, coder in self._sequences:
            tail = np.asarray(user.history[-length:] if user.history else [], dtype=np.int64)
            row = np.full(length, PAD, dtype=np.int64)
            row[: tail.size] = coder(tail)
            sequences.append(torch.from_numpy(np.tile(row, (m, 1))))
        return RankerPart(
            categorical=torch.from_numpy(categorical),
            numeric=torch.from_numpy(numeric),
            sequences=tuple(sequences),
            labels=torch.zeros(m, dtype=torch.float32),
            users=torch.full((m,), int(user_id), dtype=torch.int64) if self.with_user else None,
        )

    def _raw_values(
        self,
        raw: np.ndarray,
        user: FeatureRead,
        item_rows: np.ndarray,
        scores: np.ndarray,
        reads: pl.DataFrame,
        ts: dt.datetime,
        integers: dict[str, np.ndarray],
    ) -> None:
        """Fill ``raw`` (M, R) float64 with the per-request numerics before normalisation."""
        user_values = {c: user.values.get(c) for c in self._user_values}
        advance_seconds(user_values, user.features_as_of, ts)
        ts_us = _micros(ts)
        item_values: dict[str, np.ndarray] = {}
        if self._item_values:
            as_of = reads.get_column("features_as_of")
            as_of_us = as_of.dt.cast_time_unit("us").to_physical().to_numpy()
            elapsed = (ts_us - as_of_us).astype(np.float64) / 1e6
            for column in self._item_values:
                values = reads.get_column(column).to_numpy().astype(np.float64)
                item_values[column] = values + elapsed if column in SECONDS_COLUMNS else values
        for k, (source, column) in enumerate(self._raw):
            match source:
                case _Source.ID | _Source.CONTEXT:
                    raw[:, k] = integers[column]
                case _Source.USER_VALUE:
                    value = user_values[column]
                    raw[:, k] = np.nan if value is None else float(value)
                case _Source.ITEM_VALUE:
                    raw[:, k] = item_values[column]
                case _Source.SCORE:
                    raw[:, k] = np.asarray(scores, dtype=np.float64)
                case _Source.AGE_SECONDS:
                    raw[:, k] = item_values[column] / _SECONDS_PER_DAY
                case _Source.AGE_FIRST_SEEN:
                    first = self._first_seen[item_rows]  # type: ignore[index]
                    age = (ts_us - first).astype(np.float64) / 86_400e6
                    raw[:, k] = np.maximum(age, 0.0)
                case _Source.AFFINITY:
                    raw[:, k] = self._affinity(user, item_rows)
                case _:  # pragma: no cover - the constructor admits no other source
                    raise AssertionError(source)

    def _affinity(self, user: FeatureRead, item_rows: np.ndarray) -> np.ndarray:
        """(M,) ``category_affinity`` of the candidates at table rows ``item_rows``."""
        categories = self._categories
        assert categories is not None
        history = np.asarray(user.history, dtype=np.int64)
        of_history = categories[self._items.rows(history)]
        counts = np.bincount(of_history[of_history >= 0], minlength=self._n_categories + 1)
        of_candidates = categories[item_rows]
        in_category = np.where(of_candidates >= 0, counts[np.maximum(of_candidates, 0)], 0)
        positives = float(user.values.get("positives_total") or 0)
        return category_affinity(in_category, history.size, positives, self._n_categories)


def _micros(ts: dt.datetime) -> int:
    """Microseconds since the epoch of an aware ``ts`` (what a ``datetime[μs, UTC]`` holds)."""
    return (ts - _EPOCH) // dt.timedelta(microseconds=1)


def _keyed(table: pl.DataFrame, key: str) -> pl.DataFrame:
    """``table``'s rows with a ``key`` (a left join matches no null key), sorted by it, the
    key as Int64; raises :class:`UnsupportedFeature` where the join would not be one row per id."""
    if not table.schema[key].is_integer():
        raise UnsupportedFeature(f"the attribute table's key {key!r} is not an integer")
    table = table.filter(pl.col(key).is_not_null()).sort(key)
    if table.get_column(key).is_duplicated().any():
        raise UnsupportedFeature(
            f"the attribute table's key {key!r} repeats ids (a join would repeat rows)"
        )
    return table.with_columns(pl.col(key).cast(pl.Int64))


def _first_seen_micros(items: pl.DataFrame) -> np.ndarray:
    """(n + 1,) float64 ``first_seen`` in µs since the epoch of the :func:`_keyed` items,
    NaN where null and in the last row (an item the table lacks)."""
    column = items.get_column("first_seen")
    if not isinstance(column.dtype, pl.Datetime) or column.dtype.time_zone is None:
        raise UnsupportedFeature(
            f"feature 'item_age_days' from items.first_seen of type {column.dtype}: "
            "the fast path needs a time-zone aware datetime"
        )
    return np.append(column.dt.epoch("us").cast(pl.Float64).to_numpy(), np.nan)


def _category_index(items: pl.DataFrame) -> np.ndarray:
    """(n + 1,) int64 index of each :func:`_keyed` item's category, -1 where null and in the
    last row (an item the table lacks)."""
    index: dict[object, int] = {}
    codes = [
        -1 if v is None else index.setdefault(v, len(index))
        for v in items.get_column("category").to_list()
    ]
    return np.array([*codes, -1], dtype=np.int64)
