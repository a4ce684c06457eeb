"""The tiny pipeline on a two-node Ray cluster (head + worker, both on 127.0.0.1).

``ray.cluster_utils.Cluster`` starts a head and a second node as separate
raylets on this machine; the pipeline joins it through ``RAY_ADDRESS`` as a
Ray Job would. Run in a child process (``two_node_run.py``) that shuts the
cluster down itself; the test kills that process group if it overruns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("two_node_run.py")
ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_tiny_pipeline_runs_across_two_nodes(tmp_path: Path, free_port: Callable[[], int]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(tmp_path / "wd"), str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"two-node run overran:\n{err[-3000:]}")
    assert process.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["status"] == "succeeded", report["steps"]
    assert set(report["nodes"]) == {report["head"], report["second"]}
    assert report["nodes"][report["second"]] == 2.0
    # Training workers (two of one CPU each, the head has one CPU) ran on the second node.
    train_on_second = {
        key: n
        for key, n in report["actors"].items()
        if key.endswith("@" + report["second"]) and "Train" in key
    }
    assert train_on_second, report["actors"]
    assert report["tasks"].get(report["second"], 0) > 0 or train_on_second
