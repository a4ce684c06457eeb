"""Traffic, clicks and the event rows of one block of requests.

A day's traffic is drawn at once (it is ``1 / slate_size`` of the day's rows):
sessions with a geometric number of requests (mean ``mean_session_requests``),
exponential gaps of mean ``mean_request_gap_s`` between them, each session
placed uniformly in the day so that it ends before midnight. Requests are then
sorted by time and cut into blocks; each block draws its slates, clicks and
ratings from its own keyed stream, so blocks can be made in any order or in
parallel and the output stays byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from features.simulator.policy import DayTables, InverseCdfSampler, LoggingPolicy
from features.simulator.world import (
    STREAM_BLOCK,
    STREAM_SESSIONS,
    US_PER_DAY,
    World,
    examine_probability,
    keyed_rng,
    sigmoid,
)

EVENTS_ARROW_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("event_type", pa.string()),
        ("label", pa.float64()),
        ("position", pa.int32()),
        ("request_id", pa.int64()),
        ("propensity", pa.float64()),
        ("value", pa.float64()),
    ]
)
# Requests per sub-batch of the click model's (rows, K, d) gather.
_CLICK_ROWS = 4096


@dataclass(frozen=True)
class DaySchedule:
    """The requests of one day, sorted by time: ``users`` (R,), ``ts_us`` (R,) int64."""

    day: int
    users: np.ndarray
    ts_us: np.ndarray
    first_request_id: int


class Traffic:
    """Who sends requests, and when."""

    def __init__(self, world: World) -> None:
        self.world = world
        c = world.config
        size = c.world_size
        self.requests_per_day = max(1, round(size.impressions_per_day / c.slate_size))
        self._base = InverseCdfSampler(world.user_activity[: size.n_users])
        self._drift_samplers = {
            lo: InverseCdfSampler(world.user_activity[lo:hi])
            for _, _, lo, hi in world.drifts.covariate
        }

    def sample_users(self, n: int, day: int, rng: np.random.Generator) -> np.ndarray:
        """(n,) user ids drawn like sessions on ``day``: by activity, and with each active
        covariate drift's share from its new segment."""
        users = self._base.draw(rng, n)
        shares = self.world.covariate_shares(day)
        if shares:  # no extra draws before the first drift: earlier days stay identical
            r = rng.random(n)
            acc = 0.0
            for share, lo, _ in shares:
                mask = (r >= acc) & (r < acc + share)
                users[mask] = lo + self._drift_samplers[lo].draw(rng, int(mask.sum()))
                acc += share
        return users

    def day_schedule(self, day: int) -> DaySchedule:
        c = self.world.config
        rng = keyed_rng(c.seed, STREAM_SESSIONS, day)
        n_req = self.requests_per_day
        lengths = rng.geometric(1.0 / c.mean_session_requests, n_req // 2 + 16)
        while lengths.sum() < n_req:
            lengths = np.concatenate([lengths, rng.geometric(1.0 / c.mean_session_requests, 64)])
        ends = np.cumsum(lengths)
        n_sess = int(np.searchsorted(ends, n_req)) + 1
        lengths = lengths[:n_sess]
        lengths[-1] -= ends[n_sess - 1] - n_req  # the last session is cut at the day's quota
        session_users = self.sample_users(n_sess, day, rng)

        session = np.repeat(np.arange(n_sess), lengths)  # (R,)
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        gaps = rng.exponential(c.mean_request_gap_s, n_req)
        gaps[first] = 0.0
        elapsed = np.cumsum(gaps)
        offset = elapsed - elapsed[first][session]  # seconds since the session's start
        duration = offset[first + lengths - 1]  # (n_sess,)
        start = rng.random(n_sess) * np.maximum(0.0, 86_400.0 - duration)
        ts = self.world.day_start_us(day) + np.rint((start[session] + offset) * 1e6).astype(
            np.int64
        )
        ts = np.minimum(ts, self.world.day_start_us(day + 1) - 1)
        order = np.argsort(ts, kind="stable")
        return DaySchedule(day, session_users[session][order], ts[order], day * n_req)


def click_model(
    world: World,
    users: np.ndarray,
    items: np.ndarray,
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Relevance logit and P(click) for users (B,) and slates items (B, K).

    ``P(click) = examine(position) * sigmoid(relevance logit)``, position = column.
    ``user_vectors`` / ``item_vectors`` are the day's (U, d) and (N, d) tables,
    in float32 on the bulk path and float64 for ground truth.
    """
    c = world.config
    dots = np.empty(items.shape, dtype=np.float64)
    for lo in range(0, users.size, _CLICK_ROWS):
        sl = slice(lo, lo + _CLICK_ROWS)
        dots[sl] = np.einsum("bkd,bd->bk", item_vectors[items[sl]], user_vectors[users[sl]])
    logit = (
        c.relevance_scale * dots + c.quality_weight * world.item_quality[items] + c.relevance_bias
    )
    examine = examine_probability(np.arange(items.shape[1]), c.examine_decay)
    return logit, examine[None, :] * sigmoid(logit)


def make_block(
    world: World,
    policy: LoggingPolicy,
    tables: DayTables,
    schedule: DaySchedule,
    block: int,
    requests_per_block: int,
) -> pa.Table:
    """Rows of requests ``[block * requests_per_block, ...)`` of one day (see package doc)."""
    c = world.config
    rng = keyed_rng(c.seed, STREAM_BLOCK, schedule.day, block)
    lo = block * requests_per_block
    hi = min(lo + requests_per_block, schedule.users.size)
    users, ts = schedule.users[lo:hi], schedule.ts_us[lo:hi]
    request_id = schedule.first_request_id + np.arange(lo, hi, dtype=np.int64)
    k = c.slate_size

    slates = policy.sample_with(users, tables, rng)
    logit, p_click = click_model(
        world, users, slates.items, tables.user_vectors, world.item_vectors32
    )
    clicked = rng.random(p_click.shape) < p_click  # (B, K)

    # Ratings: a share of clicks; value 1..5 rises with relevance, positive when >= 4.
    flat_clicks = np.flatnonzero(clicked)
    rated = flat_clicks[rng.random(flat_clicks.size) < c.rating_probability]
    noisy = logit.reshape(-1)[rated] + rng.standard_normal(rated.size)
    rating = np.minimum(5.0, 1.0 + np.floor(5.0 * sigmoid(noisy)))
    rating_row = rated // k
    delay = np.rint(rng.exponential(c.mean_request_gap_s, rated.size) * 1e6).astype(np.int64)
    rating_ts = np.minimum(ts[rating_row] + delay, world.day_start_us(schedule.day + 1) - 1)

    n_imp, n_rat = clicked.size, rated.size
    return _events_table(
        user_id=np.concatenate([np.repeat(users, k), users[rating_row]]),
        item_id=np.concatenate([slates.items.reshape(-1), slates.items.reshape(-1)[rated]]),
        ts=np.concatenate([np.repeat(ts, k), rating_ts]),
        n_impressions=n_imp,
        n_ratings=n_rat,
        label=np.concatenate([clicked.reshape(-1).astype(np.float64), (rating >= 4.0) * 1.0]),
        position=np.tile(np.arange(k, dtype=np.int32), hi - lo),
        request_id=np.concatenate([np.repeat(request_id, k), request_id[rating_row]]),
        propensity=slates.propensity.reshape(-1),
        value=rating,
    )


def _events_table(
    *,
    user_id: np.ndarray,
    item_id: np.ndarray,
    ts: np.ndarray,
    n_impressions: int,
    n_ratings: int,
    label: np.ndarray,
    position: np.ndarray,
    request_id: np.ndarray,
    propensity: np.ndarray,
    value: np.ndarray,
) -> pa.Table:
    """Impression rows first, then rating rows; built from raw buffers (no per-row objects).

    ``position`` and ``propensity`` hold impression values only (rating rows are
    null), ``value`` holds rating values only (impression rows are null).
    """
    n = n_impressions + n_ratings
    is_impression = np.zeros(n, dtype=bool)
    is_impression[:n_impressions] = True
    imp_valid = _bitmap(is_impression)
    rat_valid = _bitmap(~is_impression)
    pad_i32 = np.zeros(n_ratings, dtype=np.int32)
    pad_f64 = np.zeros(n_ratings, dtype=np.float64)

    # event_type: "impression" * n_imp then "rating" * n_rat, as one string buffer.
    imp, rat = b"impression", b"rating"
    offsets = np.concatenate(
        [
            np.arange(n_impressions + 1, dtype=np.int32) * len(imp),
            n_impressions * len(imp) + np.arange(1, n_ratings + 1, dtype=np.int32) * len(rat),
        ]
    )
    event_type = pa.Array.from_buffers(
        pa.string(),
        n,
        [None, pa.py_buffer(offsets), pa.py_buffer(imp * n_impressions + rat * n_ratings)],
    )
    columns = [
        pa.array(user_id, pa.int64()),
        pa.array(item_id, pa.int64()),
        pa.array(ts, pa.int64()).view(pa.timestamp("us", tz="UTC")),
        event_type,
        pa.array(label, pa.float64()),
        _with_validity(pa.int32(), np.concatenate([position, pad_i32]), imp_valid),
        pa.array(request_id, pa.int64()),
        _with_validity(pa.float64(), np.concatenate([propensity, pad_f64]), imp_valid),
        _with_validity(pa.float64(), np.concatenate([np.zeros(n_impressions), value]), rat_valid),
    ]
    return pa.Table.from_arrays(columns, schema=EVENTS_ARROW_SCHEMA)


def _bitmap(valid: np.ndarray) -> pa.Buffer:
    return pa.py_buffer(np.packbits(valid, bitorder="little"))


def _with_validity(dtype: pa.DataType, values: np.ndarray, validity: pa.Buffer) -> pa.Array:
    return pa.Array.from_buffers(dtype, values.size, [validity, pa.py_buffer(values)])


__all__ = [
    "EVENTS_ARROW_SCHEMA",
    "US_PER_DAY",
    "DaySchedule",
    "Traffic",
    "click_model",
    "make_block",
]
