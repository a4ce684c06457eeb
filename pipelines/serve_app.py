"""The Serve application builder a cluster imports: ``pipelines.serve_app:build``.

A declarative Serve config (the RayService's ``serveConfigV2``, or ``serve
deploy``) names an import path and ``args``; Serve calls :func:`build` with
the args validated as :class:`ServeAppArgs` whenever it (re)builds the app: a
new cluster, a zero-downtime cluster upgrade, or changed ``args``. The build
resolves the models the config names (``serving.models_from``: the MLflow
``@champion`` by default) there and then, so a rebuilt app comes up serving the
current champion instead of whatever was pushed to a cluster that is gone.
Before the pipeline has registered anything it comes up waiting (``/readyz``
503), as ``rayrec serve start`` does.

This lives in ``pipelines`` (not ``serving``) because resolving the champion
is the pipeline's side of the hand-over (:mod:`pipelines.serving_sources`).

No ``from __future__ import annotations`` here: Serve reads the builder's
parameter annotation as a class to validate ``args`` against it.
"""

from pydantic import BaseModel, ConfigDict
from ray import serve

from infra.config import RayrecConfig, load_config
from infra.logs import get_logger
from pipelines.serving_sources import NotServable, serving_sources
from serving.app import build_app
from serving.service import ServedModels

log = get_logger(__name__)

IMPORT_PATH = "pipelines.serve_app:build"


class ServeAppArgs(BaseModel):
    """The ``args`` of the Serve config: the config to build from (the pod's
    ``RAYREC_…`` environment applies on top, as for any rayrec process)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = "default"
    overrides: tuple[str, ...] = ()
    # Bump to make Serve rebuild the app (and so load the current champion)
    # without any other change: Serve rebuilds only when import path, runtime
    # env or args change.
    revision: int = 0


def build(args: ServeAppArgs) -> serve.Application:
    """Serve's entry point: :func:`serving.app.build_app` over the resolved config and models."""
    config = load_config(args.preset, args.overrides)
    return build_app(config, initial_models(config))


def initial_models(config: RayrecConfig) -> ServedModels:
    """The models a freshly built app starts with: the configured sources, or none yet.

    Generation 1: a later ``rayrec serve``-style push reads the serving
    generation and raises it; a rebuild starts the count again, which only
    costs the replicas one reload of the same folders.
    """
    try:
        sources = serving_sources(config)
    except NotServable as exc:
        log.warning("serve_app.no_models_yet", reason=str(exc))
        return ServedModels.of(None, 0)
    return ServedModels.of(sources, 1)
