"""The logging policy: which items a request is shown, in which order, with what propensity.

For a request of user ``u`` on day ``t``:

1. **Candidates.** ``candidate_pool`` distinct live items, drawn with weight
   ``popularity_t(i) * exp(policy_category_tilt * <c_segment(u), c_category(i)>)``
   (popularity tilted towards the categories the user's segment likes);
   duplicates are redrawn until the pool is distinct.
2. **Scores.** ``s_i = log popularity_t(i) + policy_personalization * <û_u, v_i>``,
   where ``û_u`` is the policy's noisy and stale estimate of the user's vector.
3. **Order.** Gumbel-top-K of ``s_i / policy_temperature + Gumbel`` over the
   pool, i.e. a Plackett–Luce (softmax without replacement) sample of the
   slate, position 0 first.

**Propensity.** Each shown item ``i`` of a slate ``S`` (its ``K`` items) logs::

    propensity(i) = exp(s_i / T) / sum_{j in S} exp(s_j / T)

the Plackett–Luce probability that the policy puts ``i`` first among the
shown items. It sums to 1 over a slate and does not depend on how the pool was
drawn. The PL probability of the whole observed order ``i_0, ..., i_{K-1}``
(given the shown set) is recovered by sequential renormalisation over the items
still remaining::

    P(order | S) = prod_k propensity(i_k) / sum_{j >= k} propensity(i_j)

(the first factor is ``propensity(i_0)`` since the sum over all of ``S`` is 1).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from features.simulator.world import World

# Requests per affinity sub-batch: keeps the (rows, pool, d) gather in cache.
_AFFINITY_ROWS = 4096
# Stream extensions before the exact (slower) Gumbel fallback.
_MAX_EXTENSIONS = 8


class InverseCdfSampler:
    """Exact draws of indices with probability proportional to ``weights``.

    Inverse CDF with a guide table (Chen's method): ``guide[j]`` is the answer
    for ``u = j / L``, so a draw starts there and walks right while
    ``cdf[idx] <= u``; with ``L = 2n`` the walk is under one step on average,
    which beats a binary search over ``n`` entries severalfold.
    """

    def __init__(self, weights: np.ndarray) -> None:
        cdf = np.cumsum(weights, dtype=np.float64)
        if not cdf[-1] > 0:
            raise ValueError("sampler needs a positive total weight")
        cdf /= cdf[-1]
        cdf[-1] = 1.0  # u < 1 always ends the walk
        self.cdf = cdf
        self.log_weights = np.log(np.maximum(weights, 1e-300))
        self._scale = 2 * cdf.size
        self._guide = np.searchsorted(cdf, np.arange(self._scale) / self._scale, side="right")
        self._stream_lengths: dict[int, int] = {}

    @property
    def size(self) -> int:
        return self.cdf.size

    def draw(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
        """Indices of shape ``size`` (int64)."""
        u = rng.random(size)
        idx = self._guide[(u * self._scale).astype(np.int64)]
        flat_u, flat_idx = u.reshape(-1), idx.reshape(-1)
        todo = np.flatnonzero(self.cdf[flat_idx] <= flat_u)
        while todo.size:
            flat_idx[todo] += 1
            todo = todo[self.cdf[flat_idx[todo]] <= flat_u[todo]]
        return idx

    def draw_distinct(self, rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
        """(rows, k) indices, distinct within each row: successive sampling without
        replacement (the first ``k`` distinct values of a stream of i.i.d. draws).

        Each row draws a stream of ``m`` values at once, ``m`` chosen so that ``k``
        distinct ones are expected with margin; the few rows that fall short get
        their stream extended, so the result is exact, not truncated.
        """
        m = self._stream_length(k)
        out = np.empty((rows, k), dtype=np.int64)
        todo = np.arange(rows)
        draws = self.draw(rng, (rows, m))
        for _ in range(_MAX_EXTENSIONS):
            keep = _first_occurrences(draws)
            keep &= np.cumsum(keep, axis=1) <= k
            done = keep.sum(axis=1) == k
            out[todo[done]] = draws[done][keep[done]].reshape(-1, k)
            todo, draws = todo[~done], draws[~done]
            if not todo.size:
                return out
            draws = np.concatenate([draws, self.draw(rng, (todo.size, m))], axis=1)
        # Extremely concentrated weights: finish the stubborn rows by Gumbel-top-k
        # over all items, which is the same successive sampling, just slower.
        keys = self.log_weights[None, :] + rng.gumbel(size=(todo.size, self.size))
        out[todo] = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        return out

    def _stream_length(self, k: int) -> int:
        """Smallest m with E[distinct values in m draws] >= k + 3 sqrt(k) (capped)."""
        if k not in self._stream_lengths:
            p = np.diff(self.cdf, prepend=0.0)
            cap = max(k, 8 * k)

            def distinct(m: int) -> float:
                return float(np.sum(-np.expm1(m * np.log1p(-np.minimum(p, 1 - 1e-16)))))

            lo, hi = k, k
            while hi < cap and distinct(hi) < k + 3 * np.sqrt(k):
                lo, hi = hi, min(cap, 2 * hi)
            while lo < hi:  # smallest m in (lo, hi] meeting the target
                mid = (lo + hi) // 2
                lo, hi = (mid + 1, hi) if distinct(mid) < k + 3 * np.sqrt(k) else (lo, mid)
            self._stream_lengths[k] = hi
        return self._stream_lengths[k]


def _first_occurrences(draws: np.ndarray) -> np.ndarray:
    """(rows, m) bool: True where a value appears for the first time in its row.

    One SIMD sort of ``value * m + column`` per row puts equal values together,
    earliest column first; no per-row Python.
    """
    rows, m = draws.shape
    keys = np.sort(draws * m + np.arange(m), axis=1)
    first = np.ones(keys.shape, dtype=bool)
    first[:, 1:] = keys[:, 1:] // m != keys[:, :-1] // m
    keep = np.zeros(draws.size, dtype=bool)
    keep[(np.arange(rows) * m)[:, None] + keys % m] = first
    return keep.reshape(rows, m)


@dataclass(frozen=True)
class Slates:
    """What the policy showed: ``items`` (B, K) int64, position 0 first, and the
    ``propensity`` (B, K) float64 of each shown item (rows sum to 1, see module doc)."""

    items: np.ndarray
    propensity: np.ndarray


@dataclass(frozen=True)
class DayTables:
    """Per-day, read-only state shared by every block of that day."""

    day: int
    n_live: int
    log_popularity: np.ndarray  # (n_live,) float32
    # segment -> candidate sampler over live items; key -1 when the tilt is off.
    samplers: dict[int, InverseCdfSampler]
    user_vectors: np.ndarray  # (U, d) float32, true preferences on this day


class LoggingPolicy:
    """The policy that produced the log; also the control arm of A/B simulations."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.config = world.config
        self._lock = threading.Lock()
        self._cache: dict[int, DayTables] = {}

    def day_tables(self, day: int) -> DayTables:
        """Tables for ``day`` (built once; the last few days are cached)."""
        with self._lock:
            tables = self._cache.get(day)
            if tables is None:
                tables = self._build(day)
                if len(self._cache) >= 4:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[day] = tables
            return tables

    def _build(self, day: int) -> DayTables:
        world, c = self.world, self.config
        n_live = world.n_live(day)
        pop = world.popularity(day)[:n_live]
        if c.policy_category_tilt == 0:
            samplers = {-1: InverseCdfSampler(pop)}
        else:
            tilt = np.exp(c.policy_category_tilt * world.segment_category_affinity)
            cats = world.item_category[:n_live]
            samplers = {s: InverseCdfSampler(pop * tilt[s, cats]) for s in range(tilt.shape[0])}
        return DayTables(
            day=day,
            n_live=n_live,
            log_popularity=np.log(pop).astype(np.float32),
            samplers=samplers,
            user_vectors=world.user_vectors(day).astype(np.float32),
        )

    def candidates(
        self, users: np.ndarray, tables: DayTables, rng: np.random.Generator
    ) -> np.ndarray:
        """(B, candidate_pool) distinct live item ids for users (B,)."""
        pool = self.config.candidate_pool
        if -1 in tables.samplers:
            return tables.samplers[-1].draw_distinct(rng, users.size, pool)
        out = np.empty((users.size, pool), dtype=np.int64)
        segment = self.world.user_segment[users]
        for s in np.unique(segment):  # a handful of segments, not a loop over events
            rows = np.flatnonzero(segment == s)
            out[rows] = tables.samplers[int(s)].draw_distinct(rng, rows.size, pool)
        return out

    def scores(self, users: np.ndarray, items: np.ndarray, tables: DayTables) -> np.ndarray:
        """(B, C) policy scores ``log popularity + personalization * <û, v>`` (float32)."""
        out = tables.log_popularity[items]
        weight = self.config.policy_personalization
        if weight == 0:
            return out
        u_hat, v = self.world.policy_user_vectors, self.world.item_vectors32
        for lo in range(0, users.size, _AFFINITY_ROWS):
            sl = slice(lo, lo + _AFFINITY_ROWS)
            out[sl] += weight * np.einsum("bcd,bd->bc", v[items[sl]], u_hat[users[sl]])
        return out

    def sample(self, users: np.ndarray, day: int, rng: np.random.Generator) -> Slates:
        """Slates for users (B,) on ``day``: candidates, scores, Plackett–Luce order."""
        return self.sample_with(users, self.day_tables(day), rng)

    def sample_with(self, users: np.ndarray, tables: DayTables, rng: np.random.Generator) -> Slates:
        users = np.asarray(users, dtype=np.int64)
        k, temperature = self.config.slate_size, self.config.policy_temperature
        cand = self.candidates(users, tables, rng)
        logits = self.scores(users, cand, tables) / np.float32(temperature)
        # Gumbel-top-K: float32 uniforms are plenty; u = 0 gives key -inf (never first).
        with np.errstate(divide="ignore"):
            keys = logits - np.log(-np.log(rng.random(cand.shape, dtype=np.float32)))
        if k < cand.shape[1]:
            top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
            top = np.take_along_axis(
                top, np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1), axis=1
            )
        else:
            top = np.argsort(-keys, axis=1)
        shown = np.take_along_axis(logits, top, axis=1).astype(np.float64)
        shown = np.exp(shown - shown.max(axis=1, keepdims=True))
        return Slates(
            items=np.take_along_axis(cand, top, axis=1),
            propensity=shown / shown.sum(axis=1, keepdims=True),
        )
