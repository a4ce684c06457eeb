"""Running the online API: start, push a model generation (hot swap), status, stop.

The functions behind ``rayrec serve start|status|reload|stop`` and the end of
``rayrec run`` (``serving.app.deploy_after_run``); tests call them in process.

- :func:`push` resolves the sources (``serving.models_from``), loads and checks
  them *here* first (:meth:`ModelBundle.load` and one scored candidate), so a
  corrupt, empty or wrong-width model never reaches a replica; then deploys
  them as the next generation through Serve's ``user_config`` and confirms
  from ``/v1/models`` that the new generation answers. A replica that still
  refuses it keeps serving the old one, and the previous ``user_config`` is
  put back so a replica restarted later loads the good generation.
- :func:`serve_forever` is ``rayrec serve start``: a local Ray (or
  ``RAY_ADDRESS``'s), the app deployed, a state file at
  ``<workdir>/serving/server.json`` (pid, url); SIGHUP pushes the current
  champion, SIGTERM/SIGINT shut Serve down; with
  ``serving.app.poll_champion_s`` it also pushes whenever the champion's
  versions change. ``rayrec serve reload``/``stop`` signal that process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from infra.config import RayrecConfig
from infra.logs import get_logger
from infra.storage import StoragePath
from pipelines.serving_sources import NotServable, serving_sources
from serving.bundle import ModelSources
from serving.service import ServedModels, ServingState

log = get_logger(__name__)
# One INFO line per status poll would bury the server's own log.
logging.getLogger("httpx").setLevel(logging.WARNING)


class PushRejected(RuntimeError):
    """The models were refused (before deployment, or by the replicas); the old ones serve."""


@dataclass(frozen=True)
class PushResult:
    generation: int
    versions: dict[str, str]
    seconds: float


def base_url(config: RayrecConfig) -> str:
    app = config.serving.app
    return f"http://{app.host}:{app.port}{app.route_prefix.rstrip('/')}"


def served(config: RayrecConfig, timeout_s: float = 5.0) -> dict[str, Any] | None:
    """``GET /v1/models`` of the running app, or None when nothing answers."""
    try:
        response = httpx.get(f"{base_url(config)}/v1/models", timeout=timeout_s)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def check_sources(config: RayrecConfig, sources: ModelSources) -> None:
    """Load ``sources`` as a replica would (bundle checks, one scored candidate) or raise :class:`PushRejected`."""
    state = ServingState(config)
    try:
        if not state.load(ServedModels.of(sources, 1)):
            assert state.rejected is not None
            raise PushRejected(f"models refused before deployment: {state.rejected.error}")
    finally:
        state.close()


def push(
    config: RayrecConfig, sources: ModelSources | None = None, timeout_s: float = 120.0
) -> PushResult:
    """Deploy ``sources`` (default: :func:`serving_sources`) as the next generation; see the module doc.

    Starts the app if it is not running. Raises :class:`PushRejected` (nothing
    changed for the serving generation) or :class:`NotServable`.
    """
    from serving.app import run_app

    started = time.perf_counter()
    sources = sources or serving_sources(config)
    check_sources(config, sources)
    current = served(config)
    previous = int(current["generation"] or 0) if current else 0
    generation = previous + 1
    run_app(config, ServedModels.of(sources, generation), timeout_s)
    answer = served(config)
    if answer is None or answer.get("generation") != generation:
        rejected = (answer or {}).get("rejected")
        if current is not None and current.get("ready"):
            # Put the last good goal state back: a replica started later must load it.
            run_app(
                config, ServedModels(sources=current["sources"], generation=previous), timeout_s
            )
            log.warning("serve.push_rolled_back", generation=generation, rejected=rejected)
        raise PushRejected(f"replicas did not take generation {generation}: {rejected}")
    seconds = time.perf_counter() - started
    log.info("serve.pushed", generation=generation, versions=sources.versions, seconds=seconds)
    return PushResult(generation, dict(sources.versions), seconds)


# --------------------------------------------------------------------------- the server process


def state_file(config: RayrecConfig) -> Path:
    return StoragePath.from_uri(config.paths.workdir).local_path() / "serving" / "server.json"


def serve_forever(config: RayrecConfig, stop: threading.Event | None = None) -> None:
    """``rayrec serve start``: deploy, then wait for signals (module doc) until stopped."""
    from ray import serve

    from infra.ray_runtime import ensure_ray
    from serving.app import ingress_environment, run_app

    ingress_environment(config)
    ensure_ray(config.ray)
    stop = stop or threading.Event()
    reload_now = threading.Event()
    # Signals first, then the state file, then the deployment: a `serve reload`
    # or `stop` that finds the file must find the handlers too.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda *_: reload_now.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    path = state_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": os.getpid(), "url": base_url(config)}))
    try:
        try:
            push(config)
        except (NotServable, PushRejected) as exc:
            # Up but not ready (/readyz 503) until a reload finds servable models.
            log.warning("serve.started_without_models", reason=str(exc))
            run_app(config, ServedModels.of(None, 0))
        poll = config.serving.app.poll_champion_s
        last_poll = time.monotonic()
        log.info("serve.running", url=base_url(config), pid=os.getpid())
        while not stop.wait(0.5):
            due = poll is not None and time.monotonic() - last_poll >= poll
            if not (reload_now.is_set() or due):
                continue
            forced = reload_now.is_set()
            reload_now.clear()
            last_poll = time.monotonic()
            _reload(config, forced)
    finally:
        serve.shutdown()
        path.unlink(missing_ok=True)
        log.info("serve.stopped")


def _reload(config: RayrecConfig, forced: bool) -> None:
    """Push the current sources: always when ``forced`` (SIGHUP), else only when versions changed."""
    try:
        sources = serving_sources(config)
        current = served(config) or {}
        if not forced and current.get("model_versions") == dict(sources.versions):
            return
        push(config, sources)
    except (NotServable, PushRejected) as exc:
        log.warning("serve.reload_refused", reason=str(exc))


def server_pid(config: RayrecConfig) -> int | None:
    """The pid of this workdir's running ``rayrec serve start``, or None."""
    path = state_file(config)
    if not path.exists():
        return None
    pid = int(json.loads(path.read_text())["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def signal_server(config: RayrecConfig, sig: signal.Signals) -> int:
    """Send ``sig`` to the running server (raises :class:`RuntimeError` when none runs)."""
    pid = server_pid(config)
    if pid is None:
        raise RuntimeError(f"no rayrec server running for {config.paths.workdir}")
    os.kill(pid, sig)
    return pid
