"""A/B simulation and off-policy evaluation, with the simulator as the live environment.

Two policies (arms ``a`` and ``b``, chosen by name from :data:`POLICIES`) serve
the same simulated traffic for ``days`` days after the logged data:

1. **Traffic.** ``users`` users are enrolled (drawn without replacement from
   the world's base users, seeded); each day each sends a Poisson number of
   requests with mean ``requests_per_user_day * activity_u / mean activity``,
   so heavy users come back often and their clicks are correlated, as in a
   real log.
2. **Split.** A user is in arm B when ``sha256(salt:user_id) mod 100 <
   share_b``: deterministic, stable across days and reruns, independent of the
   user id's order; a new salt reshuffles.
3. **Serving.** Each request gets the slate (``slate_size`` items) of its
   arm's policy; the simulator decides the clicks with its own click model
   (:meth:`ClickLogSimulator.click_probability`: ``P(examine | position) *
   P(relevant | user, item)``, position bias included), not a copy of it.
4. **Truth.** Both arms' policies also answer *every* request of the other
   arm (counterfactually, never shown), and the simulator's expected click
   probabilities give each policy's true CTR on the whole traffic: no click
   noise, the same requests for both arms, so the true lift is what the
   experiment estimates.
5. **Estimates** (:mod:`pipelines.abtest_stats`): CTR per arm (clicks /
   impressions), lift B - A with a delta-method interval over per-user sums
   (the user is the unit of randomisation), a two-sided p-value, the relative
   lift, and a bootstrap over users as a check and a plot.
6. **Off-policy.** When arm A logs marginal propensities and arm B is
   deterministic, B's CTR is estimated from A's logged slots alone by
   item-position IPS and SNIPS (:func:`pipelines.abtest_stats.off_policy`) and
   compared with B's true CTR. The log (``ope_log``) is by default A serving
   *every* request of the experiment, as a logging run before the test would
   (the arm's own clicks kept, the other half's drawn by the simulator): then
   B's true CTR is taken on exactly the logged traffic. ``arm`` uses A's half
   only; its users are not the whole traffic, so the comparison with B's
   overall true CTR adds the split's noise (``true_ctr_b_on_logged`` is B's
   truth on those requests, the estimator's own target). With heavy-tailed
   activity (the simulator's Pareto) that noise is large on a few thousand users.

**Logging with propensities.** A ranking arm explores with ``explore`` (an
``epsilon``): with probability ``1 - epsilon`` a request gets the top
``slate_size`` of the ranking, else a uniformly random ordered
``slate_size``-subset of its top ``candidates``. The marginal probability that
item ``i`` is shown at position ``k`` is then exact and simple::

    mu(i at k | user) = (1 - epsilon) * [i is the ranking's k-th] + epsilon / candidates * [i in top]

which is what item-position IPS divides by. (The serving path's own
``serving.exploration`` reports each slot's probability *given the slots
above it*: the product is the slate's probability, right for slate-level IPS,
but not this per-position marginal; a deterministic target almost never
matches a whole explored slate, so slate-level IPS has no usable variance
here.) The two-stage arms (``affinity``, ``oracle``, ``reranked``) reorder the
top ``candidates`` of their first stage, which is the exploration pool of the
matching logged arm (``popularity``, ``retrieval``): the target is covered by
construction (``coverage`` reports it for any pair).

Policies (:data:`POLICIES`): ``random`` (uniform over live items; propensity
``1 / live items``), ``logging`` (the simulator's own logging policy,
stochastic; its logged propensity is a softmax share, not a marginal, so it
is no off-policy logger here), ``popularity`` (the day's most popular live
items), ``affinity`` (popularity's top ``candidates`` reordered by the
logging policy's own score: log popularity plus its noisy, stale estimate of
the user's taste), ``oracle`` (the same candidates by true relevance: the
best any reranker of them can do), and the serving path of a pipeline
workdir's trained models (:class:`serving.recommender.Recommender`):
``retrieval`` (two-tower + index order) and ``reranked`` (retrieval then the
MoE reranker). The store is frozen during the experiment and the clock is
fixed at its first midnight, so a serving arm's answer depends on the user
only and is computed once per user.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from features.simulator import ClickLogSimulator, InverseCdfSampler
from infra.config import RayrecConfig, ServingConfig
from infra.errors import RayrecError
from infra.logs import get_logger
from pipelines.abtest_stats import (
    BootstrapLift,
    LiftEstimate,
    OffPolicyEstimate,
    bootstrap_lift,
    lift_estimate,
    off_policy,
)

log = get_logger(__name__)


class AbTestError(RayrecError):
    """The experiment cannot run as asked (unknown policy, impossible settings)."""


@dataclass(frozen=True)
class AbTestSettings:
    """One experiment; every field is also a ``rayrec abtest simulate`` option."""

    a: str = "popularity"
    b: str = "affinity"
    # Users enrolled (each with a fixed arm); at most the world's base users.
    users: int = 5_000
    days: int = 7
    # Percent of users in arm B: 50 gives the narrowest interval on the lift.
    share_b: int = 50
    # Changing the salt reshuffles users between arms (a fresh experiment).
    salt: str = "abtest"
    # Mean requests of an average-activity user per day; heavier users send more.
    requests_per_user_day: float = 1.0
    # First simulated day; None: the day after the logged data (simulator.n_days).
    start_day: int | None = None
    # Arm A's exploration (see module doc): 0 serves the ranking's top; > 0 logs
    # marginal propensities that make off-policy estimates of arm B possible.
    explore: float = 0.0
    # Two-stage arms rerank this many first-stage candidates; exploration draws from
    # the same many, so a two-stage target is covered by its first stage's logger.
    candidates: int = 50
    # Off-policy log of arm A: "all" as if A had served every request of the experiment
    # (a logging run over the same traffic the truth is taken on: the estimate's error is
    # the estimator's own); "arm": A's half only (its users differ from the whole traffic,
    # so the comparison with B's true CTR also carries the split's sampling noise).
    ope_log: Literal["all", "arm"] = "all"
    bootstrap: int = 1_000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (self.a, self.b):
            if name not in POLICIES:
                raise AbTestError(f"unknown policy {name!r}: use one of {', '.join(POLICIES)}")
        if not 0 < self.share_b < 100:
            raise AbTestError(f"share_b must lie in 1..99 (percent of users), got {self.share_b}")
        if not 0.0 <= self.explore <= 1.0:
            raise AbTestError(f"explore must lie in [0, 1], got {self.explore}")
        if self.ope_log not in ("all", "arm"):
            raise AbTestError(f"ope_log must be 'all' or 'arm', got {self.ope_log!r}")
        if self.users < 2 or self.days < 1 or self.requests_per_user_day <= 0:
            raise AbTestError("need users >= 2, days >= 1 and requests_per_user_day > 0")


# ---------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Shown:
    """What an arm served to requests (B,): ``items`` (B, K) int64, position 0 first;
    ``propensity`` (B, K) the marginal probability of each item at its position (nan when
    the policy cannot say); ``support`` (B, L) the items it could have shown (None: any
    live item with the same propensity, e.g. ``random``)."""

    items: np.ndarray
    propensity: np.ndarray
    support: np.ndarray | None = None


class Arm(Protocol):
    """A policy serving slates; ``deterministic`` ones can be off-policy targets."""

    deterministic: bool
    logs_propensities: bool

    def serve(self, users: np.ndarray, day: int, k: int, rng: np.random.Generator) -> Shown: ...


class Ranking(Protocol):
    """A deterministic order of items per user and day."""

    def rank(self, users: np.ndarray, day: int, depth: int) -> np.ndarray:
        """(B, depth) item ids, best first, for users (B,) on ``day``."""
        ...


class PopularityRanking:
    """The day's most popular live items (the simulator's popularity, shocks included)."""

    def __init__(self, sim: ClickLogSimulator) -> None:
        self.sim = sim
        self._order: dict[int, np.ndarray] = {}

    def rank(self, users: np.ndarray, day: int, depth: int) -> np.ndarray:
        if day not in self._order:
            live = self.sim.n_live_items(day)
            self._order[day] = np.argsort(-self.sim.popularity(day)[:live], kind="stable")
        top = self._order[day][:depth]
        if top.size < depth:
            raise AbTestError(f"only {top.size} live items on day {day}, need {depth}")
        return np.broadcast_to(top, (users.size, depth)).copy()


Scorer = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


class RerankedRanking:
    """A first stage's top ``candidates`` reordered by ``scorer(users (B,), items (B, N), day)``."""

    def __init__(self, first: Ranking, candidates: int, scorer: Scorer) -> None:
        self.first, self.candidates, self.scorer = first, candidates, scorer

    def rank(self, users: np.ndarray, day: int, depth: int) -> np.ndarray:
        items = self.first.rank(users, day, max(depth, self.candidates))[:, : self.candidates]
        scores = np.asarray(self.scorer(users, items, day), dtype=np.float64)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
        return np.take_along_axis(items, order, axis=1)


