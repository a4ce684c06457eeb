"""What one serving replica holds: the current models, the online store, and how they are swapped.

:class:`ServingState` is a plain class (DESIGN example 10): the Ray Serve
deployment (:mod:`serving.app`) keeps one per replica and calls it from its
routes; tests call it directly. It owns one online store connection for the
replica's life and a :class:`~serving.recommender.Recommender` per model
generation.

Swapping (:meth:`ServingState.load`): the new generation is loaded and checked
completely (:meth:`ModelBundle.load` refuses an empty index, an index of
another width than the user tower, a reranker that does not fit its spec;
the recommender featurises and scores one candidate at construction) while
the current one keeps answering; only then is one attribute assigned, so a
request sees either the old or the new recommender, never a half-loaded one.
A generation that fails to load is recorded as rejected and the previous one
keeps serving; with none loaded yet the replica is not ready (``/readyz``
503, recommendations 503).
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from features.event_log import EventLog, event_log_root, prediction_log_root
from features.online_store import OnlineStore, make_online_store
from features.schemas import PREDICTIONS
from infra.config import RayrecConfig
from infra.logs import get_logger
from serving.bundle import ModelBundle, ModelSources
from serving.events import EventIngest
from serving.prediction_log import PredictionRecorder
from serving.recommender import Clock, Recommender, utc_now
from serving.schemas import RecommendationRequest, RecommendationResponse

log = get_logger(__name__)


class NotReady(RuntimeError):
    """No model generation is loaded yet (the API's 503)."""


class ServedModels(BaseModel):
    """What the replicas should serve: Serve's ``user_config`` of the deployment.

    ``sources``: :class:`ModelSources` as plain strings (None: nothing published
    yet; the replica waits, not ready); ``generation``: a counter the deployer
    raises on every push, so two pushes of the same folders still reload.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: dict[str, Any] | None = None
    generation: int = 0

    @classmethod
    def of(cls, sources: ModelSources | None, generation: int) -> ServedModels:
        if sources is None:
            return cls(sources=None, generation=generation)
        plain = {
            name: str(getattr(sources, name))
            for name in ("two_tower", "index", "reranker", "reranker_spec", "users", "items")
        }
        return cls(sources={**plain, "versions": dict(sources.versions)}, generation=generation)

    def model_sources(self) -> ModelSources | None:
        if self.sources is None:
            return None
        paths = {k: Path(v) for k, v in self.sources.items() if k != "versions"}
        return ModelSources(**paths, versions=dict(self.sources.get("versions", {})))


@dataclass(frozen=True)
class Rejection:
    """A generation that failed to load, and why."""

    generation: int
    error: str
    at: dt.datetime


class ServingState:
    """The replica's online store, current :class:`Recommender` and load history."""

    def __init__(self, config: RayrecConfig, clock: Clock = utc_now) -> None:
        # One request scores ~N rows: thread fan-out costs more than it saves (config comment).
        torch.set_num_threads(config.serving.torch_threads)
        self.config = config
        self.clock = clock
        self.store: OnlineStore = make_online_store(config.features, config.paths.workdir)
        self.events = EventIngest(self.store, EventLog(event_log_root(config)), clock)
        self.predictions: PredictionRecorder | None = None
        if config.serving.record_predictions:
            self.predictions = PredictionRecorder(
                EventLog(prediction_log_root(config), PREDICTIONS),
                config.serving.prediction_log_flush_rows,
                config.serving.prediction_log_flush_s,
            )
        self._recommender: Recommender | None = None
        self._models: ServedModels | None = None
        self.generation: int | None = None
        self.loaded_at: dt.datetime | None = None
        self.rejected: Rejection | None = None
        self.waiting_reason: str | None = "no models pushed yet"
        # One load at a time (Serve may call reconfigure again while one runs).
        self._loading = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._recommender is not None

    @property
    def recommender(self) -> Recommender:
        """The current generation's recommender, or :class:`NotReady`."""
        current = self._recommender
        if current is None:
            raise NotReady(self.waiting_reason or "models are loading")
        return current

    def load(self, models: ServedModels) -> bool:
        """Load ``models`` and swap them in; False (and :attr:`rejected` set) when they are refused.

        Never raises on a bad model: the previous generation keeps serving.
        """
        sources = models.model_sources()
        with self._loading:
            if sources is None:
                self.waiting_reason = "nothing published to serve yet: run the pipeline"
                return False
            if models.generation == self.generation and self.ready:
                return True
            try:
                recommender = Recommender(
                    ModelBundle.load(sources),
                    self.store,
                    self.config.serving,
                    self.config.features,
                    self.clock,
                )
            except Exception as exc:  # a broken model must never take the replica down
                self.rejected = Rejection(models.generation, f"{type(exc).__name__}: {exc}", _now())
                log.warning(
                    "serving.load_rejected",
                    generation=models.generation,
                    error=self.rejected.error,
                    serving_generation=self.generation,
                )
                if not self.ready:
                    self.waiting_reason = f"generation {models.generation} rejected"
                return False
            self._recommender = recommender
            self._models = models
            self.generation = models.generation
            self.loaded_at = _now()
            self.waiting_reason = None
            log.info("serving.loaded", generation=models.generation, versions=sources.versions)
            return True

    def describe(self) -> dict[str, Any]:
        """``GET /v1/models``: what answers now, and the last refused generation."""
        current = self._recommender
        rejected = self.rejected
        return {
            "ready": current is not None,
            "generation": self.generation,
            "model_versions": current.bundle.versions if current else {},
            "catalogue_items": len(current.catalogue) if current else 0,
            "loaded_at": self.loaded_at.isoformat() if self.loaded_at else None,
            # What a rollback pushes again (the folders this generation was loaded from).
            "sources": self._models.sources if self._models else None,
            "waiting_reason": self.waiting_reason,
            "rejected": None
            if rejected is None
            else {
                "generation": rejected.generation,
                "error": rejected.error,
                "at": rejected.at.isoformat(),
            },
        }

    def recommend(
        self, request: RecommendationRequest, arrived: float | None = None
    ) -> RecommendationResponse:
        """The current generation's answer (:class:`NotReady` before one), recorded in the
        prediction log; ``arrived`` as :meth:`Recommender.recommend` takes it."""
        recommender = self.recommender
        generation = self.generation
        response = recommender.recommend(request, arrived)
        if self.predictions is not None:
            self.predictions.record(response, generation, self.clock())
        return response

    def close(self) -> None:
        if self.predictions is not None:
            self.predictions.close()
        self.store.close()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
