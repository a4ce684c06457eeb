"""``rayrec serve start|status|reload|stop`` and ``rayrec recommend`` as a user runs them.

The server is a real ``rayrec serve start`` process (its own local Ray); the
other commands run in process through :func:`pipelines.cli.main`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from infra.config import RayrecConfig
from pipelines.cli import main

pytestmark = [pytest.mark.slow]


def test_serve_lifecycle(
    tiny_default_style_run: RayrecConfig,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    free_port: Callable[[], int],
) -> None:
    port = free_port()
    args = ["--preset", "tiny"]
    for override in (
        f"paths.workdir={tiny_default_style_run.paths.workdir}",
        "models.split.kind=temporal",
        "models.ranker.retrieval_score=true",
        "serving.models_from=published",
        f"serving.app.port={port}",
        "serving.app.num_cpus=0.5",
    ):
        args += ["--set", override]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "rayrec"), "serve", "start", *args],
        stdout=(tmp_path / "server.log").open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    try:
        deadline = time.monotonic() + 120
        ready = 0
        while time.monotonic() < deadline and server.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code
            except httpx.HTTPError:
                ready = 0
            if ready == 200:
                break
            time.sleep(1)
        assert ready == 200, f"server exit code {server.poll()}"

        assert main(["serve", "status", *args]) == 0
        assert '"generation": 1' in capsys.readouterr().out
        assert main(["recommend", "--user", "0", "--k", "3", *args]) == 0
        assert "models:" in capsys.readouterr().out
        reloaded = main(["serve", "reload", *args])
        assert reloaded == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert "serving generation 2" in capsys.readouterr().out
        # A second server on the same workdir is refused.
        assert main(["serve", "start", *args]) == 1
        assert main(["serve", "stop", *args]) == 0
        assert server.wait(timeout=60) == 0
        assert main(["serve", "status", *args]) == 1
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=60)