class RankedArm:
    """Serves a :class:`Ranking`'s top ``k``, exploring with ``epsilon`` (module doc)."""

    def __init__(self, ranking: Ranking, epsilon: float = 0.0, pool: int = 50) -> None:
        self.ranking, self.epsilon, self.pool = ranking, epsilon, pool
        self.deterministic = epsilon == 0.0
        self.logs_propensities = True

    def serve(self, users: np.ndarray, day: int, k: int, rng: np.random.Generator) -> Shown:
        eps = self.epsilon
        if eps == 0.0:
            top = self.ranking.rank(users, day, k)
            return Shown(top, np.ones(top.shape), top)
        if self.pool < k:
            raise AbTestError(f"exploration pool ({self.pool}) smaller than the slate ({k})")
        ranked = self.ranking.rank(users, day, self.pool)  # (B, L)
        top = ranked[:, :k]
        items = top.copy()
        explore = np.flatnonzero(rng.random(users.size) < eps)
        if explore.size:
            # A uniformly random ordered k-subset of the pool: argsort of uniform keys.
            pick = np.argsort(rng.random((explore.size, self.pool)), axis=1)[:, :k]
            items[explore] = np.take_along_axis(ranked[explore], pick, axis=1)
        # Both paths can put the ranking's k-th item at position k: their probabilities add.
        propensity = (1.0 - eps) * (items == top) + eps / self.pool
        return Shown(items, propensity, ranked)


