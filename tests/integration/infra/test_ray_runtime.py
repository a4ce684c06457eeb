"""Ray start-up: the session's local Ray, reused by later calls."""

from __future__ import annotations

import ray

from infra.config import RayConfig
from infra.ray_runtime import ensure_ray


def test_local_ray_runs_tasks_and_a_second_start_is_a_no_op(ray_session: None) -> None:
    @ray.remote
    def square(x: int) -> int:
        return x * x

    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
    node_before = ray.get_runtime_context().get_node_id()
    ensure_ray(RayConfig(num_cpus=1))
    assert ray.get_runtime_context().get_node_id() == node_before
    assert ray.cluster_resources()["CPU"] == 2


def test_ray_address_joins_the_running_cluster_instead_of_starting_one(ray_session: None) -> None:
    """A second process with RAY_ADDRESS set attaches to this session's Ray."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    address = ray.get_runtime_context().gcs_address
    script = (
        "import ray\n"
        "from infra.config import RayConfig\n"
        "from infra.ray_runtime import ensure_ray\n"
        "ensure_ray(RayConfig(num_cpus=1))\n"
        "print(ray.get_runtime_context().gcs_address, int(ray.cluster_resources()['CPU']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "RAY_ADDRESS": address},
        cwd=Path(__file__).resolve().parents[3],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # Same cluster (its address, its 2 CPUs), not a fresh 1-CPU local Ray.
    assert result.stdout.splitlines()[-1].split() == [address, "2"]
