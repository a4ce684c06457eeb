"""What the online store keeps per entity, how it is encoded, and how events update it.

Backend-free: both backends store the same three msgpack blobs per entity and
run the same update (:func:`update_entities`, :func:`merge_history`), which is
:mod:`features.aggregates` itself, so batch and streaming cannot disagree.

Per entity (user or item), one key (Redis hash) or one row (SQLite):

``v`` vector
    ``[features_as_of_us, value, ...]`` in :func:`feature_columns` order: the
    row of :func:`~features.aggregates.entity_features` at ``features_as_of``.
    Counts are msgpack ints, rates, seconds and HLL estimates floats (~75 bytes
    at 3 windows, sketch estimates included).
``s`` state
    The entity's day buckets, compacted to ``max(windows_days) + 1`` rows at
    most, columnar: ``{"d": day ordinals, "n", "i", "c", "p": counters,
    "v": value sums, "f", "l": first/last ts in µs}``, plus the entity's
    sketches: ``"k"`` its HLL, ``"q"`` (items) its Count-Min estimates per
    day (see :mod:`.sketch_state`).
``h`` history (users only)
    ``{"i": item ids, "t": ts in µs}``: the last ``history_length`` positive
    items, most recent last, ordered by ``(ts, arrival order)``.

The store-wide ``meta`` record holds the prior, the store clock (the latest
``as_of`` written), the days whose Count-Min sketches are stored, and the
layout (windows, history length, sketch shapes, format version). The vector
of a user ends with ``distinct_items``, of an item with ``distinct_users``
and ``popularity_cms_{w}d`` (:func:`entity_columns`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import polars as pl

from features.aggregates import (
    ENTITY_KEYS,
    CtrPrior,
    aggregate_events,
    compact,
    entity_features,
    merge_aggregates,
)
from features.online_store.sketch_state import (
    DISTINCT_COLUMNS,
    SketchState,
    sketch_columns,
    sketch_schema,
)
from features.schemas import TS_DTYPE

# 2: sketches in the state blob and vector, Count-Min day sketches, sketch layout in the meta.
FORMAT_VERSION = 2
ENTITIES = ("user", "item")
_COUNTS = ("events", "impressions", "clicks", "positives")
RATE_COLUMNS = ("ctr_smoothed", "positive_rate")
SECONDS_COLUMNS = ("seconds_since_last", "seconds_since_first")
# Bucket columns <-> short state keys (the state is stored columnar).
_STATE_KEYS = {
    "day": "d",
    "events": "n",
    "impressions": "i",
    "clicks": "c",
    "positives": "p",
    "value_sum": "v",
    "first_ts": "f",
    "last_ts": "l",
}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_DAY = dt.date(1970, 1, 1).toordinal()


def feature_columns(windows_days: Sequence[int]) -> list[str]:
    """The vector's columns, in :func:`~features.aggregates.entity_features` order."""
    return [
        *[f"{c}_{w}d" for w in windows_days for c in _COUNTS],
        *[f"{c}_total" for c in _COUNTS],
        *RATE_COLUMNS,
        *SECONDS_COLUMNS,
    ]


def feature_schema(windows_days: Sequence[int]) -> dict[str, pl.DataType]:
    return {
        c: pl.Float64() if c in RATE_COLUMNS or c in SECONDS_COLUMNS else pl.Int64()
        for c in feature_columns(windows_days)
    }


def entity_columns(entity: str, windows_days: Sequence[int]) -> list[str]:
    """An entity's stored vector: the counter features, then its sketch estimates."""
    return [*feature_columns(windows_days), *sketch_columns(entity, windows_days)]


def entity_schema(entity: str, windows_days: Sequence[int]) -> dict[str, pl.DataType]:
    return {**feature_schema(windows_days), **sketch_schema(entity, windows_days)}


def default_values(columns: Sequence[str], prior: CtrPrior | None) -> dict[str, Any]:
    """The vector of an entity never seen: what ``entity_features`` gives for no events.

    Counts 0; rates the prior's rate (``(0 + s p0) / (0 + s)``), or None when
    the prior is unknown (a degraded read before any meta was read);
    ``seconds_since_*`` None (undefined: there is no first or last event);
    sketch estimates 0 (``distinct_*`` 0.0).
    """
    out: dict[str, Any] = {}
    for c in columns:
        if c in DISTINCT_COLUMNS.values():
            out[c] = 0.0
        elif c in RATE_COLUMNS:
            out[c] = prior.rate if prior is not None else None
        elif c in SECONDS_COLUMNS:
            out[c] = None
        else:
            out[c] = 0
    return out


# --------------------------------------------------------------------------- time


