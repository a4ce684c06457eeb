"""``POST /v1/events``: the request and response models, and the ingest behind them.

A client posts a batch of what users saw and did (:class:`EventBatch`). The
ingest (:class:`EventIngest`) turns it into canonical ``events`` rows
(:data:`features.schemas.EVENTS`) and, in this order:

1. stages them in the event log (:class:`features.event_log.EventLog`;
   validated and written, not yet visible);
2. folds them into the online store (:meth:`OnlineStore.apply_events`:
   counters, histories and sketches in one transaction), so the next
   recommendation sees them;
3. commits the log (the parts appear, atomically each).

If the store write fails (:class:`OnlineStoreError`: backend down, no prior
stored) the staged batch is aborted and the error re-raised: the API answers
503 and the client retries; neither the store nor the log holds any of the
batch. A crash between 2 and 3 leaves the events in the store only (the
staged parts are deleted later by :meth:`EventLog.clean_staging`); a retry
then counts them twice in the store, once in the log. Exactly-once would need
client batch ids; none are kept today.

Labels follow the log's existing producers (the simulator, the sources):
an event without ``label`` gets 1 for ``click``, ``purchase`` and ``view``,
0 for ``impression`` (the click, if any, arrives as its own ``click`` event),
and for ``rating`` ``value >= 4`` (the simulator's and MovieLens' positive
threshold; a rating then needs its ``value``). A client that already knows
whether a shown item was clicked may instead post the impression with
``label: 1`` and no click event; it must not do both, or the store counts
the click twice (:mod:`features.aggregates` counts labelled impressions and
click events alike).

Ids the catalogue does not know are accepted: the online store creates a
record for any new user or item id (counters, sketches, and for a user the
history), exactly as for a known one. The recommender still answers such a
user from popularity (its id is outside the two-tower's table) and drops
unknown items from the user tower's history; an item outside the catalogue
is never recommended (neither retrieval nor the popularity ranking reads
beyond the catalogue's ids) until a new index holds it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from typing import Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from features.event_log import EventLog
from features.online_store import OnlineStore
from features.schemas import EVENTS, EventType
from features.validation import ValidationRules
from serving.recommender import Clock, RequestError, utc_now

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
# The positive threshold of a rating (label 1 when value >= it): the simulator's,
# and the sources' default ``positive_threshold``.
RATING_POSITIVE = 4.0
# Labels of events posted without one (rating: by value, see RATING_POSITIVE).
DEFAULT_LABELS: dict[EventType, float] = {
    EventType.IMPRESSION: 0.0,
    EventType.CLICK: 1.0,
    EventType.PURCHASE: 1.0,
    EventType.VIEW: 1.0,
}
# How far ahead of the server's clock an event's ts may be: a client clock a
# little fast is fine; a far-future ts would move the online store's clock
# (it never goes back) and age every vector wrongly.
DEFAULT_MAX_CLOCK_SKEW = dt.timedelta(minutes=5)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventIn(_Strict):
    """One event as a client posts it (module doc: labels, unknown ids).

    ``ts``: when it happened, timezone-aware (any zone; stored in UTC,
    microseconds); omitted means the time the server received the batch.
    ``request_id``: the ``request_id`` of the recommendation answer that
    showed the item (a string of at most 64 characters; see
    :func:`request_id_code` for how the log stores it). ``propensity``: the
    probability with which the serving policy showed the item (impressions).
    ``value``: the rating, dwell time or price.
    """

    user_id: int = Field(ge=0, le=INT64_MAX)
    item_id: int = Field(ge=0, le=INT64_MAX)
    event_type: EventType
    ts: dt.datetime | None = None
    label: Literal[0, 1] | None = None
    position: int | None = Field(default=None, ge=0, le=INT32_MAX)
    request_id: str | None = Field(default=None, min_length=1, max_length=64)
    propensity: float | None = Field(default=None, gt=0.0, le=1.0)
    value: float | None = Field(default=None, allow_inf_nan=False)

    @field_validator("ts")
    @classmethod
    def _aware(cls, ts: dt.datetime | None) -> dt.datetime | None:
        if ts is not None and ts.utcoffset() is None:
            raise ValueError(
                "ts must carry a timezone (e.g. 2026-01-02T12:00:00Z or +01:00); a time "
                "without one is ambiguous. Omit ts to use the server's receive time"
            )
        return ts

    @model_validator(mode="after")
    def _labelled(self) -> EventIn:
        if self.event_type == EventType.RATING and self.value is None and self.label is None:
            raise ValueError("a rating needs its value (or an explicit label)")
        return self

    def resolved_label(self) -> float:
        """The posted label, else the event type's default (module doc)."""
        if self.label is not None:
            return float(self.label)
        if self.event_type == EventType.RATING:
            assert self.value is not None  # _labelled
            return 1.0 if self.value >= RATING_POSITIVE else 0.0
        return DEFAULT_LABELS[self.event_type]


