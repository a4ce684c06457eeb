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