class RandomArm:
    """Uniformly random distinct live items, in random order: ``mu(i at k) = 1 / live``."""

    deterministic = False
    logs_propensities = True

    def __init__(self, sim: ClickLogSimulator) -> None:
        self.sim = sim

    def serve(self, users: np.ndarray, day: int, k: int, rng: np.random.Generator) -> Shown:
        live = self.sim.n_live_items(day)
        # Successive sampling from equal weights: a uniform k-subset in uniform order.
        items = InverseCdfSampler(np.ones(live)).draw_distinct(rng, users.size, k)
        return Shown(items, np.full(items.shape, 1.0 / live), None)


class LoggingArm:
    """The simulator's logging policy (candidate draw, then Plackett-Luce order)."""

    deterministic = False
    logs_propensities = False

    def __init__(self, sim: ClickLogSimulator) -> None:
        self.sim = sim

    def serve(self, users: np.ndarray, day: int, k: int, rng: np.random.Generator) -> Shown:
        slates = self.sim.sample_slates(users, day, rng)
        return Shown(slates.items[:, :k], np.full(slates.items[:, :k].shape, np.nan), None)


def policy_scores(sim: ClickLogSimulator) -> Scorer:
    """The logging policy's score ``log popularity + personalization * <u_hat, v>``."""

    def score(users: np.ndarray, items: np.ndarray, day: int) -> np.ndarray:
        return sim.policy.scores(users, items, sim.policy.day_tables(day))

    return score


