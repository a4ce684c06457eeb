"""The simulated world: users, items, their hidden preferences, and its drifts.

Everything here is ground truth that a model never sees directly: latent
vectors, popularity weights and the drift schedule. The visible part is the
``users`` and ``items`` tables (typed attributes), built from the same draws so
that attributes carry signal:

- a user's vector is ``sqrt(a) * (sqrt(0.8) c_segment + sqrt(0.2) c_age) + sqrt(1 - a) z``
  and an item's is ``sqrt(a) * c_category + sqrt(1 - a) z`` with ``a =
  attribute_share``; every centroid and ``z`` is ``N(0, I / sqrt(d))``, so each
  vector component has variance ``1 / sqrt(d)`` and ``<u, v>`` has variance 1
  whatever ``latent_dim`` is, and ``relevance_scale`` means the same thing.
- ``device`` has no effect at all: a nuisance attribute, a control for
  feature-importance checks.
- item ``price`` follows its category's price level; ``quality`` enters
  relevance with ``quality_weight``.

Random streams are keyed (seed, stream, ...) so that adding a drift never
changes the world before its day: the base world, each drift and each day draw
from their own streams.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import polars as pl

from features.schemas import TS_DTYPE
from infra.config import SimulatorConfig

US_PER_DAY = 86_400 * 1_000_000
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55+")
AGE_SHARES = (0.18, 0.30, 0.24, 0.16, 0.12)
DEVICES = ("mobile", "desktop", "tablet")
DEVICE_SHARES = (0.62, 0.30, 0.08)
# Weight of segment vs age bucket inside a user's attribute part (variances sum to 1).
SEGMENT_WEIGHT = np.sqrt(0.8)
AGE_WEIGHT = np.sqrt(0.2)

# Stream tags of the keyed generators; see :func:`keyed_rng`.
STREAM_WORLD = 0
STREAM_DRIFT = 1
STREAM_SESSIONS = 2
STREAM_BLOCK = 3


def keyed_rng(seed: int, *key: int) -> np.random.Generator:
    """An independent generator for ``(seed, *key)``; same key, same stream."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def examine_probability(positions: npt.ArrayLike, decay: float) -> np.ndarray:
    """P(examine | position p) = 1 / (1 + p) ** decay, p 0-based; same shape as ``positions``."""
    return 1.0 / (1.0 + np.asarray(positions, dtype=np.float64)) ** decay


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function without overflow warnings (via tanh)."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _complex_structure(d: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal J with J^T = -J: ``<u, J u> = 0`` and ``|J u| = |u|``.

    So ``cos t * u + sin t * J u`` turns every vector by exactly ``t`` (for odd
    ``d`` one random direction stays fixed). Returned as ``(d, d)``.
    """
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    q *= np.sign(np.diag(r))  # Haar-uniform orthogonal matrix
    block = np.zeros((d, d))
    for k in range(0, d - 1, 2):
        block[k, k + 1], block[k + 1, k] = -1.0, 1.0
    return q @ block @ q.T


def _labels(prefix: str, codes: np.ndarray) -> pl.Series:
    """Categorical codes as strings (``s0``, ``c12``), built column-wise, not per row."""
    return pl.select(
        pl.concat_str(pl.lit(prefix), pl.lit(pl.Series(codes)).cast(pl.String))
    ).to_series()


@dataclass(frozen=True)
class _Drifts:
    """The drift schedule, drawn from the drift streams; all arrays are ground truth."""

    # One per covariate drift: (day, traffic share, first user index, end user index).
    covariate: tuple[tuple[int, float, int, int], ...]
    # One per concept drift, in day order: (day, theta, J (d, d)).
    concept: tuple[tuple[int, float, np.ndarray], ...]
    # One per popularity shock: (day, boolean mask of boosted items (N,), boost).
    shocks: tuple[tuple[int, np.ndarray, float], ...]


class World:
    """Entities, hidden vectors and the drift schedule of one :class:`SimulatorConfig`.

    User ids are ``0 .. n_users_total - 1`` (base users first, then the users of
    each covariate drift); item ids are ``0 .. world_size.n_items - 1`` in order of
    ``first_seen`` (an auto-increment catalogue), so the items live on a day
    are a prefix of the ids.
    """

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        c = config
        d = c.latent_dim
        sd = d**-0.25  # per-component std: makes <u, v> ~ unit variance
        a = c.attribute_share
        rng = keyed_rng(c.seed, STREAM_WORLD)

        # Centroids: base segments, age buckets, categories (new segments come with drifts).
        seg_centroids = rng.normal(0.0, sd, (c.n_user_segments, d))
        age_centroids = rng.normal(0.0, sd, (len(AGE_BUCKETS), d))
        cat_centroids = rng.normal(0.0, sd, (c.n_item_categories, d))

        size = c.world_size  # the effective sizes (scale applied), never the base fields
        # Users.
        n = size.n_users
        segment = rng.integers(0, c.n_user_segments, n)
        age = rng.choice(len(AGE_BUCKETS), n, p=AGE_SHARES)
        device = rng.choice(len(DEVICES), n, p=DEVICE_SHARES)
        activity = 1.0 + rng.pareto(c.activity_pareto_shape, n)  # Pareto(x_m = 1)
        z = rng.normal(0.0, sd, (n, d))
        attr = SEGMENT_WEIGHT * seg_centroids[segment] + AGE_WEIGHT * age_centroids[age]
        user_vec = np.sqrt(a) * attr + np.sqrt(1.0 - a) * z
        policy_err = rng.normal(0.0, sd * c.policy_affinity_noise, (n, d))

        # Items: ids ordered by arrival; popularity rank independent of id.
        m = size.n_items
        category = rng.integers(0, c.n_item_categories, m)
        price_level = rng.normal(3.0, 0.6, c.n_item_categories)
        price = np.round(np.exp(price_level[category] + rng.normal(0.0, 0.4, m)), 2)
        quality = rng.standard_normal(m)
        item_vec = np.sqrt(a) * cat_centroids[category] + np.sqrt(1.0 - a) * rng.normal(
            0.0, sd, (m, d)
        )
        rank = rng.permutation(m) + 1
        self.base_popularity = rank.astype(np.float64) ** -c.zipf_exponent  # (N,)
        self.arrival_day = self._arrival_days(c)  # (N,) int64

        # Drifts, each from its own stream so the base world above never changes.
        segments = [segment]
        ages, devices, activities = [age], [device], [activity]
        user_vecs, errs = [user_vec], [policy_err]
        centroids = [seg_centroids]
        covariate, concept, shocks = [], [], []
        next_user, next_segment = n, c.n_user_segments
        for k, drift in enumerate(c.drifts):
            drng = keyed_rng(c.seed, STREAM_DRIFT, k)
            if drift.kind == "covariate":
                n_new = max(1, round(drift.strength * n))
                centroid = drng.normal(0.0, sd, (1, d))
                new_age = drng.choice(len(AGE_BUCKETS), n_new, p=AGE_SHARES)
                new_attr = SEGMENT_WEIGHT * centroid + AGE_WEIGHT * age_centroids[new_age]
                centroids.append(centroid)
                segments.append(np.full(n_new, next_segment))
                ages.append(new_age)
                devices.append(drng.choice(len(DEVICES), n_new, p=DEVICE_SHARES))
                activities.append(1.0 + drng.pareto(c.activity_pareto_shape, n_new))
                user_vecs.append(
                    np.sqrt(a) * new_attr + np.sqrt(1.0 - a) * drng.normal(0.0, sd, (n_new, d))
                )
                errs.append(drng.normal(0.0, sd * c.policy_affinity_noise, (n_new, d)))
                covariate.append((drift.day, drift.strength, next_user, next_user + n_new))
                next_user += n_new
                next_segment += 1
            elif drift.kind == "concept":
                concept.append((drift.day, drift.strength * np.pi / 2, _complex_structure(d, drng)))
            else:
                boosted = drng.random(m) < drift.strength
                shocks.append((drift.day, boosted, drift.boost))
        concept.sort(key=lambda entry: entry[0])
        self.drifts = _Drifts(tuple(covariate), tuple(concept), tuple(shocks))

        self.user_segment = np.concatenate(segments)  # (U,)
        self.user_activity = np.concatenate(activities)  # (U,)
        self.user_vectors_day0 = np.concatenate(user_vecs)  # (U, d)
        # The logging policy's stale estimate of each user's preferences, float32 for speed.
        self.policy_user_vectors = (self.user_vectors_day0 + np.concatenate(errs)).astype(
            np.float32
        )
        self.item_vectors = item_vec  # (N, d)
        self.item_vectors32 = item_vec.astype(np.float32)
        self.item_quality = quality  # (N,)
        self.item_category = category  # (N,)
        self.segment_centroids = np.concatenate(centroids)  # (S, d), S includes drift segments
        # <c_segment, c_category> has unit variance by construction: the policy's tilt.
        self.segment_category_affinity = self.segment_centroids @ cat_centroids.T  # (S, C)
        self.n_users_total = self.user_segment.size
        self.users = self._users_frame(np.concatenate(ages), np.concatenate(devices))
        self.items = self._items_frame(category, price, quality)

    # ------------------------------------------------------------------ tables

    @staticmethod
    def _arrival_days(c: SimulatorConfig) -> np.ndarray:
        """Day each item goes live: the first ``n_initial_items`` on day 0, the rest spread
        evenly over days 1 .. n_days - 1 (all on day 0 for a one-day world)."""
        n_items = c.world_size.n_items
        n0, rest = c.n_initial_items, n_items - c.n_initial_items
        days = np.zeros(n_items, dtype=np.int64)
        if rest and c.n_days > 1:
            days[n0:] = 1 + (np.arange(rest) * (c.n_days - 1)) // rest
        return days

    def day_start_us(self, day: int) -> int:
        """Microseconds since the Unix epoch of ``day``'s midnight UTC."""
        epoch_days = (self.config.start_date - dt.date(1970, 1, 1)).days
        return (epoch_days + day) * US_PER_DAY

    def _users_frame(self, age: np.ndarray, device: np.ndarray) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "user_id": np.arange(self.n_users_total, dtype=np.int64),
                "segment": _labels("s", self.user_segment),
                "age_bucket": np.asarray(AGE_BUCKETS)[age],
                "device": np.asarray(DEVICES)[device],
                "activity": self.user_activity,
            },
            schema={
                "user_id": pl.Int64,
                "segment": pl.String,
                "age_bucket": pl.String,
                "device": pl.String,
                "activity": pl.Float64,
            },
        )

    def _items_frame(
        self, category: np.ndarray, price: np.ndarray, quality: np.ndarray
    ) -> pl.DataFrame:
        first_seen = np.asarray([self.day_start_us(int(d)) for d in range(self.config.n_days)])
        return pl.DataFrame(
            {
                "item_id": np.arange(self.item_vectors.shape[0], dtype=np.int64),
                "category": _labels("c", category),
                "price": price,
                "quality": quality,
                "first_seen": pl.Series(first_seen[self.arrival_day]).cast(TS_DTYPE),
            }
        )

    # ------------------------------------------------------------------ ground truth per day

    def n_live(self, day: int) -> int:
        """Items live on ``day``: ids ``0 .. n_live(day) - 1``."""
        return int(np.searchsorted(self.arrival_day, day, side="right"))

    def popularity(self, day: int) -> np.ndarray:
        """(N,) popularity weights on ``day`` (Zipf base times active shocks), live or not."""
        weights = self.base_popularity.copy()
        for start, boosted, boost in self.drifts.shocks:
            if day >= start:
                weights[boosted] *= boost
        return weights

    def user_vectors(self, day: int) -> np.ndarray:
        """(U, d) true preferences on ``day``: each active concept drift turns them by theta."""
        vectors = self.user_vectors_day0
        for start, theta, j in self.drifts.concept:
            if day >= start:
                vectors = np.cos(theta) * vectors + np.sin(theta) * (vectors @ j.T)
        return vectors

    def covariate_shares(self, day: int) -> list[tuple[float, int, int]]:
        """Active covariate drifts on ``day``: (traffic share, first user, end user)."""
        return [(share, lo, hi) for start, share, lo, hi in self.drifts.covariate if day >= start]

    def relevance_logit(
        self, user_vectors: np.ndarray, user_ids: np.ndarray, item_ids: np.ndarray
    ) -> np.ndarray:
        """``scale * <u, v> + quality_weight * quality + bias``, broadcast over the ids."""
        c = self.config
        u, i = np.broadcast_arrays(np.asarray(user_ids), np.asarray(item_ids))
        dots = np.einsum("...d,...d->...", user_vectors[u], self.item_vectors[i])
        return c.relevance_scale * dots + c.quality_weight * self.item_quality[i] + c.relevance_bias

    def relevance(self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, day: int) -> np.ndarray:
        """True P(relevant | user, item) on ``day``; ids broadcast, result has their shape."""
        logit = self.relevance_logit(
            self.user_vectors(day), np.asarray(user_ids), np.asarray(item_ids)
        )
        return sigmoid(logit)
