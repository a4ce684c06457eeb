"""Offline retrieval metrics: full ranking over the catalogue, sampled ranking, bootstrap CIs.

Users and items are dense indices (``0..U-1``, ``0..I-1``); the feature layer's
:func:`features.splits.user_item_matrix` builds the CSR arrays that
:class:`UserItems` wraps.

Full ranking (:func:`full_ranking_metrics`) scores every item for every user
with at least one test item, sets the user's training items to ``-inf`` and
takes the top ``max(ks)`` with ``torch.topk``. The accuracy metrics follow
RecBole's definitions (``recbole/evaluator/metrics.py``), per user, then
averaged over the evaluated users; with ``R(u)`` the user's test items and
``hit_j = 1`` when the item at rank ``j`` (1-based) is in ``R(u)``:

========================= =======================================================
``recall@K``              ``sum_{j<=K} hit_j / |R(u)|``
``precision@K``           ``sum_{j<=K} hit_j / K``
``hit@K``                 ``1`` if any ``hit_j = 1`` for ``j <= K``, else ``0``
``mrr@K``                 ``1 / j*`` with ``j*`` the rank of the first hit if
                          ``j* <= K``, else ``0``
``ndcg@K``                ``DCG / IDCG`` with ``DCG = sum_{j<=K} hit_j / log2(j+1)``
                          and ``IDCG = sum_{j<=min(|R(u)|, K)} 1 / log2(j+1)``
========================= =======================================================

``|R(u)|`` counts every test item, also one the user already had in training
(it is masked, so it can never be hit), as RecBole's ``pos_len`` does. A slot
whose score is ``-inf`` (a masked training item, when fewer than ``K`` items
are left) is not a recommendation: it is never a hit and does not count for
coverage or popularity. Ties in the scores are broken by ``torch.topk``.

Beyond accuracy (popularity ``pop(i)`` = training interactions of item ``i``,
``item_popularity`` when given, else distinct training users per item):

========================= =======================================================
``coverage@K``            distinct items in any evaluated user's top K / n_items
                          (RecBole ``ItemCoverage``; one number, no per-user value)
``arp@K``                 mean over users of the mean ``pop`` of their top-K items
                          (RecBole ``AveragePopularity``)
``arp_ratio@K``           ``arp@K`` / (mean over users of the mean ``pop`` of their
                          test items): above 1, the model recommends more popular
                          items than the users went on to consume
``head_share@K``          mean over users of the share of their top-K slots held by
                          head items; the head is the most popular items (by
                          ``pop`` descending, ties by lower index) up to and
                          including the first at which their cumulative ``pop``
                          reaches ``head_fraction`` (20%) of all of ``pop``
========================= =======================================================

Sampled ranking (:func:`sampled_ranking_metrics`) ranks each test item
against ``n_negatives`` items the user never interacted with; its keys carry a
``sampled_`` prefix because its numbers are not comparable with full-ranking
ones (they are much higher, and they do not even order models consistently:
Krichene & Rendle, "On Sampled Metrics for Item Recommendation", KDD 2020).

Confidence intervals are percentile bootstraps over users (the unit that is
sampled from the population), all metrics of a report from the same resamples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

ScoreFn = Callable[[np.ndarray], "np.ndarray | torch.Tensor"]
ScoreItemsFn = Callable[[np.ndarray, np.ndarray], "np.ndarray | torch.Tensor"]

# The metrics kept per user (coverage and arp_ratio are catalogue-level numbers).
USER_METRICS = ("recall", "ndcg", "mrr", "hit", "precision")
POPULARITY_METRICS = ("arp", "head_share")
SAMPLED_PREFIX = "sampled_"
# Bootstrap resamples are drawn in chunks of at most this many (resample, user)
# cells, so 1,000 resamples over 1M users never hold a 1e9-cell matrix.
_BOOT_CHUNK_CELLS = 1 << 22


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class UserItems:
    """A set of items per user as CSR: ``indices[indptr[u]:indptr[u+1]]`` are u's items.

    ``indptr``: ``(U + 1,)`` int64, non-decreasing from 0; ``indices``: ``(nnz,)``
    int64 item indices, sorted and distinct within a user.
    """

    indptr: np.ndarray
    indices: np.ndarray

    def __post_init__(self) -> None:
        indptr = np.ascontiguousarray(self.indptr, dtype=np.int64)
        indices = np.ascontiguousarray(self.indices, dtype=np.int64)
        if indptr.ndim != 1 or indptr.size == 0 or indptr[0] != 0:
            raise ValueError("indptr must be a 1-d array that starts at 0")
        if indices.ndim != 1 or indptr[-1] != indices.size:
            raise ValueError(f"indptr ends at {indptr[-1]} but there are {indices.size} indices")
        if np.any(np.diff(indptr) < 0):
            raise ValueError("indptr must be non-decreasing")
        if indices.size and indices.min() < 0:
            raise ValueError("item indices must be >= 0")
        object.__setattr__(self, "indptr", indptr)
        object.__setattr__(self, "indices", indices)

    @property
    def n_users(self) -> int:
        return self.indptr.size - 1

    def items_of(self, user: int) -> np.ndarray:
        """``(n_u,)`` the items of ``user``."""
        return self.indices[self.indptr[user] : self.indptr[user + 1]]

    def lengths(self) -> np.ndarray:
        """``(U,)`` int64 items per user."""
        return np.diff(self.indptr)

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, n_users: int) -> UserItems:
        """CSR of ``(users[k], items[k])`` pairs, ``(P,)`` each; repeated pairs count once."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if users.shape != items.shape or users.ndim != 1:
            raise ValueError(f"users {users.shape} and items {items.shape} must be equal 1-d")
        if users.size and (users.min() < 0 or users.max() >= n_users):
            raise ValueError(f"user indices must lie in [0, {n_users})")
        order = np.lexsort((items, users))
        users, items = users[order], items[order]
        keep = np.ones(users.size, dtype=bool)
        keep[1:] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])
        users, items = users[keep], items[keep]
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
        return cls(indptr, items)

    def rows(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pairs of ``users`` ``(B,)`` as ``(row, item)``, ``row`` the position in ``users``."""
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lengths = ends - starts
        row = np.repeat(np.arange(users.size, dtype=np.int64), lengths)
        # Position of each pair inside its user's slice, then the absolute index.
        offsets = np.arange(row.size, dtype=np.int64) - np.repeat(
            np.cumsum(lengths) - lengths, lengths
        )
        return row, self.indices[np.repeat(starts, lengths) + offsets]


@dataclass(frozen=True)
class RankingReport:
    """Metrics of one evaluation.

    ``metrics``: ``"recall@10" -> value`` (means over the evaluated users, plus
    catalogue-level numbers); ``per_user``: the same keys for the user-level
    metrics, ``(n_users,)`` float64 each, aligned with ``users`` (the evaluated
    user indices); ``intervals``: bootstrap CIs filled by the evaluator when it
    was asked for them (see :meth:`confidence_intervals` for any level).
    """

    metrics: dict[str, float]
    n_users: int
    per_user: dict[str, np.ndarray]
    users: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    def confidence_intervals(
        self, level: float = 0.95, n_boot: int = 1000, seed: int = 0
    ) -> dict[str, tuple[float, float]]:
        """Percentile bootstrap CI of every user-level metric, all from the same resamples."""
        names = list(self.per_user)
        if not names:
            return {}
        values = np.stack([self.per_user[n] for n in names], axis=1)
        bounds = _percentile_bounds(_bootstrap_means(values, n_boot, seed), level)
        return {n: (float(bounds[0, j]), float(bounds[1, j])) for j, n in enumerate(names)}


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    values: np.ndarray, level: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` ``(n,)``; ``(nan, nan)`` when empty.

    Equal to :meth:`RankingReport.confidence_intervals` for the same values and seed.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-d, got shape {values.shape}")
    bounds = _percentile_bounds(_bootstrap_means(values[:, None], n_boot, seed), level)
    return float(bounds[0, 0]), float(bounds[1, 0])


def _bootstrap_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, M)`` column means of ``values`` ``(n, M)`` over resamples of its rows.

    Each resample's counts (how often each row was drawn) come from ``bincount``
    of uniform draws, and the means are one matrix product per chunk.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    n, m = values.shape
    if n == 0:
        return np.full((n_boot, m), np.nan)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_CELLS // n)
    out = np.empty((n_boot, m))
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        draws = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
        counts = np.bincount(draws.ravel(), minlength=rows * n).reshape(rows, n)
        out[start : start + rows] = counts @ values / n
    return out


def _percentile_bounds(means: np.ndarray, level: float) -> np.ndarray:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    alpha = (1.0 - level) / 2.0
    return np.quantile(means, [alpha, 1.0 - alpha], axis=0)


# --------------------------------------------------------------------------- full ranking


def full_ranking_metrics(
    score_fn: ScoreFn,
    train: UserItems,
    test: UserItems,
    n_items: int,
    ks: Sequence[int] = (10, 20, 50, 100),
    batch_users: int = 1024,
    item_popularity: np.ndarray | None = None,
    head_fraction: float = 0.2,
    max_batch_bytes: int = 256 * 2**20,
) -> RankingReport:
    """Rank all ``n_items`` for every user with a test item, training items excluded.

    ``score_fn(users (B,)) -> (B, n_items)`` scores (numpy or torch, any device;
    higher is better). A batch holds at most ``batch_users`` users and at most
    ``max_batch_bytes`` of float32 scores, counting ``score_fn``'s output and
    the copy that gets the ``-inf`` mask (so 40k items give 838 users a batch);
    the caller's array is never written. Metric definitions: module doc.

    ``train`` holds every item to exclude: to score the test part, pass train and
    valid together, as RecBole masks both at test time.
    """
    ks = _check_ks(ks)
    _check_pairs(train, test, n_items)
    users = np.flatnonzero(test.lengths() > 0).astype(np.int64)
    pop = _popularity(train, n_items, item_popularity)
    head = _head_items(pop, head_fraction)
    k_top = min(ks[-1], n_items)
    per_row_bytes = 2 * 4 * n_items
    batch = max(1, min(batch_users, max_batch_bytes // per_row_bytes))

    parts: list[dict[str, np.ndarray]] = []
    test_pop = np.empty(users.size)
    covered = {k: np.zeros(n_items, dtype=bool) for k in ks}
    for start in range(0, users.size, batch):
        batch_users_idx = users[start : start + batch]
        scores = _masked_scores(score_fn(batch_users_idx), batch_users_idx, train, n_items)
        values, top = torch.topk(scores, k_top, dim=1)
        top_items = top.cpu().numpy().astype(np.int64)
        valid = torch.isfinite(values).cpu().numpy()
        hits = _hits(top_items, valid, batch_users_idx, test, n_items)
        n_test = test.lengths()[batch_users_idx]
        part = _accuracy(hits, n_test, ks)
        part.update(_popularity_per_user(top_items, valid, pop, head, ks))
        parts.append(part)
        for k in ks:
            covered[k][top_items[:, :k][valid[:, :k]]] = True
        row, item = test.rows(batch_users_idx)
        test_pop[start : start + batch_users_idx.size] = np.bincount(
            row, weights=pop[item], minlength=batch_users_idx.size
        ) / np.maximum(n_test, 1)

    per_user = {
        key: np.concatenate([p[key] for p in parts]) if parts else np.zeros(0)
        for key in _per_user_keys(ks)
    }
    metrics = {key: _mean(v) for key, v in per_user.items()}
    mean_test_pop = _mean(test_pop)
    for k in ks:
        metrics[f"coverage@{k}"] = float(covered[k].sum() / n_items)
        metrics[f"arp_ratio@{k}"] = (
            metrics[f"arp@{k}"] / mean_test_pop if mean_test_pop > 0 else float("nan")
        )
    return RankingReport(metrics=metrics, n_users=int(users.size), per_user=per_user, users=users)


def _masked_scores(
    out: np.ndarray | torch.Tensor, users: np.ndarray, train: UserItems, n_items: int
) -> torch.Tensor:
    """``(B, n_items)`` float scores with ``users``' training items at ``-inf``, on out's device.

    Always a copy: ``score_fn`` may hand back a cached array, which must stay intact.
    """
    scores = torch.as_tensor(out)
    if scores.shape != (users.size, n_items):
        raise ValueError(
            f"score_fn returned shape {tuple(scores.shape)}, expected ({users.size}, {n_items})"
        )
    dtype = scores.dtype if scores.dtype in (torch.float32, torch.float64) else torch.float32
    scores = scores.to(dtype=dtype, copy=True)
    if torch.isnan(scores).any():
        raise ValueError("score_fn returned NaN scores")
    row, item = train.rows(users)
    if row.size:
        device = scores.device
        scores[torch.from_numpy(row).to(device), torch.from_numpy(item).to(device)] = -torch.inf
    return scores


def _hits(
    top_items: np.ndarray, valid: np.ndarray, users: np.ndarray, test: UserItems, n_items: int
) -> np.ndarray:
    """``(B, k)`` bool: the item at each rank is one of the user's test items."""
    row, item = test.rows(users)
    test_keys = row * n_items + item
    top_keys = np.arange(users.size, dtype=np.int64)[:, None] * n_items + top_items
    return np.isin(top_keys, test_keys) & valid


def _accuracy(hits: np.ndarray, n_test: np.ndarray, ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """RecBole's recall, precision, hit, mrr and ndcg at each K from ``hits`` ``(B, k)``."""
    k_top = hits.shape[1]
    hits_f = hits.astype(np.float64)
    cum_hits = np.cumsum(hits_f, axis=1)
    discount = 1.0 / np.log2(np.arange(2, k_top + 2))
    cum_dcg = np.cumsum(hits_f * discount, axis=1)
    # IDCG over min(|R(u)|, K) ideal hits: ideal_dcg[m] = sum of the first m discounts.
    max_k = max(ks)
    ideal_dcg = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, max_k + 2)))])
    any_hit = hits.any(axis=1)
    first = np.where(any_hit, hits.argmax(axis=1), k_top)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        col = min(k, k_top) - 1
        n_hit = cum_hits[:, col]
        out[f"recall@{k}"] = n_hit / n_test
        out[f"precision@{k}"] = n_hit / k
        out[f"hit@{k}"] = (n_hit > 0).astype(np.float64)
        out[f"mrr@{k}"] = np.where(first < k, 1.0 / (first + 1.0), 0.0)
        out[f"ndcg@{k}"] = cum_dcg[:, col] / ideal_dcg[np.minimum(n_test, k)]
    return out