def true_relevance(sim: ClickLogSimulator) -> Scorer:
    """The simulator's true ``P(relevant | user, item)``: the oracle reranker's score."""

    def score(users: np.ndarray, items: np.ndarray, day: int) -> np.ndarray:
        return sim.relevance(users[:, None], items, day)

    return score


class ServingRanking:
    """The in-process serving path (:class:`serving.recommender.Recommender`) as a ranking.

    The answer for a user is computed once (store frozen, clock fixed) and cached;
    ``reranked`` says which path the recommender must have taken (checked on every
    personalised answer, so a silent fallback to retrieval order cannot pass as a rerank).
    """

    def __init__(self, recommender: Any, reranked: bool) -> None:
        self.recommender, self.reranked = recommender, reranked
        self._cache: dict[int, np.ndarray] = {}
        self.fallbacks = 0

    def rank(self, users: np.ndarray, day: int, depth: int) -> np.ndarray:
        from serving.schemas import RecommendationRequest

        for user in np.unique(users).tolist():
            cached = self._cache.get(user)
            if cached is not None and cached.size >= depth:
                continue
            answer = self.recommender.recommend(RecommendationRequest(user_id=user, k=depth))
            if answer.fallback:
                self.fallbacks += 1
            elif answer.reranked != self.reranked:
                raise AbTestError(
                    f"user {user}: the serving path answered reranked={answer.reranked}, "
                    f"this arm needs reranked={self.reranked}"
                )
            ids = np.asarray([item.item_id for item in answer.items], dtype=np.int64)
            if ids.size < depth:
                raise AbTestError(f"user {user}: the serving path returned {ids.size} < {depth}")
            self._cache[user] = ids
        return (
            np.stack([self._cache[u][:depth] for u in users.tolist()])
            if users.size
            else (np.zeros((0, depth), np.int64))
        )


@dataclass
class PolicyContext:
    """What the policy builders need: the environment, the settings and (lazily) the serving
    path of ``config``'s workdir."""

    sim: ClickLogSimulator
    config: RayrecConfig
    settings: AbTestSettings
    _serving: dict[str, Any] = field(default_factory=dict)

    def recommender(self, reranked: bool) -> Any:
        """A :class:`Recommender` over the workdir's models (``serving.models_from``) whose
        every answer is reranked (generous deadline) or in retrieval order (a deadline every
        request is past: the documented ``reranked: false`` path); one bundle and store."""
        from features.online_store import make_online_store
        from pipelines.serving_sources import serving_sources
        from serving.bundle import ModelBundle
        from serving.recommender import Recommender

        key = "reranked" if reranked else "retrieval"
        if key not in self._serving:
            if "bundle" not in self._serving:
                self._serving["bundle"] = ModelBundle.load(serving_sources(self.config))
                self._serving["store"] = make_online_store(
                    self.config.features, self.config.paths.workdir
                )
            n = self.settings.candidates
            serving = ServingConfig.model_validate(
                {
                    **self.config.serving.model_dump(),
                    "candidates": n,
                    "max_k": n,
                    "deadline_ms": 1e9 if reranked else 1e-9,
                    "exploration": {"kind": "none"},
                }
            )
            start = self.sim.world.day_start_us(start_day(self.sim, self.settings)) / 1e6
            clock_at = dt.datetime.fromtimestamp(start, tz=dt.UTC)
            self._serving[key] = Recommender(
                self._serving["bundle"],
                self._serving["store"],
                serving,
                self.config.features,
                clock=lambda: clock_at,
            )
        return self._serving[key]

    def close(self) -> None:
        store = self._serving.get("store")
        if store is not None:
            store.close()


def _ranked(ctx: PolicyContext, ranking: Ranking, arm: str) -> RankedArm:
    """A ranking served as arm ``arm``; only arm A explores (it is the off-policy logger)."""
    epsilon = ctx.settings.explore if arm == "a" else 0.0
    return RankedArm(ranking, epsilon, ctx.settings.candidates)


