"""Seeded, vectorised click-log simulator: the synthetic source and the A/B environment.

A world of users and items with typed attributes and hidden preference
vectors (:mod:`.world`), a logging policy that shows slates and logs
propensities (:mod:`.policy`), and a position-biased click model
(:mod:`.log`)::

    P(click | user, item, position p) = P(examine | p) * P(relevant | user, item)
    P(examine | p)  = 1 / (1 + p) ** examine_decay                   (p 0-based)
    P(relevant)     = sigmoid(relevance_scale * <u, v> + quality_weight * quality
                              + relevance_bias)

Output rows follow the canonical ``events`` contract in joined form: one
``impression`` row per shown slot whose ``label`` is the click (1.0 / 0.0),
with ``position``, a unique ``request_id`` per slate and the logging
``propensity`` (softmax of the policy scores over the slate; sums to 1 per
slate, see :mod:`.policy` for how to recover the full Plackett–Luce
probability of the order). A share ``rating_probability`` of clicks adds a
``rating`` row (same user, item and ``request_id``; ``value`` 1..5; ``label``
1.0 when ``value >= 4``; null ``position`` and ``propensity``) a few seconds
to minutes later.

Drifts start on their day and stay: ``covariate`` (a new user segment sends a
``strength`` share of the traffic), ``concept`` (every user vector turns by
``strength * pi / 2``: ``u' = cos t u + sin t J u`` with ``J`` a random
orthogonal skew-symmetric matrix, so ``cos(u, u') = cos t`` exactly) and
``popularity_shock`` (a ``strength`` share of items gets popularity x ``boost``).
Every day before a drift's day is byte-identical to a world without it.

Output is a pure function of the :class:`~infra.config.SimulatorConfig`
(``chunk_rows`` included, since blocks own random streams); generation is
numpy over whole blocks of requests, with no per-event Python.
"""

from features.simulator.policy import InverseCdfSampler, LoggingPolicy, Slates
from features.simulator.simulator import DATASET_META, ClickLogSimulator
from features.simulator.world import World, examine_probability

__all__ = [
    "DATASET_META",
    "ClickLogSimulator",
    "InverseCdfSampler",
    "LoggingPolicy",
    "Slates",
    "World",
    "examine_probability",
]
