"""A multi-node Ray on this machine, started with ``ray start`` as a real cluster is.

A head and ``workers`` more nodes, all on 127.0.0.1, each its own raylet with
its own logical CPUs, object store and spill folder, so that Ray Train's
workers and Ray Data's tasks are placed across nodes and objects move between
object stores, as on a cluster. Jobs join it through ``RAY_ADDRESS``
(:attr:`LocalCluster.address`), as a Ray Job on a cluster would. Used by the
cluster test and ``benchmarks/cluster.py``.

Per-node memory is not enforced on one machine (that takes cgroups): what
each node bounds is its object store, which spills to the node's own folder
when full.

The cluster requires Ray's token authentication (``RAY_AUTH_MODE=token``,
the token in ``~/.ray/auth_token``, made once by ``ray get-auth-token
--generate``): every node, job and probe that joins gets it through
:meth:`LocalCluster.environment`.

``ray stop`` would stop every Ray on the machine, other users' included:
:meth:`LocalCluster.stop` ends only the processes of this cluster, found by
its own temporary folder in their command lines.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psutil

from infra.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class NodeSpec:
    """One node's limits: logical CPUs and object store bytes."""

    cpus: int
    object_store_bytes: int


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class LocalCluster:
    """``ray start`` a head and worker nodes on 127.0.0.1; a context manager that stops them.

    ``root`` holds Ray's temporary folder and each node's spill folder; a short
    path of its own by default (Ray's socket paths must stay under ~100 bytes).
    """

    head: NodeSpec
    workers: tuple[NodeSpec, ...]
    root: Path | None = None
    port: int = field(default_factory=free_port)
    _own_root: bool = False

    def __post_init__(self) -> None:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="rrc-", dir="/tmp"))
            self._own_root = True

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def temp_dir(self) -> Path:
        assert self.root is not None
        return self.root / "ray"

    def spill_dir(self, node: int) -> Path:
        """Node ``node``'s spill folder (0 is the head)."""
        assert self.root is not None
        return self.root / f"spill-{node}"

    def spilled_bytes(self) -> int:
        """Bytes in every node's spill folder now."""
        total = 0
        for node in range(1 + len(self.workers)):
            for path in self.spill_dir(node).rglob("*"):
                if path.is_file():
                    total += path.stat().st_size
        return total

    def _start(self, node: int, spec: NodeSpec) -> None:
        spill = self.spill_dir(node)
        spill.mkdir(parents=True, exist_ok=True)
        command = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={spec.cpus}",
            "--num-gpus=0",
            f"--object-store-memory={spec.object_store_bytes}",
            f"--object-spilling-directory={spill}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--disable-usage-stats",
        ]
        if node == 0:
            command += [
                "--head",
                f"--port={self.port}",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=false",
            ]
        else:
            command += [f"--address={self.address}"]
        environment = {k: v for k, v in self.environment().items() if k != "RAY_ADDRESS"}
        done = subprocess.run(command, capture_output=True, text=True, env=environment)
        if done.returncode != 0:
            raise RuntimeError(f"ray start (node {node}) failed:\n{done.stderr[-2000:]}")

    def environment(self) -> dict[str, str]:
        """This process's environment for a process that joins the cluster (a node, a
        ``rayrec run``, a probe): its address and token authentication."""
        return {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token"}

    def start(self, timeout_s: float = 120.0) -> LocalCluster:
        """Start every node and wait until all are alive."""
        ray = str(Path(sys.executable).parent / "ray")
        subprocess.run([ray, "get-auth-token", "--generate"], capture_output=True, check=True)
        try:
            self._start(0, self.head)
            for index, spec in enumerate(self.workers, start=1):
                self._start(index, spec)
        except BaseException:
            # ``with`` does not call __exit__ when __enter__ raises: end what did start.
            self.stop()
            raise
        deadline = time.monotonic() + timeout_s
        expected = 1 + len(self.workers)
        # A probe driver in a child process: this process may hold a Ray of its own.
        probe = (
            f"import ray, json; ray.init(address={self.address!r}, log_to_driver=False);"
            "print(json.dumps(sum(1 for n in ray.nodes() if n['Alive'])))"
        )
        while True:
            out = subprocess.run(
                [sys.executable, "-c", probe],
                capture_output=True,
                text=True,
                check=False,
                env=self.environment(),
            )
            alive = int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0
            if alive >= expected:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{alive} of {expected} Ray nodes came up in {timeout_s} s")
            time.sleep(2)
        log.info("local_cluster.up", address=self.address, nodes=expected)
        return self

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: those whose command line names its temporary folder."""
        marker = str(self.root)
        found = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in process.info["cmdline"] or ()):
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def stop(self, grace_s: float = 10.0) -> None:
        """End this cluster's processes (SIGTERM, then SIGKILL) and remove its folder.

        Looks again after each round: a raylet may start a worker while the
        others are stopping.
        """
        for _ in range(3):
            processes = self.processes()
            if not processes:
                break
            for process in processes:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGTERM)
            _, alive = psutil.wait_procs(processes, timeout=grace_s)
            for process in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            psutil.wait_procs(alive, timeout=grace_s)
        if self._own_root and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