def to_us(ts: dt.datetime) -> int:
    if ts.tzinfo is None:
        raise ValueError(f"timestamps must be timezone-aware (UTC), got {ts!r}")
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=us)


# --------------------------------------------------------------------------- meta


@dataclass(frozen=True)
class Meta:
    """The store-wide record: prior, clock and layout."""

    prior: CtrPrior | None
    # The latest as_of any write used (µs); events applied later get as_of >= this.
    clock_us: int | None
    windows_days: tuple[int, ...]
    history_length: int
    # Days (since 1970-01-01) whose Count-Min sketch is stored, ascending.
    cms_days: tuple[int, ...] = ()
    # sketch_state.layout(): HLL lg_k and type, Count-Min depth, width and seed.
    sketch_layout: tuple[Any, ...] = ()
    version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "version": self.version,
                "prior": None if self.prior is None else [self.prior.rate, self.prior.strength],
                "clock_us": self.clock_us,
                "windows_days": list(self.windows_days),
                "history_length": self.history_length,
                "cms_days": list(self.cms_days),
                "sketch_layout": list(self.sketch_layout),
            }
        )

    @staticmethod
    def decode(blob: bytes) -> Meta:
        raw = msgpack.unpackb(blob)
        prior = raw["prior"]
        return Meta(
            prior=None if prior is None else CtrPrior(rate=prior[0], strength=prior[1]),
            clock_us=raw["clock_us"],
            windows_days=tuple(raw["windows_days"]),
            history_length=raw["history_length"],
            cms_days=tuple(raw.get("cms_days", ())),
            sketch_layout=tuple(raw.get("sketch_layout", ())),
            version=raw.get("version", 1),
        )


# --------------------------------------------------------------------------- vectors


def encode_vectors(
    features: pl.DataFrame, as_of: dt.datetime, columns: Sequence[str]
) -> list[tuple[int, bytes]]:
    """``(id, v blob)`` per row of an ``entity_features`` frame."""
    key = features.columns[0]
    if features.columns[1:] != list(columns):
        raise ValueError(
            f"entity_features gave columns {features.columns[1:]}, the store expects {columns}"
        )
    as_of_us = to_us(as_of)
    pack = msgpack.Packer().pack
    ids = features.get_column(key).to_list()
    rows = features.drop(key).iter_rows()
    return [(i, pack([as_of_us, *row])) for i, row in zip(ids, rows, strict=True)]


def decode_vector(blob: bytes) -> tuple[int, list[Any]]:
    """``(features_as_of_us, values)`` of a ``v`` blob."""
    raw = msgpack.unpackb(blob)
    return raw[0], raw[1:]


# --------------------------------------------------------------------------- buckets


def bucket_schema(entity: str) -> dict[str, pl.DataType]:
    return {
        ENTITY_KEYS[entity]: pl.Int64(),
        "day": pl.Date(),
        **{c: pl.Int64() for c in _COUNTS},
        "value_sum": pl.Float64(),
        "first_ts": TS_DTYPE,
        "last_ts": TS_DTYPE,
    }


def encode_states(
    buckets: pl.DataFrame, sketches: Mapping[int, SketchState] | None = None
) -> list[tuple[int, bytes]]:
    """``(id, s blob)`` per entity of a bucket table (rows of one entity kept together),
    with the entity's sketch state where ``sketches`` has one."""
    key = buckets.columns[0]
    grouped = (
        buckets.sort(key, "day")
        .with_columns(
            (pl.col("day").cast(pl.Int32)).alias("day"),
            pl.col("first_ts").dt.epoch("us"),
            pl.col("last_ts").dt.epoch("us"),
        )
        .group_by(key, maintain_order=True)
        .agg(pl.col(c) for c in _STATE_KEYS)
    )
    pack = msgpack.Packer().pack
    names = list(_STATE_KEYS.values())
    sketches = sketches or {}
    out = []
    for row in grouped.iter_rows():
        fields = dict(zip(names, row[1:], strict=True))
        sketch = sketches.get(row[0])
        if sketch is not None:
            fields.update(sketch.encode())
        out.append((row[0], pack(fields)))
    return out


def decode_sketch_states(blobs: Mapping[int, bytes | None]) -> dict[int, SketchState]:
    """The sketch state of each entity whose state blob is present."""
    return {
        i: SketchState.decode(msgpack.unpackb(blob))
        for i, blob in blobs.items()
        if blob is not None
    }


