"""Exploration: how a served slate departs from the final ranking, with each slot's propensity.

The request path ranks candidates (reranker logits, then optionally MMR, see
:mod:`serving.diversity`) and hands the best-first order to :class:`Explorer`,
which picks the ``k`` shown items under the configured policy
(:class:`infra.config.ExplorationConfig`) and reports for every slot its
*propensity*: the probability that this item is shown at this slot given the
items shown in the slots above it. The product of a slate's propensities is the
probability of the whole slate (in order); a single slot's propensity is what
IPS/SNIPS evaluation of per-position clicks divides by.

Policies (``M`` ranked candidates, ``P = min(max(pool, k), M)`` of them in the
exploration pool, ``m`` the pool candidates not yet shown at a given slot):

- ``none``: the first ``k`` of the ranking; every propensity is 1.
- ``epsilon``: each slot takes, with probability ``epsilon``, a uniformly random
  remaining pool candidate, else the best remaining one (first in the ranking);
  propensity ``(1 - epsilon) * [chosen is the best remaining] + epsilon / m``.
- ``softmax``: Plackett-Luce over the pool by ``softmax(logit / temperature)``:
  each slot samples the remaining pool candidates in proportion to
  ``exp(logit / temperature)``; propensity is the chosen item's share among them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from infra.config import ExplorationConfig


@dataclass(frozen=True)
class Slate:
    """The shown list: ``order`` (n,) int64 positions into the candidate arrays, best slot
    first; ``propensities`` (n,) float64 in (0, 1], the probability of each slot's item given
    the slots above it (their product is the probability of the slate)."""

    order: np.ndarray
    propensities: np.ndarray

    def __len__(self) -> int:
        return int(self.order.shape[0])


class Explorer:
    """Applies :class:`ExplorationConfig` to ranked candidates; owns its random stream.

    ``config.seed`` None draws fresh OS entropy (one stream per replica); an int makes
    the sequence of slates reproducible. numpy's ``Generator`` serialises concurrent
    callers with its own lock, so one explorer may serve concurrent requests.
    """

    def __init__(self, config: ExplorationConfig) -> None:
        self.config = config
        self._rng = np.random.default_rng(config.seed)

    def choose(self, logits: np.ndarray, ranked: np.ndarray, k: int) -> Slate:
        """Pick ``min(k, len(ranked))`` distinct candidates and their propensities.

        ``logits`` (M,) float: the reranker's logits by candidate position (read only
        by ``softmax``; must be finite there). ``ranked`` (R,) int64 with R <= M:
        distinct candidate positions, best first (the reranker's order, or MMR's); the
        exploration pool is its first ``min(max(pool, k), R)`` entries, so a caller
        that truncates ``ranked`` to ``k`` leaves ``epsilon``/``softmax`` only
        reordering those ``k``.
        """
        logits = np.asarray(logits)
        ranked = np.asarray(ranked, dtype=np.int64)
        if logits.ndim != 1 or ranked.ndim != 1:
            raise ValueError(
                f"logits and ranked must be 1-D, got shapes {logits.shape} and {ranked.shape}"
            )
        if ranked.size and (ranked.min() < 0 or ranked.max() >= logits.shape[0]):
            raise ValueError(f"ranked positions must lie in [0, {logits.shape[0]})")
        n = max(0, min(k, ranked.shape[0]))
        if n == 0:
            return Slate(np.empty(0, np.int64), np.empty(0, np.float64))
        pool = ranked[: min(max(self.config.pool, n), ranked.shape[0])]
        kind = self.config.kind
        if kind == "none" or (kind == "epsilon" and self.config.epsilon == 0.0):
            return Slate(ranked[:n].copy(), np.ones(n, np.float64))
        if kind == "epsilon":
            return self._epsilon(pool, n)
        if kind == "softmax":
            return self._softmax(logits, pool, n)
        raise ValueError(f"unknown exploration kind {kind!r}")

    def _epsilon(self, pool: np.ndarray, n: int) -> Slate:
        """Epsilon-greedy down the slots: ``pool`` (P,) best first, ``n`` <= P slots."""
        eps = self.config.epsilon
        sizes = pool.shape[0] - np.arange(n)  # m: pool candidates left at each slot
        explore = self._rng.random(n) < eps
        picks = np.where(explore, self._rng.integers(0, sizes), 0)  # index among remaining
        remaining = pool.tolist()
        order = np.empty(n, np.int64)
        for slot, pick in enumerate(picks.tolist()):
            order[slot] = remaining.pop(pick)
        # An explored pick of index 0 is the best remaining too: the formula counts both paths.
        propensities = (1.0 - eps) * (picks == 0) + eps / sizes
        return Slate(order, np.minimum(propensities, 1.0))

    def _softmax(self, logits: np.ndarray, pool: np.ndarray, n: int) -> Slate:
        """Plackett-Luce over ``pool`` (P,) by ``logits[pool] / temperature``, ``n`` <= P slots.

        One draw of the whole ranking by the Gumbel-max trick (argsort of logits plus
        Gumbel noise is a Plackett-Luce sample); slot ``s``'s propensity is
        ``exp(z_s - logsumexp(z over the items not shown above s))``, the suffix
        log-sums taken by a reversed ``logaddexp`` scan, stable for any finite scale.
        """
        z = logits[pool].astype(np.float64) / self.config.temperature
        if not np.isfinite(z).all():
            raise ValueError("softmax exploration needs finite logits")
        perturbed = z + self._rng.gumbel(size=z.shape[0])
        sampled = np.argsort(-perturbed, kind="stable")  # every pool item, slot order
        z_sorted = z[sampled]
        remaining_lse = np.logaddexp.accumulate(z_sorted[::-1])[::-1]
        propensities = np.exp(z_sorted[:n] - remaining_lse[:n])
        return Slate(pool[sampled[:n]].copy(), np.clip(propensities, np.finfo(float).tiny, 1.0))