def _popularity(train: UserItems, n_items: int, given: np.ndarray | None) -> np.ndarray:
    if given is None:
        return np.bincount(train.indices, minlength=n_items).astype(np.float64)
    pop = np.asarray(given, dtype=np.float64)
    if pop.shape != (n_items,):
        raise ValueError(f"item_popularity has shape {pop.shape}, expected ({n_items},)")
    return pop


def _head_items(pop: np.ndarray, head_fraction: float) -> np.ndarray:
    """``(n_items,)`` bool: the head as defined in the module doc."""
    if not 0.0 < head_fraction <= 1.0:
        raise ValueError(f"head_fraction must lie in (0, 1], got {head_fraction}")
    head = np.zeros(pop.size, dtype=bool)
    total = pop.sum()
    if total <= 0:
        return head
    order = np.lexsort((np.arange(pop.size), -pop))
    reached = np.cumsum(pop[order]) >= head_fraction * total
    head[order[: int(np.argmax(reached)) + 1]] = True
    return head


def _popularity_per_user(
    top_items: np.ndarray, valid: np.ndarray, pop: np.ndarray, head: np.ndarray, ks: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """Per user mean ``pop`` and head share of the valid top-K slots (0 with none valid)."""
    slot_pop = np.where(valid, pop[top_items], 0.0)
    slot_head = (valid & head[top_items]).astype(np.float64)
    cum_valid = np.cumsum(valid, axis=1)
    cum_pop = np.cumsum(slot_pop, axis=1)
    cum_head = np.cumsum(slot_head, axis=1)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        col = min(k, top_items.shape[1]) - 1
        n_valid = np.maximum(cum_valid[:, col], 1)
        out[f"arp@{k}"] = cum_pop[:, col] / n_valid
        out[f"head_share@{k}"] = cum_head[:, col] / n_valid
    return out


def _per_user_keys(ks: tuple[int, ...], prefix: str = "", popularity: bool = True) -> list[str]:
    names = USER_METRICS + (POPULARITY_METRICS if popularity else ())
    return [f"{prefix}{name}@{k}" for k in ks for name in names]


# --------------------------------------------------------------------------- sampled ranking


def sampled_ranking_metrics(
    score_items_fn: ScoreItemsFn,
    train: UserItems,
    test: UserItems,
    n_items: int,
    n_negatives: int = 100,
    ks: Sequence[int] = (10,),
    seed: int = 0,
    n_boot: int = 1000,
    level: float = 0.95,
    batch_pairs: int = 4096,
) -> RankingReport:
    """Rank each test item against ``n_negatives`` items its user never interacted with.

    ``score_items_fn(users (B,), items (B, C)) -> (B, C)`` scores, ``C = 1 +
    n_negatives``, column 0 the test item. Negatives are drawn uniformly, with
    replacement, from the items outside the user's train and test items. The
    test item's rank is the number of candidates scoring at least as high
    (ties count against it, so a constant scorer earns nothing); per pair
    recall@K = hit@K = [rank < K], precision@K = hit@K / K, mrr@K = 1 / (rank
    + 1) within K, ndcg@K = 1 / log2(rank + 2) within K. Pairs are averaged per
    user, then over users (so a heavy user counts once). Keys are prefixed
    ``sampled_``; ``intervals`` holds the bootstrap CIs at ``level`` (``n_boot
    = 0`` skips them).
    """
    ks = _check_ks(ks)
    _check_pairs(train, test, n_items)
    if n_negatives < 1:
        raise ValueError("n_negatives must be >= 1")
    if ks[-1] > n_negatives + 1:
        raise ValueError(f"K={ks[-1]} exceeds the {n_negatives + 1} candidates of each test item")
    seen = UserItems.from_pairs(
        np.concatenate([_owner(train), _owner(test)]),
        np.concatenate([train.indices, test.indices]),
        train.n_users,
    )
    pair_user = _owner(test)
    pair_item = test.indices
    negatives = _sample_negatives(pair_user, seen, n_items, n_negatives, seed)

    ranks = np.empty(pair_user.size, dtype=np.int64)
    for start in range(0, pair_user.size, batch_pairs):
        stop = min(start + batch_pairs, pair_user.size)
        users = pair_user[start:stop]
        candidates = np.concatenate([pair_item[start:stop, None], negatives[start:stop]], axis=1)
        scores = torch.as_tensor(score_items_fn(users, candidates))
        if scores.shape != candidates.shape:
            raise ValueError(
                f"score_items_fn returned shape {tuple(scores.shape)}, expected {candidates.shape}"
            )
        if torch.isnan(scores).any():
            raise ValueError("score_items_fn returned NaN scores")
        rank = (scores[:, 1:] >= scores[:, :1]).sum(dim=1)
        ranks[start:stop] = rank.cpu().numpy()

    users = np.flatnonzero(test.lengths() > 0).astype(np.int64)
    n_test = test.lengths()[users]
    per_pair: dict[str, np.ndarray] = {}
    for k in ks:
        hit = (ranks < k).astype(np.float64)
        per_pair[f"recall@{k}"] = hit
        per_pair[f"hit@{k}"] = hit
        per_pair[f"precision@{k}"] = hit / k
        per_pair[f"mrr@{k}"] = hit / (ranks + 1.0)
        per_pair[f"ndcg@{k}"] = hit / np.log2(ranks + 2.0)
    # Pairs are grouped by user in CSR order, so a user's mean is a segment sum.
    owner_row = np.repeat(np.arange(users.size), n_test)
    per_user = {
        SAMPLED_PREFIX + key: np.bincount(owner_row, weights=v, minlength=users.size) / n_test
        for key, v in per_pair.items()
    }
    per_user = {key: per_user[key] for key in _per_user_keys(ks, SAMPLED_PREFIX, popularity=False)}
    metrics = {key: _mean(v) for key, v in per_user.items()}
    report = RankingReport(metrics=metrics, n_users=int(users.size), per_user=per_user, users=users)
    if n_boot > 0:
        intervals = report.confidence_intervals(level=level, n_boot=n_boot, seed=seed)
        report = RankingReport(
            metrics=metrics,
            n_users=report.n_users,
            per_user=per_user,
            users=users,
            intervals=intervals,
        )
    return report


def _sample_negatives(
    pair_user: np.ndarray, seen: UserItems, n_items: int, n_negatives: int, seed: int
) -> np.ndarray:
    """``(P, n_negatives)`` items outside each pair's user's ``seen`` items, uniform.

    Rejection sampling, vectorised over pairs; the few rows still rejecting after
    some rounds (users who saw most of the catalogue) draw from their complement.
    """
    if np.any(seen.lengths()[pair_user] >= n_items):
        raise ValueError("a user interacted with every item: no negatives to sample")
    rng = np.random.default_rng(seed)
    seen_keys = _owner(seen) * n_items + seen.indices  # sorted: CSR order, items sorted
    out = rng.integers(0, n_items, size=(pair_user.size, n_negatives))
    rows, cols = np.nonzero(_contains(seen_keys, pair_user[:, None] * n_items + out))
    # Each round redraws and rechecks only the cells rejected so far.
    for _ in range(16):
        if rows.size == 0:
            return out
        out[rows, cols] = rng.integers(0, n_items, size=rows.size)
        still = _contains(seen_keys, pair_user[rows] * n_items + out[rows, cols])
        rows, cols = rows[still], cols[still]
    bad = np.zeros(out.shape, dtype=bool)
    bad[rows, cols] = True
    for row in np.unique(rows):
        allowed = np.setdiff1d(np.arange(n_items), seen.items_of(pair_user[row]))
        out[row, bad[row]] = rng.choice(allowed, size=int(bad[row].sum()))
    return out


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return sorted_keys[pos] == keys


# --------------------------------------------------------------------------- checks


def _owner(ui: UserItems) -> np.ndarray:
    """``(nnz,)`` the user of each stored pair."""
    return np.repeat(np.arange(ui.n_users, dtype=np.int64), ui.lengths())


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    out = tuple(sorted({int(k) for k in ks}))
    if not out or out[0] < 1:
        raise ValueError(f"ks must list positive cut-offs, got {tuple(ks)}")
    return out


def _check_pairs(train: UserItems, test: UserItems, n_items: int) -> None:
    if train.n_users != test.n_users:
        raise ValueError(f"train has {train.n_users} users, test {test.n_users}")
    for name, ui in (("train", train), ("test", test)):
        if ui.indices.size and ui.indices.max() >= n_items:
            raise ValueError(f"{name} holds item {ui.indices.max()} >= n_items={n_items}")


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")