class EventBatch(_Strict):
    """The body of ``POST /v1/events``: at least one event, at most
    ``serving.app.max_events_per_batch`` (checked by :meth:`EventIngest.ingest`,
    which knows the config)."""

    events: list[EventIn] = Field(min_length=1)


class EventsAccepted(_Strict):
    """The answer to an accepted batch.

    ``accepted``: events taken (all of the batch); ``event_log_parts``: the
    log files written (one per UTC date of the batch); ``entities_updated``:
    users plus items whose online record was rewritten; ``degraded``: True
    when the events were logged without reaching the online store (never from
    :class:`EventIngest`, which fails the request instead so that the client
    retries).
    """

    accepted: int
    event_log_parts: list[str]
    entities_updated: int
    degraded: bool = False


def request_id_code(request_id: str) -> int:
    """The log's int64 ``request_id`` of a client's string one (int64 >= 0).

    The contract stores ``request_id`` as an int64; answers carry strings (a
    uuid hex). A decimal string that fits is taken as the number (the
    simulator's ids round-trip); any other string is the first 8 bytes of its
    BLAKE2b digest with the top bit cleared, so the impression and the rating
    or click of one slate share a code (collisions: ~n²/2⁶⁴ over n slates).
    """
    if request_id.isascii() and request_id.isdigit() and int(request_id) <= INT64_MAX:
        return int(request_id)
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & INT64_MAX


def events_frame(events: Sequence[EventIn], received: dt.datetime) -> pl.DataFrame:
    """The (n, 9) canonical events frame of ``events`` in their order.

    ``received`` (timezone-aware) stands in for each missing ``ts``; every
    ts is converted to UTC (microseconds); labels are resolved
    (:meth:`EventIn.resolved_label`), request ids coded (:func:`request_id_code`).
    """
    utc = received.astimezone(dt.UTC)
    return pl.DataFrame(
        {
            "user_id": [e.user_id for e in events],
            "item_id": [e.item_id for e in events],
            "ts": [utc if e.ts is None else e.ts.astimezone(dt.UTC) for e in events],
            "event_type": [e.event_type.value for e in events],
            "label": [e.resolved_label() for e in events],
            "position": [e.position for e in events],
            "request_id": [
                None if e.request_id is None else request_id_code(e.request_id) for e in events
            ],
            "propensity": [e.propensity for e in events],
            "value": [e.value for e in events],
        },
        schema=EVENTS.polars_schema,
    )


class EventIngest:
    """Takes :class:`EventBatch` es into the online store and the event log (module doc).

    ``clock`` gives the receive time (UTC; the wall clock by default): the
    ``ts`` of events posted without one, and the bound on future ones
    (``max_clock_skew`` ahead of it).
    """

    def __init__(
        self,
        store: OnlineStore,
        log: EventLog,
        clock: Clock = utc_now,
        max_clock_skew: dt.timedelta = DEFAULT_MAX_CLOCK_SKEW,
    ) -> None:
        self.store = store
        self.log = log
        self.clock = clock
        self.max_clock_skew = max_clock_skew

    def ingest(self, batch: EventBatch, max_events: int) -> EventsAccepted:
        """Store and log every event of ``batch``, or none of them.

        Raises :class:`RequestError` (the API's 422) when the batch holds more
        than ``max_events`` (``serving.app.max_events_per_batch``) or an event's
        ``ts`` lies before 1990 or more than ``max_clock_skew`` after the
        receive time; :class:`OnlineStoreError` (the API's 503) when the store
        write fails, after aborting the staged log batch.
        """
        events = batch.events
        if len(events) > max_events:
            raise RequestError(
                f"at most {max_events} events per batch (serving.app.max_events_per_batch), "
                f"got {len(events)}"
            )
        received = self.clock()
        self._check_times(events, received)
        frame = events_frame(events, received)
        staged = self.log.stage(frame)
        try:
            updated = self.store.apply_events(frame)
        except BaseException:
            staged.abort()
            raise
        parts = staged.commit()
        return EventsAccepted(
            accepted=frame.height,
            event_log_parts=[str(p) for p in parts],
            entities_updated=updated,
        )

    def _check_times(self, events: Sequence[EventIn], received: dt.datetime) -> None:
        latest = received + self.max_clock_skew
        earliest = ValidationRules().ts_min
        for i, event in enumerate(events):
            if event.ts is None:
                continue
            if event.ts > latest:
                raise RequestError(
                    f"events[{i}].ts {event.ts.isoformat()} is more than "
                    f"{self.max_clock_skew} after the server's time {received.isoformat()}"
                )
            if event.ts < earliest:
                raise RequestError(
                    f"events[{i}].ts {event.ts.isoformat()} is before {earliest:%Y-%m-%d}"
                )
