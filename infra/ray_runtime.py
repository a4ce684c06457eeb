"""Ray start-up: a local Ray by default, a cluster when ``RAY_ADDRESS`` is set."""

from __future__ import annotations

import os

import ray

from infra.config import RayConfig
from infra.logs import get_logger

log = get_logger(__name__)


def ensure_ray(config: RayConfig) -> None:
    """Start or join Ray once per process; later calls are no-ops.

    ``RAY_ADDRESS`` (environment) wins over ``ray.address`` (config) so the same
    command runs on a laptop and, submitted as a Ray Job, on a cluster.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or config.address
    if address:
        log.info("ray.join", address=address)
        ray.init(address=address, log_to_driver=False)
        return
    memory = config.object_store_memory_mb
    ray.init(
        # "local": a Ray of our own. Without an address ray.init joins the newest
        # cluster `ray start` left on this machine (/tmp/ray/ray_current_cluster),
        # which on a shared machine may be someone else's.
        address="local",
        num_cpus=config.num_cpus,
        object_store_memory=memory * 1024 * 1024 if memory else None,
        include_dashboard=config.include_dashboard,
        log_to_driver=False,
        configure_logging=False,
    )
    log.info("ray.local", cpus=ray.cluster_resources().get("CPU"))


def cpus_per_worker(configured: float | None, workers: int) -> float:
    """``configured`` CPUs per training worker, or the cluster's CPUs split evenly (at least 1)."""
    if configured is not None:
        return configured
    total = ray.cluster_resources().get("CPU", 1.0)
    return max(1.0, float(int(total // workers)))
