"""Run the tiny pipeline on a two-node Ray cluster on this machine; print where work ran.

Started by ``test_two_node.py`` in its own process (a process holds one Ray
connection, and the test session already has its local Ray). The head node has
1 CPU and the second node 2, and both trainers ask for 2 workers of 1 CPU
each, so every training run needs the second node. Prints one JSON line.

Usage: ``python two_node_run.py WORKDIR DASHBOARD_PORT``
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter


def main(workdir: str, dashboard_port: int) -> None:
    import ray
    from ray.cluster_utils import Cluster

    memory = 256 * 1024 * 1024
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": memory,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
        },
    )
    try:
        second = cluster.add_node(num_cpus=2, object_store_memory=memory)
        cluster.wait_for_nodes()
        # ensure_ray joins RAY_ADDRESS, as a Ray Job on a cluster does.
        os.environ["RAY_ADDRESS"] = cluster.address

        from ray.util.state import list_actors, list_tasks

        from infra.config import load_config
        from pipelines.main import MAIN
        from pipelines.runner import run_pipeline

        config = load_config(
            "tiny",
            [
                f"paths.workdir={workdir}",
                "models.retrieval.workers=2",
                "models.retrieval.cpus_per_worker=1",
                "models.ranker.workers=2",
                "models.ranker.cpus_per_worker=1",
            ],
            environ={},
        )
        record = run_pipeline(MAIN, config, track=False)
        nodes = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
        actors = list_actors(limit=10_000, raise_on_missing_output=False)
        tasks = list_tasks(limit=10_000, raise_on_missing_output=False)
        print(
            json.dumps(
                {
                    "status": record.status,
                    "steps": {s.name: s.status for s in record.steps},
                    "head": cluster.head_node.node_id,
                    "second": second.node_id,
                    "nodes": nodes,
                    "actors": Counter(f"{a.class_name}@{a.node_id}" for a in actors),
                    "tasks": Counter(t.node_id for t in tasks if t.node_id),
                }
            ),
            flush=True,
        )
    finally:
        # The driver first: the cluster refuses to remove the node it is connected to.
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