def decode_states(entity: str, blobs: Mapping[int, bytes | None]) -> pl.DataFrame:
    """The bucket table of the entities whose state blob is present."""
    columns: dict[str, list[Any]] = {c: [] for c in _STATE_KEYS}
    ids: list[int] = []
    for entity_id, blob in blobs.items():
        if blob is None:
            continue
        raw = msgpack.unpackb(blob)
        ids.extend([entity_id] * len(raw["d"]))
        for name, short in _STATE_KEYS.items():
            columns[name].extend(raw[short])
    schema = bucket_schema(entity)
    key = ENTITY_KEYS[entity]
    return pl.DataFrame(
        {
            key: pl.Series(ids, dtype=pl.Int64),
            "day": pl.Series(columns["day"], dtype=pl.Int32).cast(pl.Date),
            **{c: pl.Series(columns[c], dtype=pl.Int64) for c in _COUNTS},
            "value_sum": pl.Series(columns["value_sum"], dtype=pl.Float64),
            "first_ts": pl.Series(columns["first_ts"], dtype=pl.Int64).cast(TS_DTYPE),
            "last_ts": pl.Series(columns["last_ts"], dtype=pl.Int64).cast(TS_DTYPE),
        },
        schema=schema,
    )


def update_entities(
    stored: pl.DataFrame,
    new: pl.DataFrame,
    as_of: dt.datetime,
    windows_days: Sequence[int],
    prior: CtrPrior,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(compacted buckets, feature vectors)`` after merging ``new`` buckets into ``stored``.

    The streaming step, and the batch one (``stored`` empty): merge, compact to
    the longest window, features at ``as_of``.
    """
    merged = merge_aggregates(stored, new)
    buckets = compact(merged, as_of, keep_days=max(windows_days))
    return buckets, entity_features(buckets, as_of, windows_days, prior)


# --------------------------------------------------------------------------- history

History = tuple[list[int], list[int]]  # (item ids, ts in µs), most recent last


def encode_history(history: History) -> bytes:
    return msgpack.packb({"i": history[0], "t": history[1]})


def decode_history(blob: bytes | None) -> History:
    if blob is None:
        return [], []
    raw = msgpack.unpackb(blob)
    return raw["i"], raw["t"]


def new_positives(events: pl.DataFrame) -> dict[int, History]:
    """Positive items (label > 0) per user of a batch, in (ts, row) order."""
    grouped = (
        events.lazy()
        .with_row_index("_order")
        .filter(pl.col("label").fill_null(0.0) > 0)
        .sort("user_id", "ts", "_order")
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id"), pl.col("ts").dt.epoch("us"))
        .collect()
    )
    return {u: (items, ts) for u, items, ts in grouped.iter_rows()}


def merge_history(stored: History, new: History, length: int) -> History:
    """The last ``length`` of ``stored`` then ``new``, stably ordered by ts.

    Stable: ties in ts keep arrival order (stored first), so streaming a log in
    row order gives the batch order ``(ts, row)``; a late event lands in place.
    """
    pairs = sorted(zip(stored[1] + new[1], stored[0] + new[0], strict=True), key=lambda p: p[0])[
        -length:
    ]
    return [item for _, item in pairs], [ts for ts, _ in pairs]


def histories_from_frame(
    histories: pl.DataFrame, as_of: dt.datetime, length: int
) -> dict[int, History]:
    """``user_id, history`` (``list[i64]``, most recent last) from the batch path.

    The batch frame has no timestamps; an optional ``history_ts`` list column
    (datetimes) gives them, else every item gets ``as_of - 1µs`` (all were
    before ``as_of``), which keeps their order against later events.
    """
    has_ts = "history_ts" in histories.columns
    frame = histories.select(
        "user_id",
        pl.col("history").list.tail(length),
        *(
            [pl.col("history_ts").list.tail(length).list.eval(pl.element().dt.epoch("us"))]
            if has_ts
            else []
        ),
    )
    fallback = to_us(as_of) - 1
    out: dict[int, History] = {}
    for row in frame.iter_rows():
        items = list(row[1] or [])
        ts = list(row[2]) if has_ts else [fallback] * len(items)
        out[row[0]] = (items, ts)
    return out


def as_of_after(events: pl.DataFrame) -> dt.datetime:
    """One microsecond after the batch's last event."""
    last = events.get_column("ts").max()
    if last is None:
        raise ValueError("events have no ts")
    return last + dt.timedelta(microseconds=1)


def aggregate_batch(events: pl.DataFrame) -> dict[str, pl.DataFrame]:
    return {entity: aggregate_events(events, entity) for entity in ENTITIES}


def ids_of(frame: pl.DataFrame) -> list[int]:
    return frame.get_column(frame.columns[0]).unique(maintain_order=True).to_list()


def chunks(items: Sequence[Any] | Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