# Explicit mapping, no getattr on strings: name -> builder(context, arm).
POLICIES: dict[str, Callable[[PolicyContext, str], Arm]] = {
    "random": lambda ctx, arm: RandomArm(ctx.sim),
    "logging": lambda ctx, arm: LoggingArm(ctx.sim),
    "popularity": lambda ctx, arm: _ranked(ctx, PopularityRanking(ctx.sim), arm),
    "affinity": lambda ctx, arm: _ranked(
        ctx,
        RerankedRanking(
            PopularityRanking(ctx.sim), ctx.settings.candidates, policy_scores(ctx.sim)
        ),
        arm,
    ),
    "oracle": lambda ctx, arm: _ranked(
        ctx,
        RerankedRanking(
            PopularityRanking(ctx.sim), ctx.settings.candidates, true_relevance(ctx.sim)
        ),
        arm,
    ),
    "retrieval": lambda ctx, arm: _ranked(ctx, ServingRanking(ctx.recommender(False), False), arm),
    "reranked": lambda ctx, arm: _ranked(ctx, ServingRanking(ctx.recommender(True), True), arm),
}


# ---------------------------------------------------------------------- the experiment


def in_arm_b(user_ids: Sequence[int] | np.ndarray, salt: str, share_b: int) -> np.ndarray:
    """(U,) bool: ``int(sha256(f"{salt}:{user_id}")[:8]) mod 100 < share_b``."""
    buckets = [
        int.from_bytes(hashlib.sha256(f"{salt}:{int(u)}".encode()).digest()[:8], "big") % 100
        for u in np.asarray(user_ids).tolist()
    ]
    return np.asarray(buckets, dtype=np.int64) < share_b


def start_day(sim: ClickLogSimulator, settings: AbTestSettings) -> int:
    return sim.config.n_days if settings.start_day is None else settings.start_day


@dataclass(frozen=True)
class Daily:
    """Per day (D,) and arm: observed clicks, impressions and true CTR on all traffic."""

    day: list[int]
    clicks: dict[str, list[float]]
    impressions: dict[str, list[float]]
    true_ctr: dict[str, list[float]]


