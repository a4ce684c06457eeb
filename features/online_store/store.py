"""The online store interface and the logic both backends share.

A backend (:mod:`.sqlite`, :mod:`.redis`) supplies a few primitives: fetch
blobs, run an update as one transaction, replace records in bulk, list ids.
Everything else (what is stored, how events update it, defaults on a miss,
degraded reads) lives here once, so the backends cannot drift apart.

Sketches (:mod:`.sketch_state`): per user the HLL of its distinct items, per
item the HLL of its distinct users, and a Count-Min of item frequency per UTC
day (store-wide, the longest window's days only, ~1.1 MB a day at the default
epsilon). Writes fold events into them with the batch builder's functions in
the same transaction as the buckets; vectors carry the estimates
(``distinct_items``; ``distinct_users``, ``popularity_cms_{w}d``), so reads
stay key lookups.

Freshness: a read returns the vector computed when the entity was last
written (``materialize``, ``apply_events`` touching it, or ``refresh``); its
``features_as_of`` says when. Windowed counts roll over with the calendar, not
with writes, so a scheduled :meth:`OnlineStore.refresh` (daily, after
midnight UTC) recomputes every vector from the stored buckets.

Failures: reads never raise on a backend problem: a missing entity gives the
default vector with ``found=False``; an unreachable, slow (``timeout_s``) or
broken backend gives the defaults with ``degraded=True`` and one logged
warning per outage. Writes raise :class:`OnlineStoreError` naming the backend.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import polars as pl

from features.aggregates import CtrPrior, compact, entity_features
from features.online_store import sketch_state, state
from features.online_store.sketch_state import BatchSketches, SketchState
from features.online_store.state import History, Meta
from features.sketches import SketchTables
from infra.config import FeaturesConfig
from infra.errors import RayrecError
from infra.logs import get_logger

log = get_logger(__name__)

# (id, vector blob, state blob, history blob or None for items)
Record = tuple[int, bytes, bytes, bytes | None]
# Entities per transaction in refresh and per Redis MULTI in materialize.
CHUNK_ENTITIES = 1_000


class OnlineStoreError(RayrecError):
    """A write to the online store failed; nothing of that write was applied."""

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(f"online store ({backend}): {message}")
        self.backend = backend


@dataclass(frozen=True)
class FeatureRead:
    """One entity's stored feature vector, or its defaults.

    ``found`` is False for an entity the store has never seen (or could not
    read); ``degraded`` is True when the backend failed (values are then the
    defaults, whether or not the entity exists). ``history`` is the user's
    recent positive items, most recent last (empty for items and misses).
    """

    entity_id: int
    values: dict[str, Any]
    found: bool
    features_as_of: dt.datetime | None
    degraded: bool = False
    history: list[int] = field(default_factory=list)


@dataclass
class Snapshot:
    """What an update transaction read: blobs per entity id and per day (None: absent)."""

    states: dict[str, dict[int, bytes | None]]
    histories: dict[int, bytes | None]
    meta: bytes | None
    # Count-Min day sketches asked for, by day number (sketch_state.day_number).
    cms: dict[int, bytes | None] = field(default_factory=dict)


@dataclass
class Writes:
    records: dict[str, list[Record]]
    meta: bytes | None = None
    # Count-Min day sketches to write (None: delete that day).
    cms: dict[int, bytes | None] = field(default_factory=dict)


Update = Callable[[Snapshot], Writes]


class OnlineStore(abc.ABC):
    """Latest feature vectors, day buckets and histories of users and items."""

    backend: ClassVar[str]

    def __init__(self, config: FeaturesConfig) -> None:
        self.config = config
        self.windows_days = tuple(config.windows_days)
        self.history_length = config.history_length
        # The counter features both entities share; each vector adds its sketch estimates.
        self.columns = state.feature_columns(self.windows_days)
        self.user_columns = state.entity_columns("user", self.windows_days)
        self.item_columns = state.entity_columns("item", self.windows_days)
        self._columns_of = {"user": self.user_columns, "item": self.item_columns}
        self._item_schema = state.entity_schema("item", self.windows_days)
        self._hll, self._cms = sketch_state.configs(config.sketches)
        self._sketch_layout = tuple(sketch_state.layout(self._hll, self._cms))
        self._meta_cache: tuple[bytes, Meta] | None = None
        self._last_prior: CtrPrior | None = None
        self._outage = False

    # ------------------------------------------------------------------ backend primitives

    # Exceptions that mean "the backend failed" (not a bug in the caller).
    _backend_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    @property
    def _read_errors(self) -> tuple[type[BaseException], ...]:
        # A read also degrades on a blob it cannot decode (another layout, corruption).
        return (*self._backend_errors, ValueError, KeyError, TypeError)

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: FeaturesConfig, workdir: str | Path) -> OnlineStore:
        """Open the store that ``config.online_store`` describes."""

    @abc.abstractmethod
    def _fetch_user(self, user_id: int) -> tuple[bytes | None, bytes | None, bytes | None]:
        """``(vector, history, meta)`` blobs in one round trip."""

    @abc.abstractmethod
    def _fetch_vectors(
        self, entity: str, ids: Sequence[int]
    ) -> tuple[list[bytes | None], bytes | None]:
        """Vector blobs in the order of ``ids``, and the meta blob, in one round trip."""

    @abc.abstractmethod
    def _fetch_history(self, user_id: int) -> bytes | None: ...

    @abc.abstractmethod
    def _fetch_meta(self) -> bytes | None: ...

    @abc.abstractmethod
    def _transact(
        self, ids: dict[str, list[int]], update: Update, days: Sequence[int] = ()
    ) -> None:
        """Read the states of ``ids``, the day sketches of ``days`` and the meta, apply
        ``update``, write (records, day sketches, meta), atomically.

        Concurrent writers must not lose each other's updates (SQLite: an
        immediate transaction; Redis: WATCH and retry).
        """

    @abc.abstractmethod
    def _replace(self, writes: Writes) -> None:
        """Overwrite whole records and day sketches (bulk load); the meta last."""

    @abc.abstractmethod
    def _entity_ids(self, entity: str) -> list[int]: ...

    @abc.abstractmethod
    def clear(self) -> None:
        """Delete everything this store holds (its file's tables / its key prefix)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reads

    def read_user(self, user_id: int) -> FeatureRead:
        """The user's vector and recent history: one key lookup, never raises."""
        try:
            vector, history, meta_blob = self._fetch_user(int(user_id))
            meta = self._meta(meta_blob)
            read = self._decode_read(user_id, vector, meta, "user")
            items = state.decode_history(history)[0] if vector is not None else []
        except self._read_errors as exc:
            self._note_outage(exc, "read_user")
            return self._default_read(user_id, degraded=True)
        self._note_recovery()
        return FeatureRead(
            read.entity_id, read.values, read.found, read.features_as_of, read.degraded, items
        )

    def read_item(self, item_id: int) -> FeatureRead:
        frame = self.read_items([item_id])
        row = frame.row(0, named=True)
        return FeatureRead(
            entity_id=item_id,
            values={c: row[c] for c in self.item_columns},
            found=row["found"],
            features_as_of=row["features_as_of"],
            degraded=row["degraded"],
        )

    def read_items(self, item_ids: Sequence[int]) -> pl.DataFrame:
        """Vectors of ``item_ids`` in the order asked, one round trip, never raises.

        Columns ``item_id, found, degraded, features_as_of`` then the features
        (:attr:`item_columns`: counters, ``distinct_users``, ``popularity_cms_{w}d``);
        a missing id gets the defaults and ``found=False``; duplicates repeat.
        """
        ids = [int(i) for i in item_ids]
        degraded = False
        try:
            blobs, meta_blob = self._fetch_vectors("item", ids) if ids else ([], None)
            meta = self._meta(meta_blob)
            decoded = [self._decode_values(blob, "item") for blob in blobs]
        except self._read_errors as exc:
            self._note_outage(exc, "read_items")
            decoded, meta, degraded = [None] * len(ids), None, True
        else:
            self._note_recovery()
        defaults = tuple(state.default_values(self.item_columns, self._prior(meta)).values())
        rows = []
        for item_id, values in zip(ids, decoded, strict=True):
            if values is None:
                rows.append((item_id, False, degraded, None, *defaults))
            else:
                rows.append((item_id, True, False, state.from_us(values[0]), *values[1]))
        schema = {
            "item_id": pl.Int64(),
            "found": pl.Boolean(),
            "degraded": pl.Boolean(),
            "features_as_of": pl.Datetime("us", "UTC"),
            **self._item_schema,
        }
        return pl.DataFrame(rows, schema=schema, orient="row")

    def read_history(self, user_id: int) -> list[int]:
        """The user's last ``history_length`` positive items, most recent last ([] if unknown)."""
        try:
            blob = self._fetch_history(int(user_id))
            items = list(state.decode_history(blob)[0])
        except self._read_errors as exc:
            self._note_outage(exc, "read_history")
            return []
        self._note_recovery()
        return items

    def prior(self) -> CtrPrior | None:
        """The stored prior (None before ``materialize``/``set_prior``)."""
        meta = self._meta(self._fetch_meta())
        return meta.prior if meta is not None else None

    def _decode_values(self, blob: bytes | None, entity: str) -> tuple[int, list[Any]] | None:
        if blob is None:
            return None
        as_of_us, values = state.decode_vector(blob)
        expected = len(self._columns_of[entity])
        if len(values) != expected:
            raise ValueError(
                f"stored vector has {len(values)} values, expected {expected}: the store "
                "was written with other windows_days or format; materialize it again"
            )
        return as_of_us, values

    def _decode_read(
        self, entity_id: int, blob: bytes | None, meta: Meta | None, entity: str
    ) -> FeatureRead:
        columns = self._columns_of[entity]
        decoded = self._decode_values(blob, entity)
        if decoded is None:
            return FeatureRead(
                entity_id, state.default_values(columns, self._prior(meta)), False, None
            )
        as_of_us, values = decoded
        return FeatureRead(
            entity_id, dict(zip(columns, values, strict=True)), True, state.from_us(as_of_us)
        )

    def _default_read(self, entity_id: int, degraded: bool) -> FeatureRead:
        values = state.default_values(self.user_columns, self._prior(None))
        return FeatureRead(entity_id, values, False, None, degraded)

    def _meta(self, blob: bytes | None) -> Meta | None:
        if blob is None:
            return None
        cached = self._meta_cache
        if cached is not None and cached[0] == blob:
            return cached[1]
        meta = Meta.decode(blob)
        self._meta_cache = (blob, meta)
        if meta.prior is not None:
            self._last_prior = meta.prior
        return meta

    def _prior(self, meta: Meta | None) -> CtrPrior | None:
        """The meta's prior, else the last one this handle saw (degraded reads)."""
        if meta is not None and meta.prior is not None:
            self._last_prior = meta.prior
        return self._last_prior

    def _note_outage(self, exc: BaseException, op: str) -> None:
        if not self._outage:
            self._outage = True
            log.warning(
                "online_store_degraded",
                backend=self.backend,
                op=op,
                error=f"{type(exc).__name__}: {exc}",
                hint="reads return defaults with degraded=True until the backend answers",
            )

    def _note_recovery(self) -> None:
        if self._outage:
            self._outage = False
            log.info("online_store_recovered", backend=self.backend)

    # ------------------------------------------------------------------ writes

    def _write(self, op: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._backend_errors as exc:
            raise OnlineStoreError(
                self.backend, f"{op} failed, nothing of it was written: {type(exc).__name__}: {exc}"
            ) from exc

    def _check_layout(self, meta: Meta | None) -> None:
        if meta is None:
            return
        if meta.version != state.FORMAT_VERSION:
            raise OnlineStoreError(
                self.backend,
                f"store has format version {meta.version}, this code writes "
                f"{state.FORMAT_VERSION}: clear() it and materialize again",
            )
        if (
            meta.windows_days != self.windows_days
            or meta.history_length != self.history_length
            or meta.sketch_layout != self._sketch_layout
        ):
            raise OnlineStoreError(
                self.backend,
                f"store holds windows_days={list(meta.windows_days)}, history_length="
                f"{meta.history_length}, sketches {list(meta.sketch_layout)}; config has "
                f"{list(self.windows_days)}, {self.history_length}, "
                f"{list(self._sketch_layout)}: clear() it and materialize again",
            )

    def _new_meta(
        self, prior: CtrPrior | None, clock_us: int | None, cms_days: Sequence[int]
    ) -> Meta:
        return Meta(
            prior,
            clock_us,
            self.windows_days,
            self.history_length,
            tuple(sorted(cms_days)),
            self._sketch_layout,
        )

    def _keep_from(self, as_of: dt.datetime) -> int:
        return sketch_state.first_kept_day(as_of, self.windows_days)

    def _day_writes(
        self, meta: Meta | None, new: dict[int, bytes], keep_from: int
    ) -> tuple[dict[int, bytes | None], list[int]]:
        """Day-sketch writes (``new``, and deletes of stored days before ``keep_from``)
        and the stored days after them."""
        stored = meta.cms_days if meta is not None else ()
        writes: dict[int, bytes | None] = {d: None for d in stored if d < keep_from}
        writes.update(new)
        return writes, sorted({d for d in (*stored, *new) if d >= keep_from})

    def materialize(
        self,
        user_buckets: pl.DataFrame,
        item_buckets: pl.DataFrame,
        histories: pl.DataFrame,
        prior: CtrPrior,
        as_of: dt.datetime,
        sketches: SketchTables | None = None,
    ) -> dict[str, int]:
        """Bulk load from the batch path; returns ``{"users": n, "items": n}``.

        Each given entity's record is replaced whole (vector at ``as_of``,
        buckets compacted at ``as_of``, history from ``histories``:
        ``user_id, history`` [, ``history_ts``]); the prior and clock are set.
        ``sketches`` (the ``features`` step's tables, built from the same
        events) gives each entity its HLL (``user_diversity.items_hll``,
        ``item_reach.users_hll``) and the store its Count-Min day sketches
        (``item_frequency``, the longest window's days before ``as_of``; each
        loaded day replaces the stored one); without them the loaded
        entities start with empty sketches (estimates 0) and the stored day
        sketches are kept. Entities absent from the load are left as they are.
        Loading the same inputs twice gives the same store. Atomicity: SQLite
        loads in one transaction (readers see all old or all new); Redis in
        MULTI/EXEC chunks of :data:`CHUNK_ENTITIES` entities, then the day
        sketches, then the meta, so readers may briefly see some entities new
        and others old, never a half-written one. Events after ``as_of`` must be
        replayed through :meth:`apply_events`.
        """
        keep = max(self.windows_days)
        for name, buckets in (("user", user_buckets), ("item", item_buckets)):
            last = buckets.get_column("last_ts").max() if buckets.height else None
            if last is not None and last >= as_of:
                raise ValueError(f"{name} buckets hold events at or after as_of {as_of}")
        keep_from = self._keep_from(as_of)
        day_cms, hlls = self._loaded_sketches(sketches, as_of, keep_from)
        records: dict[str, list[Record]] = {}
        hist = state.histories_from_frame(histories, as_of, self.history_length)
        empty_hist = state.encode_history(([], []))
        for entity, buckets in (("user", user_buckets), ("item", item_buckets)):
            compacted = compact(buckets, as_of, keep) if buckets.height else buckets
            if compacted.height == 0:
                records[entity] = []
                continue
            loaded = {i: SketchState(hll=h) for i, h in hlls[entity].items()}
            sketch_states = sketch_state.update_states(
                entity, compacted, loaded, {}, day_cms, keep_from, self._hll
            )
            features = sketch_state.with_sketch_columns(
                entity_features(compacted, as_of, self.windows_days, prior),
                entity,
                sketch_states,
                as_of,
                self.windows_days,
            )
            vectors = state.encode_vectors(features, as_of, self._columns_of[entity])
            states = dict(state.encode_states(compacted, sketch_states))
            records[entity] = [
                (
                    i,
                    v,
                    states[i],
                    (state.encode_history(hist[i]) if i in hist else empty_hist)
                    if entity == "user"
                    else None,
                )
                for i, v in vectors
            ]
        old = self._write("materialize", lambda: self._meta(self._fetch_meta()))
        self._check_layout(old)
        # The clock never goes back: entities the load leaves alone may hold later events.
        clock = max(state.to_us(as_of), (old.clock_us or 0) if old else 0)
        day_writes, days = self._day_writes(old, day_cms, self._keep_from(state.from_us(clock)))
        meta = self._new_meta(prior, clock, days)
        self._write(
            "materialize", lambda: self._replace(Writes(records, meta.encode(), day_writes))
        )
        return {"users": len(records["user"]), "items": len(records["item"])}

    def _loaded_sketches(
        self, sketches: SketchTables | None, as_of: dt.datetime, keep_from: int
    ) -> tuple[dict[int, bytes], dict[str, dict[int, bytes]]]:
        """``(day sketches to load, HLL per entity id)`` of the batch's sketch tables."""
        if sketches is None:
            return {}, {"user": {}, "item": {}}
        last_day = sketch_state.day_number(as_of.astimezone(dt.UTC).date())
        day_cms: dict[int, bytes] = {}
        for day, cms in sketches.item_frequency.select("day", "cms").iter_rows():
            number = sketch_state.day_number(day)
            if keep_from <= number <= last_day:
                sketch_state.check_cms_shape(cms, self._cms, f"item_frequency of {day}")
                day_cms[number] = cms
        hlls = {
            "user": dict(sketches.user_diversity.select("user_id", "items_hll").iter_rows()),
            "item": dict(sketches.item_reach.select("item_id", "users_hll").iter_rows()),
        }
        return day_cms, hlls

    def set_prior(self, prior: CtrPrior) -> None:
        """Set the prior later writes use (a stream into an empty store needs one)."""

        def update(snapshot: Snapshot) -> Writes:
            old = self._meta(snapshot.meta)
            self._check_layout(old)
            clock = old.clock_us if old else None
            days = old.cms_days if old else ()
            return Writes({}, self._new_meta(prior, clock, days).encode())

        self._write("set_prior", lambda: self._transact({}, update))

    def apply_events(self, events: pl.DataFrame, as_of: dt.datetime | None = None) -> int:
        """Fold a batch of canonical events into the store; returns entities written.

        The batch path's functions, per batch: ``aggregate_events`` → stored
        buckets of the touched entities → ``merge_aggregates`` → ``compact`` →
        ``entity_features`` at ``as_of`` (default: 1 µs after the batch's last
        event, never before the store clock, so late events are fine); the
        sketches likewise: ``update_hll`` of each touched entity's HLL with its
        new ids, ``cms_by_day`` of the batch ``merge_cms``-ed into each day's
        stored Count-Min (days before the longest window are skipped, and
        deleted once the clock leaves them behind). Buckets, sketches, vectors
        and histories are written back in one transaction, with the stored
        prior. Raises :class:`OnlineStoreError` if no prior is stored.
        """
        if events.height == 0:
            return 0
        batch_as_of = state.as_of_after(events)
        if as_of is not None and as_of < batch_as_of:
            raise ValueError(f"as_of {as_of} is not after the batch's last event")
        target = as_of or batch_as_of
        new = state.aggregate_batch(events)
        positives = state.new_positives(events)
        sketches = sketch_state.batch_sketches(events, self._cms)
        ids = {entity: state.ids_of(new[entity]) for entity in state.ENTITIES}

        def update(snapshot: Snapshot) -> Writes:
            meta = self._meta(snapshot.meta)
            if meta is None or meta.prior is None:
                raise OnlineStoreError(
                    self.backend, "no prior stored: materialize() or set_prior() first"
                )
            self._check_layout(meta)
            when = target
            if meta.clock_us is not None:
                when = max(when, state.from_us(meta.clock_us))
            keep_from = self._keep_from(when)
            day_cms = sketch_state.fold_days(snapshot.cms, sketches.day_cms, keep_from)
            records = {
                entity: self._updated_records(
                    entity, snapshot, new[entity], when, meta.prior, positives, sketches, day_cms
                )
                for entity in state.ENTITIES
            }
            clock = max(state.to_us(when), meta.clock_us or 0)
            day_writes, days = self._day_writes(meta, day_cms, keep_from)
            return Writes(records, self._new_meta(meta.prior, clock, days).encode(), day_writes)

        self._write("apply_events", lambda: self._transact(ids, update, sorted(sketches.day_cms)))
        return sum(len(v) for v in ids.values())

    def refresh(self, as_of: dt.datetime, prior: CtrPrior | None = None) -> int:
        """Recompute every vector (and re-compact every state) at ``as_of``; returns entities.

        The daily job when windows roll over; ``prior`` replaces the stored one
        first. Runs in transactions of :data:`CHUNK_ENTITIES` entities, so the
        stream may keep writing meanwhile. ``as_of`` may not precede the store
        clock (buckets would hold events after it). Day sketches that left the
        longest window are deleted, and every item's Count-Min estimates are
        taken again from the stored day sketches (read once, in the first
        transaction): afterwards they equal the batch's.
        """
        as_of_us = state.to_us(as_of)
        known = self._write("refresh", lambda: self._meta(self._fetch_meta()))
        day_cms: dict[int, bytes] = {}

        def set_meta(snapshot: Snapshot) -> Writes:
            meta = self._meta(snapshot.meta)
            self._check_layout(meta)
            if meta is not None and meta.clock_us is not None and as_of_us < meta.clock_us:
                raise ValueError(
                    f"refresh as_of {as_of} precedes the store clock {state.from_us(meta.clock_us)}"
                )
            use = prior or (meta.prior if meta else None)
            if use is None:
                raise OnlineStoreError(self.backend, "no prior stored: pass one to refresh()")
            keep_from = self._keep_from(as_of)
            day_cms.clear()
            day_cms.update(
                {d: b for d, b in snapshot.cms.items() if b is not None and d >= keep_from}
            )
            day_writes, days = self._day_writes(meta, {}, keep_from)
            return Writes({}, self._new_meta(use, as_of_us, days).encode(), day_writes)

        self._write(
            "refresh",
            lambda: self._transact({}, set_meta, known.cms_days if known is not None else ()),
        )
        empty = {e: state.decode_states(e, {}) for e in state.ENTITIES}
        no_batch = BatchSketches({e: {} for e in state.ENTITIES}, {})
        total = 0
        for entity in state.ENTITIES:
            all_ids = self._write("refresh", lambda e=entity: self._entity_ids(e))
            for chunk in state.chunks(all_ids, CHUNK_ENTITIES):

                def update(snapshot: Snapshot, e: str = entity) -> Writes:
                    meta = self._meta(snapshot.meta)
                    assert meta is not None and meta.prior is not None
                    when = state.from_us(max(as_of_us, meta.clock_us or 0))
                    records = self._updated_records(
                        e, snapshot, empty[e], when, meta.prior, {}, no_batch, day_cms
                    )
                    return Writes({e: records})

                self._write(
                    "refresh", lambda c=chunk, u=update, e=entity: self._transact({e: c}, u)
                )
                total += len(chunk)
        return total

    def _updated_records(
        self,
        entity: str,
        snapshot: Snapshot,
        new: pl.DataFrame,
        as_of: dt.datetime,
        prior: CtrPrior,
        positives: dict[int, History],
        sketches: BatchSketches,
        day_cms: dict[int, bytes],
    ) -> list[Record]:
        blobs = snapshot.states.get(entity, {})
        stored = state.decode_states(entity, blobs)
        if stored.height == 0 and new.height == 0:
            return []
        buckets, features = state.update_entities(stored, new, as_of, self.windows_days, prior)
        sketch_states = sketch_state.update_states(
            entity,
            buckets,
            state.decode_sketch_states(blobs),
            sketches.values[entity],
            day_cms,
            self._keep_from(as_of),
            self._hll,
        )
        features = sketch_state.with_sketch_columns(
            features, entity, sketch_states, as_of, self.windows_days
        )
        states = dict(state.encode_states(buckets, sketch_states))
        records: list[Record] = []
        for i, vector in state.encode_vectors(features, as_of, self._columns_of[entity]):
            history = None
            if entity == "user":
                old = state.decode_history(snapshot.histories.get(i))
                merged = state.merge_history(old, positives.get(i, ([], [])), self.history_length)
                history = state.encode_history(merged)
            records.append((i, vector, states[i], history))
        return records

    def cms_sketch(self, day: dt.date) -> bytes | None:
        """The stored Count-Min of item frequency on ``day`` (None: not kept)."""
        seen: dict[int, bytes | None] = {}

        def peek(snapshot: Snapshot) -> Writes:
            seen.update(snapshot.cms)
            return Writes({})

        number = sketch_state.day_number(day)
        self._transact({}, peek, [number])
        return seen.get(number)

    def entity_count(self, entity: str) -> int:
        return len(self._entity_ids(entity))

    def bucket_rows(self, entity: str, entity_id: int) -> int:
        """Stored bucket rows of one entity (bounded by ``max(windows_days) + 1``)."""
        seen: dict[str, dict[int, bytes | None]] = {}

        def peek(snapshot: Snapshot) -> Writes:
            seen.update(snapshot.states)
            return Writes({})

        self._transact({entity: [entity_id]}, peek)
        return state.decode_states(entity, seen.get(entity, {})).height
