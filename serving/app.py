"""The online API: a FastAPI app over :class:`~serving.service.ServingState`, deployed on Ray Serve.

Routes (OpenAPI at ``/docs`` and ``/openapi.json``):

- ``POST /v1/recommendations`` (:class:`RecommendationRequest`) and
  ``GET /v1/recommendations/{user_id}?k=``: the request path of
  :mod:`serving.recommender`.
- ``GET /v1/similar-items/{item_id}?k=``: nearest items by item vector.
- ``POST /v1/events``: a batch of events into the online store and the event
  log (:mod:`serving.events`).
- ``GET /healthz`` (the process answers), ``GET /readyz`` (503 until a model
  generation is loaded), ``GET /v1/models`` (versions, generation, the last
  refused push).

Errors are JSON ``{"detail": ...}``: malformed input or ``k`` out of range ->
422, unknown item -> 404, body over ``serving.app.max_body_bytes`` -> 413
(checked before parsing; Serve and FastAPI would take 20 MB), not ready or
online store unwritable -> 503. Overload gives Serve's fast 503 once
``max_queued_requests`` wait (deployment options below), and the proxy drops
a request after ``request_timeout_s``: neither has a bound by default.

One deployment holds the whole hot path (features, user tower, index,
rerank): each deployment-to-deployment hop costs ~4 ms here, more than the
rerank. Model swaps go through Serve's ``user_config`` (:class:`ServedModels`):
``serve.run`` with a new one calls :meth:`RecommenderIngress.reconfigure` on
every replica in place, which loads the new generation beside the serving
one (:meth:`ServingState.load`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import HTTPOptions

from features.online_store import OnlineStoreError
from infra.config import RayrecConfig
from infra.errors import DataValidationError
from serving.events import EventBatch, EventsAccepted
from serving.recommender import RequestError, UnknownItem
from serving.schemas import (
    INT64_MAX,
    RecommendationRequest,
    RecommendationResponse,
    SimilarItemsResponse,
)
from serving.service import NotReady, ServedModels, ServingState

DEPLOYMENT = "Recommender"
# Request-state key of the perf_counter() at which the request reached the replica.
ARRIVED = "rayrec_arrived"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before any parsing.

    A declared ``content-length`` over the limit is refused at once; a chunked
    body is counted as it arrives and refused when it passes the limit.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Stamped before the request waits for a worker thread: the deadline counts the wait.
        scope.setdefault("state", {})[ARRIVED] = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        refused = False

        async def counted() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Answer 413 now; the app sees the client gone and its reply is dropped.
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not refused:
                raise

    async def _refuse(self, send: Send) -> None:
        detail = f"request body larger than {self.max_bytes} bytes (serving.app.max_body_bytes)"
        response = JSONResponse({"detail": detail}, status_code=413)
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


class Metrics:
    """Counters and histograms the API records (no-ops here; Ray's in a replica)."""

    def request(self, route: str, status: int, fallback: bool | None = None) -> None:
        pass

    def stages(self, timings: dict[str, float], candidates: int) -> None:
        pass


class RayMetrics(Metrics):
    """Our own series beside Ray's, exported by Ray's Prometheus endpoint as ``ray_rayrec_*``."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self._requests = metrics.Counter(
            "rayrec_requests", "API requests by route and status", tag_keys=("route", "status")
        )
        self._fallbacks = metrics.Counter(
            "rayrec_fallbacks", "recommendations answered by popularity (unknown user)"
        )
        self._stage = metrics.Histogram(
            "rayrec_stage_ms",
            "request path stage latency (ms)",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 250],
            tag_keys=("stage",),
        )
        self._candidates = metrics.Histogram(
            "rayrec_candidates",
            "candidates reranked per request",
            boundaries=[10, 50, 100, 200, 500, 1000],
        )

    def request(self, route: str, status: int, fallback: bool | None = None) -> None:
        self._requests.inc(tags={"route": route, "status": str(status)})
        if fallback:
            self._fallbacks.inc()

    def stages(self, timings: dict[str, float], candidates: int) -> None:
        for stage, ms in timings.items():
            self._stage.observe(ms, tags={"stage": stage})
        self._candidates.observe(candidates)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def build_api(state: ServingState, metrics: Metrics | None = None) -> FastAPI:
    """The FastAPI app over ``state`` (limits from ``state.config.serving``)."""
    serving = state.config.serving
    metrics = metrics or Metrics()
    api = FastAPI(
        title="rayrec recommendations",
        version="1",
        description="Two-tower retrieval, MoE rerank, events in. See README, Serving.",
    )
    api.add_middleware(BodyLimit, max_bytes=serving.app.max_body_bytes)
    # Defaults, not Annotated aliases: the bound is config, and annotations are strings here.
    max_k = serving.max_k

    def recommend(
        request: RecommendationRequest, http: Request
    ) -> RecommendationResponse | JSONResponse:
        try:
            response = state.recommend(request, getattr(http.state, ARRIVED, None))
        except NotReady as exc:
            metrics.request("recommendations", 503)
            return _error(503, f"not ready: {exc}")
        except RequestError as exc:
            metrics.request("recommendations", 422)
            return _error(422, str(exc))
        metrics.request("recommendations", 200, response.fallback)
        metrics.stages(response.timings_ms, response.candidates)
        return response

    @api.post("/v1/recommendations", response_model=RecommendationResponse)
    def post_recommendations(request: RecommendationRequest, http: Request) -> Any:
        return recommend(request, http)

    @api.get("/v1/recommendations/{user_id}", response_model=RecommendationResponse)
    def get_recommendations(
        http: Request, user_id: int = Path(ge=0, le=INT64_MAX), k: int = Query(10, ge=1, le=max_k)
    ) -> Any:
        return recommend(RecommendationRequest(user_id=user_id, k=k), http)

    @api.get("/v1/similar-items/{item_id}", response_model=SimilarItemsResponse)
    def similar_items(
        item_id: int = Path(ge=0, le=INT64_MAX), k: int = Query(10, ge=1, le=max_k)
    ) -> Any:
        try:
            return state.recommender.similar_items(item_id, k)
        except NotReady as exc:
            return _error(503, f"not ready: {exc}")
        except UnknownItem as exc:
            return _error(404, str(exc))
        except RequestError as exc:
            return _error(422, str(exc))

    @api.post("/v1/events", response_model=EventsAccepted)
    def post_events(batch: EventBatch) -> Any:
        try:
            accepted = state.events.ingest(batch, serving.app.max_events_per_batch)
        except (RequestError, DataValidationError) as exc:
            metrics.request("events", 422)
            return _error(422, str(exc))
        except OnlineStoreError as exc:
            # Nothing was applied or logged: the client retries the whole batch.
            metrics.request("events", 503)
            return _error(503, f"events not recorded, retry: {exc}")
        metrics.request("events", 200)
        return accepted

    @api.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @api.get("/readyz")
    def readyz() -> Any:
        if not state.ready:
            return _error(503, f"not ready: {state.waiting_reason}")
        return {"status": "ready", "generation": state.generation}

    @api.get("/v1/models")
    def models() -> dict[str, Any]:
        return state.describe()

    return api


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class RecommenderIngress:
    """One replica: a :class:`ServingState` and its FastAPI app; models come by ``user_config``."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.state = ServingState(RayrecConfig.model_validate(config))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.state, RayMetrics())

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        # Loaded off the event loop: requests keep being answered by the serving
        # generation meanwhile.
        await asyncio.to_thread(self.state.load, ServedModels.model_validate(user_config))


def build_app(config: RayrecConfig, models: ServedModels) -> serve.Application:
    """The typed application builder: the deployment with ``serving.app``'s options, bound to ``config``."""
    app = config.serving.app
    bound = config.model_dump(mode="json")
    return RecommenderIngress.options(
        # A version that changes only with the config the replicas are built from:
        # without one, every serve.run is a new random version and Serve replaces
        # the replicas (a rolling restart), where a new user_config alone should
        # only call reconfigure in place. Serve accepts it from internal callers
        # only, hence the flag.
        version=_version(bound),
        _internal=True,
        num_replicas=app.num_replicas,
        max_ongoing_requests=app.max_ongoing_requests,
        max_queued_requests=app.max_queued_requests,
        ray_actor_options={"num_cpus": app.num_cpus},
        user_config=models.model_dump(mode="json"),
        # A killed replica is noticed and replaced within a few seconds.
        health_check_period_s=2.0,
        health_check_timeout_s=10.0,
        graceful_shutdown_timeout_s=5.0,
    ).bind(bound)


def _version(bound: dict[str, Any]) -> str:
    blob = json.dumps(bound, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def http_options(config: RayrecConfig) -> HTTPOptions:
    """The proxy's address and request timeout (Serve's defaults: port 8000, no timeout)."""
    app = config.serving.app
    return HTTPOptions(
        host=app.host,
        port=app.port,
        request_timeout_s=app.request_timeout_s,
    )


HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"


def ingress_environment(config: RayrecConfig) -> None:
    """Set the environment Serve reads for ``serving.app.proxy``; call before a local Ray starts
    (Ray's processes inherit it; a running cluster keeps its own)."""
    os.environ[HAPROXY_FLAG] = "1" if config.serving.app.proxy == "haproxy" else "0"


def run_app(config: RayrecConfig, models: ServedModels, timeout_s: float = 120.0) -> None:
    """Deploy (or update in place) the app on the connected Ray; returns once it is running.

    Serve is started with :func:`http_options` if it is not yet running (its
    HTTP options are fixed at start). ``models`` with a new generation makes
    every replica reload (:meth:`RecommenderIngress.reconfigure`).
    """
    serve.start(http_options=http_options(config))
    app = config.serving.app
    serve.run(
        build_app(config, models),
        name=app.name,
        route_prefix=app.route_prefix,
        blocking=False,
    )
    _wait_running(app.name, timeout_s)


def _wait_running(name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(name)
        if status is not None and str(status.status).endswith("RUNNING"):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"serve application {name!r} not running after {timeout_s} s")
        time.sleep(0.2)