@dataclass(frozen=True)
class AbTestResult:
    settings: AbTestSettings
    lift: LiftEstimate
    bootstrap: BootstrapLift
    true_ctr: dict[str, float]
    daily: Daily
    off_policy: OffPolicyEstimate | None
    # B's true CTR on exactly the requests arm A logged: the off-policy estimand itself.
    true_ctr_b_on_logged: float | None
    counts: dict[str, int]
    note: str

    @property
    def true_lift(self) -> float:
        return self.true_ctr["b"] - self.true_ctr["a"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (keys the benchmark and MLflow use)."""
        lift, boot = self.lift, self.bootstrap
        record: dict[str, Any] = {
            "policy_a": self.settings.a,
            "policy_b": self.settings.b,
            "ab_ctr_a": lift.ctr_a.value,
            "ab_ctr_b": lift.ctr_b.value,
            "ab_lift": lift.lift,
            "ab_se": lift.se,
            "ab_ci_low": lift.ci_low,
            "ab_ci_high": lift.ci_high,
            "ab_p_value": lift.p_value,
            "ab_relative_lift": lift.relative,
            "ab_relative_ci_low": lift.relative_ci_low,
            "ab_relative_ci_high": lift.relative_ci_high,
            "bootstrap_ci_low": boot.ci_low,
            "bootstrap_ci_high": boot.ci_high,
            "bootstrap_relative_ci_low": boot.relative_ci_low,
            "bootstrap_relative_ci_high": boot.relative_ci_high,
            "true_ctr_a": self.true_ctr["a"],
            "true_ctr_b": self.true_ctr["b"],
            "true_lift": self.true_lift,
            "true_relative_lift": self.true_ctr["b"] / self.true_ctr["a"] - 1.0,
            "ci_covers_true_lift": lift.ci_low <= self.true_lift <= lift.ci_high,
            "ci_excludes_zero": lift.ci_low > 0 or lift.ci_high < 0,
            "counts": self.counts,
            "daily": asdict(self.daily),
            "settings": asdict(self.settings),
            "note": self.note,
        }
        ope = self.off_policy
        if ope is not None:
            truth = self.true_ctr["b"]
            record.update(
                {
                    "ips_ctr": ope.ips.value,
                    "ips_ci_low": ope.ips.ci_low,
                    "ips_ci_high": ope.ips.ci_high,
                    "snips_ctr": ope.snips.value,
                    "snips_ci_low": ope.snips.ci_low,
                    "snips_ci_high": ope.snips.ci_high,
                    "ips_relative_error": ope.ips.value / truth - 1.0,
                    "snips_relative_error": ope.snips.value / truth - 1.0,
                    "true_ctr_b_on_logged": self.true_ctr_b_on_logged,
                    "ope_coverage": ope.coverage,
                    "ope_matched_slots": ope.matched_slots,
                    "ope_logged_slots": ope.logged_slots,
                    "ope_effective_slots": ope.effective_slots,
                    "ope_mean_weight": ope.mean_weight,
                    "ope_max_weight": ope.max_weight,
                }
            )
        return record


@dataclass
class _Log:
    """Arm A's logged slots for the off-policy estimate, one array per day."""

    user: list[np.ndarray] = field(default_factory=list)
    clicks: list[np.ndarray] = field(default_factory=list)
    target: list[np.ndarray] = field(default_factory=list)
    propensity: list[np.ndarray] = field(default_factory=list)
    covered: int = 0
    target_slots: int = 0
    true_b_clicks: float = 0.0


def simulate(
    sim: ClickLogSimulator, arm_a: Arm, arm_b: Arm, settings: AbTestSettings
) -> AbTestResult:
    """Run the experiment of ``settings`` with the two arms (module doc for the protocol)."""
    rng = np.random.default_rng(np.random.SeedSequence(settings.seed, spawn_key=(0,)))
    n_base = sim.config.world_size.n_users
    if settings.users > n_base:
        raise AbTestError(f"users ({settings.users}) exceeds the world's {n_base} base users")
    k = sim.config.slate_size
    enrolled = np.sort(rng.choice(n_base, settings.users, replace=False)).astype(np.int64)
    arm_of = in_arm_b(enrolled, settings.salt, settings.share_b).astype(np.int64)  # (U,) 0=a 1=b
    if arm_of.min() == arm_of.max():
        raise AbTestError("every enrolled user landed in one arm: enrol more users")
    activity = sim.world.user_activity[enrolled]
    rate = settings.requests_per_user_day * activity / activity.mean()
    arms = (arm_a, arm_b)
    ope_on = arm_a.logs_propensities and arm_b.deterministic
    logged = _Log()

    n_users = enrolled.size
    clicks_of = np.zeros(n_users)
    impressions_of = np.zeros(n_users)
    first = start_day(sim, settings)
    days = list(range(first, first + settings.days))
    daily = Daily(days, {"a": [], "b": []}, {"a": [], "b": []}, {"a": [], "b": []})
    true_clicks = np.zeros(2)
    n_requests = 0
    for day in days:
        day_rng = np.random.default_rng(np.random.SeedSequence(settings.seed, spawn_key=(1, day)))
        counts = day_rng.poisson(rate)
        index = np.repeat(np.arange(n_users), counts)  # (R,) enrolled-user index per request
        users = enrolled[index]
        arm = arm_of[index]
        n_requests += users.size
        served: list[Shown] = []
        p_clicks: list[np.ndarray] = []
        for j, policy in enumerate(arms):
            # Every request, both arms: the arm's own rows are the experiment, the others
            # the counterfactual that gives the policy's true CTR on the same traffic.
            shown = policy.serve(users, day, k, day_rng)
            p = sim.click_probability(users, shown.items, day)  # (R, K)
            served.append(shown)
            p_clicks.append(p)
            true_clicks[j] += p.sum()
            daily.true_ctr["ab"[j]].append(float(p.mean()) if p.size else float("nan"))
            rows = np.flatnonzero(arm == j)
            clicked = day_rng.random((rows.size, k)) < p[rows]
            clicks_of += np.bincount(index[rows], weights=clicked.sum(axis=1), minlength=n_users)
            impressions_of += np.bincount(index[rows], minlength=n_users) * k
            daily.clicks["ab"[j]].append(float(clicked.sum()))
            daily.impressions["ab"[j]].append(float(rows.size * k))
            if j == 0 and ope_on:
                # A's log: its arm's impressions, or (ope_log "all") A on every request, the
                # arm's own clicks kept and the other requests' clicks drawn afresh.
                log_clicks = np.zeros(p.shape, dtype=bool)
                log_clicks[rows] = clicked
                if settings.ope_log == "all":
                    others = np.flatnonzero(arm != 0)
                    log_clicks[others] = day_rng.random((others.size, k)) < p[others]
        if ope_on:
            rows = np.flatnonzero(arm == 0) if settings.ope_log == "arm" else np.arange(arm.size)
            a_shown, b_items = served[0], served[1].items
            logged.user.append(np.repeat(index[rows], k))
            logged.clicks.append(log_clicks[rows].reshape(-1).astype(np.float64))
            logged.propensity.append(a_shown.propensity[rows].reshape(-1))
            logged.target.append((a_shown.items[rows] == b_items[rows]).reshape(-1) * 1.0)
            logged.true_b_clicks += float(p_clicks[1][rows].sum())
            if a_shown.support is None:  # any live item, at any position
                logged.covered += b_items[rows].size
            else:
                support = a_shown.support[rows]
                logged.covered += int(
                    (b_items[rows][:, :, None] == support[:, None, :]).any(axis=2).sum()
                )
            logged.target_slots += b_items[rows].size

    in_b = arm_of == 1
    lift = lift_estimate(
        clicks_of[~in_b],
        impressions_of[~in_b],
        clicks_of[in_b],
        impressions_of[in_b],
        settings.level,
    )
    boot = bootstrap_lift(
        clicks_of[~in_b],
        impressions_of[~in_b],
        clicks_of[in_b],
        impressions_of[in_b],
        np.random.default_rng(np.random.SeedSequence(settings.seed, spawn_key=(2,))),
        settings.bootstrap,
        settings.level,
    )
    total_impressions = max(1, n_requests * k)
    true_ctr = {"a": true_clicks[0] / total_impressions, "b": true_clicks[1] / total_impressions}
    ope = None
    true_b_logged = None
    note = ""
    if ope_on and logged.user:
        slots = int(sum(x.size for x in logged.user))
        ope = off_policy(
            np.concatenate(logged.user),
            np.concatenate(logged.clicks),
            np.concatenate(logged.target),
            np.concatenate(logged.propensity),
            coverage=logged.covered / max(1, logged.target_slots),
            level=settings.level,
        )
        true_b_logged = logged.true_b_clicks / max(1, slots)
    elif not arm_a.logs_propensities:
        note = f"no off-policy estimate: arm A ({settings.a}) logs no marginal propensities"
    elif not arm_b.deterministic:
        note = f"no off-policy estimate: arm B ({settings.b}) is not deterministic"
    if settings.explore == 0.0 and not isinstance(arm_a, RandomArm) and ope is not None:
        note = "arm A does not explore (explore=0): IPS sees only slots where B agrees with A"
    return AbTestResult(
        settings=settings,
        lift=lift,
        bootstrap=boot,
        true_ctr={key: float(value) for key, value in true_ctr.items()},
        daily=daily,
        off_policy=ope,
        true_ctr_b_on_logged=true_b_logged,
        counts={
            "users_a": int((~in_b).sum()),
            "users_b": int(in_b.sum()),
            "requests": int(n_requests),
            "impressions_a": int(impressions_of[~in_b].sum()),
            "impressions_b": int(impressions_of[in_b].sum()),
            "clicks_a": int(clicks_of[~in_b].sum()),
            "clicks_b": int(clicks_of[in_b].sum()),
            "slate_size": k,
        },
        note=note,
    )


# ---------------------------------------------------------------------- plots and MLflow


def plot_daily(result: AbTestResult, path: Path) -> None:
    """Observed CTR per arm and day (solid) beside each policy's true CTR (dashed)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    daily = result.daily
    fig, axis = plt.subplots(figsize=(7, 4))
    for arm, color in (("a", "tab:blue"), ("b", "tab:orange")):
        clicks = np.asarray(daily.clicks[arm])
        shown = np.maximum(np.asarray(daily.impressions[arm]), 1.0)
        name = getattr(result.settings, arm)
        axis.plot(daily.day, clicks / shown, marker="o", color=color, label=f"{arm}: {name}")
        axis.plot(daily.day, daily.true_ctr[arm], ls="--", color=color, label=f"{arm} true")
    axis.set_xlabel("simulated day")
    axis.set_ylabel("CTR (clicks / impressions)")
    axis.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_bootstrap(result: AbTestResult, path: Path) -> None:
    """Bootstrap distribution of the lift, its interval, the delta-method one and the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    boot, lift = result.bootstrap, result.lift
    fig, axis = plt.subplots(figsize=(7, 4))
    axis.hist(boot.samples, bins=50, color="tab:gray", alpha=0.7, label="bootstrap over users")
    for x in (boot.ci_low, boot.ci_high):
        axis.axvline(x, color="tab:gray", ls=":")
    axis.axvspan(lift.ci_low, lift.ci_high, color="tab:blue", alpha=0.12, label="delta-method CI")
    axis.axvline(result.true_lift, color="tab:red", label="true lift")
    axis.axvline(0.0, color="black", lw=0.8)
    axis.set_xlabel("CTR lift, B - A")
    axis.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_to_mlflow(config: RayrecConfig, result: AbTestResult) -> str:
    """One MLflow run: settings as params, the figures as metrics, plots and the record."""
    import mlflow

    from infra.storage import StoragePath
    from infra.tracking import setup_mlflow

    setup_mlflow(config.mlflow, StoragePath.from_uri(config.paths.workdir))
    record = result.to_dict()
    settings = result.settings
    with mlflow.start_run(run_name=f"abtest-{settings.a}-vs-{settings.b}-{settings.salt}") as run:
        mlflow.set_tag("rayrec.kind", "abtest")
        mlflow.log_params({f"abtest.{k}": v for k, v in asdict(settings).items()})
        metrics = {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        for i, day in enumerate(result.daily.day):
            for arm in ("a", "b"):
                shown = max(1.0, result.daily.impressions[arm][i])
                mlflow.log_metric(f"daily_ctr_{arm}", result.daily.clicks[arm][i] / shown, step=day)
                mlflow.log_metric(f"daily_true_ctr_{arm}", result.daily.true_ctr[arm][i], step=day)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            plot_daily(result, folder / "daily_ctr.png")
            plot_bootstrap(result, folder / "bootstrap_lift.png")
            (folder / "abtest.json").write_text(json.dumps(record, indent=2, default=float))
            mlflow.log_artifacts(str(folder), artifact_path="abtest")
        return str(run.info.run_id)


def run_abtest(
    config: RayrecConfig, settings: AbTestSettings, track: bool = True
) -> tuple[AbTestResult, str | None]:
    """Build the world of ``config.simulator`` and both arms, run, log; returns the result and
    the MLflow run id (None untracked)."""
    sim = ClickLogSimulator(config.simulator, threads=1)
    ctx = PolicyContext(sim, config, settings)
    try:
        arm_a = POLICIES[settings.a](ctx, "a")
        arm_b = POLICIES[settings.b](ctx, "b")
        if settings.explore > 0 and not isinstance(arm_a, RankedArm):
            raise AbTestError(f"explore needs a ranking policy as arm A, not {settings.a!r}")
        result = simulate(sim, arm_a, arm_b, settings)
    finally:
        ctx.close()
    log.info("abtest.done", **{k: v for k, v in result.to_dict().items() if k.startswith("ab_")})
    run_id = log_to_mlflow(config, result) if track else None
    return result, run_id
