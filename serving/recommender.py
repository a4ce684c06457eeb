"""The request path, in process: online features → user tower → index top-N → filter → rerank → top-k.

:class:`Recommender` is a plain class (DESIGN example 10): the Ray Serve
deployment wraps it, tests and the in-process benchmark call it directly.
One request (:meth:`Recommender.recommend`):

1. **Features.** The user's stored vector and recent positives (one online
   store lookup). A user the store has never seen, or whose id the two-tower
   was not trained on, gets the popularity answer (``fallback: true``; see
   :mod:`serving.popularity`), with the same exclusions and filters.
2. **Retrieval.** The user tower reads the user id and the recent positives
   (as the reranker's ``retrieval_score`` feature and the two-stage
   evaluation do); the index returns the top ``N = serving.candidates``
   minus the user's recent positives (``serving.exclude_seen``) and the
   request's ``exclude_item_ids``; never more than the catalogue holds, so
   no padding id (-1) ever reaches a response.
3. **Filters.** Category rules drop candidates after retrieval, as the issue
   orders it; when they leave fewer than ``k`` (a narrow category), the index
   is searched again with every disallowed item excluded, so the answer still
   has ``min(k, eligible items)`` items.
4. **Rerank.** The candidates are featurised from the online store as the
   training frame would at the request time (:func:`features.online_frame.online_frame`,
   position 0, the index score as ``retrieval_score``), encoded by the
   reranker's own feature spec (:mod:`serving.encoding`) and scored; the
   score is the calibrated click probability. A request already past
   ``serving.deadline_ms`` when it reaches the rerank is answered in
   retrieval order instead (``reranked: false``).
5. **Answer.** The best ``k`` (ties keep retrieval order), with the model
   versions, a fresh ``request_id`` and the stage timings.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import torch

from features.online_frame import online_frame
from features.online_store import FeatureRead, OnlineStore, make_online_store
from infra.config import FeaturesConfig, ServingConfig
from infra.logs import get_logger
from models.calibration import click_probabilities
from models.two_tower import history_rows
from serving.bundle import ModelBundle, ModelSources
from serving.candidate_features import CandidateEncoder, UnsupportedFeature
from serving.catalogue import Catalogue
from serving.diversity import mmr_order
from serving.encoding import RETRIEVAL_SCORE, SCORING_POSITION, encode_examples
from serving.exploration import Explorer
from serving.popularity import PopularityRanking
from serving.schemas import (
    RecommendationRequest,
    RecommendationResponse,
    ScoredItem,
    SimilarItemsResponse,
)
from serving.scoring import predict

log = get_logger(__name__)

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class RequestError(ValueError):
    """The request is well formed but out of the configured bounds (the API's 422)."""


class UnknownItem(LookupError):
    """The item is not in the served catalogue (the API's 404)."""


class Recommender:
    """Answers :class:`RecommendationRequest` s with a loaded :class:`ModelBundle` and an online store.

    ``clock`` gives the request time (UTC; the wall clock by default): the
    context features and the age of the stored vectors are taken at it.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        store: OnlineStore,
        serving: ServingConfig,
        features: FeaturesConfig,
        clock: Clock = utc_now,
    ) -> None:
        self.bundle = bundle
        self.store = store
        self.serving = serving
        self.features = features
        self.clock = clock
        windows = tuple(features.windows_days)
        window = serving.popularity_window_days or max(windows)
        if window not in windows:
            raise ValueError(
                f"serving.popularity_window_days ({window}) must be one of "
                f"features.windows_days {list(windows)}"
            )
        self.catalogue = Catalogue(bundle.index.ids, bundle.items)
        self.popularity = PopularityRanking.from_store(store, self.catalogue.ids, window)
        self._n_users = bundle.two_tower.config.n_users
        self._n_items = bundle.two_tower.config.n_items
        self.explorer = Explorer(serving.exploration)
        # The numpy featurisation (~20x faster than the Polars reference, equal rows; see
        # serving.candidate_features); a spec it cannot place keeps the reference path.
        self.encoder: CandidateEncoder | None
        try:
            self.encoder = CandidateEncoder.build(bundle, features.windows_days, SCORING_POSITION)
        except UnsupportedFeature as exc:
            log.warning("serving.reference_features", reason=str(exc))
            self.encoder = None
        self._check_features()

    @classmethod
    def load(
        cls,
        sources: ModelSources,
        serving: ServingConfig,
        features: FeaturesConfig,
        workdir: str | Path,
        clock: Clock = utc_now,
    ) -> Recommender:
        """Load ``sources`` and open the online store ``features.online_store`` names.

        Sets this process's torch threads to ``serving.torch_threads`` (a serving
        process answers small batches; see the config's comment).
        """
        torch.set_num_threads(serving.torch_threads)
        bundle = ModelBundle.load(sources)
        return cls(bundle, make_online_store(features, workdir), serving, features, clock)

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ the request

    def recommend(
        self, request: RecommendationRequest, arrived: float | None = None
    ) -> RecommendationResponse:
        """The top ``request.k`` items for ``request.user_id`` (module doc for the stages).

        ``arrived``: the ``time.perf_counter()`` at which the request reached the
        process (the API stamps it before the request waits for a worker thread),
        so ``serving.deadline_ms`` and ``timings_ms["total"]`` count that wait;
        default now. Raises :class:`RequestError` when ``k`` exceeds ``serving.max_k``.
        """
        started = time.perf_counter() if arrived is None else arrived
        if request.k > self.serving.max_k:
            raise RequestError(
                f"k must be <= {self.serving.max_k} (serving.max_k), got {request.k}"
            )
        ts = self.clock()
        timings: dict[str, float] = {}
        user = self.store.read_user(request.user_id)
        seen = np.asarray(user.history if self.serving.exclude_seen else [], dtype=np.int64)
        banned = np.union1d(np.asarray(request.exclude_item_ids, dtype=np.int64), seen)
        banned = np.union1d(banned, self.catalogue.unavailable)
        allowed = self.catalogue.allowed(request.filters)
        eligible = self.catalogue.eligible(banned, allowed)
        timings["features"] = _ms(started)
        personal = user.found and 0 <= request.user_id < self._n_users
        if not personal:
            ids, counts = self.popularity.top(request.k, eligible)
            items = tuple(
                ScoredItem(item_id=int(i), score=float(c)) for i, c in zip(ids, counts, strict=True)
            )
            return self._response(request, items, True, False, user.degraded, timings, started)

        mark = time.perf_counter()
        ids, scores = self._retrieve(request, user, banned, allowed, int(eligible.sum()))
        timings["retrieval"] = _ms(mark)
        if (time.perf_counter() - started) * 1e3 > self.serving.deadline_ms or ids.size == 0:
            top = slice(0, request.k)
            items = tuple(
                ScoredItem(item_id=int(i), score=float(s), retrieval_score=float(s))
                for i, s in zip(ids[top], scores[top], strict=True)
            )
            return self._response(
                request, items, False, False, user.degraded, timings, started, ids.size
            )

        mark = time.perf_counter()
        probabilities, degraded = self._rerank(request.user_id, user, ids, scores, ts)
        timings["rerank"] = _ms(mark)
        slate = self.explorer.choose(
            _logits(probabilities), self._ranked(ids, probabilities, request.k), request.k
        )
        items = tuple(
            ScoredItem(
                item_id=int(ids[j]),
                score=float(probabilities[j]),
                retrieval_score=float(scores[j]),
                propensity=float(p),
            )
            for j, p in zip(slate.order, slate.propensities, strict=True)
        )
        return self._response(
            request, items, False, True, user.degraded or degraded, timings, started, ids.size
        )

    def similar_items(self, item_id: int, k: int) -> SimilarItemsResponse:
        """The ``k`` catalogue items nearest to ``item_id`` by item vector (inner product).

        Raises :class:`UnknownItem` for an item the index does not hold and
        :class:`RequestError` when ``k`` exceeds ``serving.max_k``.
        """
        if k > self.serving.max_k:
            raise RequestError(f"k must be <= {self.serving.max_k} (serving.max_k), got {k}")
        index = self.bundle.index
        if index.positions_of(np.asarray([item_id]))[0] < 0:
            raise UnknownItem(f"item {item_id} is not in the served catalogue")
        banned = np.union1d(np.asarray([item_id], dtype=np.int64), self.catalogue.unavailable)
        n = min(k, len(index) - int(np.isin(banned, index.ids).sum()))
        items: tuple[ScoredItem, ...] = ()
        if n > 0:
            # The index's own vector: trained, or content-only for an item newer than the model.
            scores, ids = index.search(index.reconstruct(np.asarray([item_id])), n, [banned])
            keep = ids[0] >= 0
            items = tuple(
                ScoredItem(item_id=int(i), score=float(s), retrieval_score=float(s))
                for i, s in zip(ids[0][keep], scores[0][keep], strict=True)
            )
        return SimilarItemsResponse(
            item_id=item_id, items=items, model_versions=self.bundle.versions
        )

    # ------------------------------------------------------------------ stages

    def _ranked(self, ids: np.ndarray, probabilities: np.ndarray, k: int) -> np.ndarray:
        """(R,) candidate positions best first: by probability, or MMR's order when
        ``serving.diversity.mmr_lambda`` is set (deep enough for exploration's pool)."""
        lam = self.serving.diversity.mmr_lambda
        if lam is None:
            return np.argsort(-probabilities, kind="stable")
        depth = min(ids.size, max(k, self.serving.exploration.pool))
        # The vectors retrieval scored (content-only ones for items newer than the model).
        return mmr_order(probabilities, self.bundle.index.reconstruct(ids), depth, lam)

    @torch.no_grad()
    def user_vector(self, user_id: int, history: list[int]) -> np.ndarray:
        """(1, D) float32: the user tower on the id and the last ``history_length`` known positives."""
        rows = history_rows(history, self.features.history_length, self._n_items)
        vector = self.bundle.two_tower.user_tower(
            torch.tensor([user_id], dtype=torch.int64), torch.from_numpy(rows[None, :])
        )
        return vector.float().numpy()

    def _retrieve(
        self,
        request: RecommendationRequest,
        user: FeatureRead,
        banned: np.ndarray,
        allowed: np.ndarray | None,
        n_eligible: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, scores)`` (M,) of the eligible candidates, best first, M <= N."""
        n = min(self.serving.candidates, n_eligible)
        if n == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        query = self.user_vector(request.user_id, list(user.history))
        index = self.bundle.index
        scores, ids = index.search(query, n, [banned])
        ids, scores = ids[0], scores[0]
        keep = ids >= 0
        if allowed is not None:
            positions = self.catalogue.positions(ids)
            keep &= (positions >= 0) & allowed[np.maximum(positions, 0)]
            if keep.sum() < min(request.k, n_eligible):
                disallowed = self.catalogue.ids[~allowed]
                scores, ids = index.search(query, n, [np.union1d(banned, disallowed)])
                ids, scores = ids[0], scores[0]
                keep = ids >= 0
        return ids[keep], scores[keep]

    def _rerank(
        self, user_id: int, user: FeatureRead, ids: np.ndarray, scores: np.ndarray, ts: dt.datetime
    ) -> tuple[np.ndarray, bool]:
        """(M,) calibrated click probabilities of the candidates, and whether a read degraded."""
        reads = self.store.read_items(ids.tolist())
        bundle = self.bundle
        if self.encoder is not None:
            part = self.encoder.encode(user_id, user, ids, scores, reads, ts)
        else:
            frame = self.candidate_frame(user_id, user, ids, scores, ts, reads)
            part = encode_examples(frame, bundle.spec, bundle.columns, labelled=False)
        logits = predict(bundle.reranker.model, part)
        probabilities = click_probabilities(logits, bundle.reranker.calibrator)
        return np.asarray(probabilities, dtype=np.float64), bool(reads["degraded"].any())

    def candidate_frame(
        self,
        user_id: int,
        user: FeatureRead,
        ids: np.ndarray,
        scores: np.ndarray,
        ts: dt.datetime,
        reads: pl.DataFrame | None = None,
    ) -> pl.DataFrame:
        """(M) reranker input rows of the candidates ``ids`` with their index ``scores``, at ``ts``."""
        if reads is None:
            reads = self.store.read_items(ids.tolist())
        frame = online_frame(
            user_id,
            user,
            ids,
            reads,
            ts,
            self.bundle.users,
            self.bundle.items,
            self.features.windows_days,
            position=SCORING_POSITION,
        )
        return frame.with_columns(pl.Series(RETRIEVAL_SCORE, scores, dtype=pl.Float64))

    def _check_features(self) -> None:
        """Featurise and encode a few candidates for an unknown user by the reference path
        (a spec naming a column the online path does not make fails here, at load, not on
        a request) and check the fast path gives the same rows (else it is not used)."""
        user = self.store.read_user(-1)
        ids = self.catalogue.ids[:8]
        scores = np.linspace(-1.0, 1.0, ids.size, dtype=np.float32)
        ts = self.clock()
        reads = self.store.read_items(ids.tolist())
        frame = self.candidate_frame(-1, user, ids, scores, ts, reads)
        reference = encode_examples(frame, self.bundle.spec, self.bundle.columns, labelled=False)
        if self.encoder is None:
            return
        fast = self.encoder.encode(-1, user, ids, scores, reads, ts)
        same = (
            torch.equal(fast.categorical, reference.categorical)
            and torch.allclose(fast.numeric, reference.numeric, atol=1e-5)
            and all(
                torch.equal(a, b) for a, b in zip(fast.sequences, reference.sequences, strict=True)
            )
        )
        if not same:
            log.warning("serving.fast_features_differ: using the reference featurisation")
            self.encoder = None

    def _response(
        self,
        request: RecommendationRequest,
        items: tuple[ScoredItem, ...],
        fallback: bool,
        reranked: bool,
        degraded: bool,
        timings: dict[str, float],
        started: float,
        candidates: int = 0,
    ) -> RecommendationResponse:
        timings["total"] = _ms(started)
        return RecommendationResponse(
            # Digits of a random int63: the events table keys request_id as int64, so an
            # impression posted back with it joins this answer exactly.
            request_id=str(secrets.randbits(63)),
            user_id=request.user_id,
            items=items,
            fallback=fallback,
            reranked=reranked,
            degraded=degraded,
            model_versions=self.bundle.versions,
            timings_ms=timings,
            candidates=candidates,
        )


def _logits(probabilities: np.ndarray) -> np.ndarray:
    """(M,) log-odds of calibrated probabilities (softmax exploration samples on them)."""
    p = np.clip(probabilities, 1e-7, 1.0 - 1e-7)
    return np.log(p) - np.log1p(-p)


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1e3
