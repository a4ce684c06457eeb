"""One ``rayrec run`` in a child process, watched: its process tree sampled while it runs.

Shared by the benchmarks that time the whole job (``end_to_end.py``,
``scale.py``). The child starts a session of its own, so a timeout (or a
memory guard) can end it and every process it started in one signal. The local
Ray the driver starts (GCS, raylet, workers) is made of the driver's
descendants, so walking the tree from the child sees all of the run's memory.

Imported by those scripts as ``benchmarks.watched_run`` (they put the
repository root on ``sys.path``); it is not a script.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ProcessMemory:
    """One process of the tree at one instant: PSS and RSS in bytes, and a readable label.

    PSS splits each shared page among the processes mapping it, so the PSS of a
    tree sums to what it really holds; RSS counts shared pages (Ray's object
    store, the libraries every worker maps) once per process.
    """

    pid: int
    label: str
    pss: int
    rss: int


@dataclass(frozen=True)
class WatchedRun:
    """How a watched child ended: wall seconds, exit code (negative: killed) and why."""

    seconds: float
    code: int
    log: Path
    # "" when the child exited by itself; "timeout" or the sampler's reason otherwise.
    killed_for: str = ""


def process_label(process: psutil.Process) -> str:
    """``ray::TrainController`` for Ray's workers (their process title), else the program.

    A Python program is named by its script (``rayrec``, ``agent.py``), not by
    ``python``, so the largest process of a run reads as what it was doing.
    """
    try:
        cmdline = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    if not cmdline:
        return process.name() if process.is_running() else "?"
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    program = Path(cmdline[0]).name
    if program.startswith("python") and len(cmdline) > 1:
        script = next((arg for arg in cmdline[1:] if not arg.startswith("-")), program)
        return Path(script).name
    return program


def tree_memory(root: psutil.Process) -> list[ProcessMemory]:
    """PSS and RSS of ``root`` and all its descendants; processes that vanish are left out.

    PSS comes from ``/proc/<pid>/smaps_rollup`` (psutil's ``memory_full_info``),
    which the kernel sums itself: cheap enough to read every half second.
    """
    try:
        members = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
    out = []
    for member in members:
        try:
            info = member.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        out.append(ProcessMemory(member.pid, process_label(member), info.pss, info.rss))
    return out


def rayrec_run_command(preset: str, workdir: Path, sets: list[str]) -> list[str]:
    """``rayrec run --preset P --set paths.workdir=W [--set …]`` with this venv's ``rayrec``."""
    rayrec = Path(sys.executable).parent / "rayrec"
    command = [str(rayrec), "run", "--preset", preset, "--set", f"paths.workdir={workdir}"]
    for item in sets:
        command += ["--set", item]
    return command


# Called every interval with the tree's processes; a non-empty string ends the run
# (the reason is kept in WatchedRun.killed_for).
Sampler = Callable[[list[ProcessMemory]], str | None]


def watch_run(
    command: list[str],
    log: Path,
    timeout_s: float,
    sample: Sampler,
    env: Mapping[str, str] | None = None,
    interval_s: float = 0.5,
) -> WatchedRun:
    """Run ``command`` (output to ``log``) and call ``sample`` on its tree every ``interval_s``.

    The child is a session leader: on timeout, or when ``sample`` returns a
    reason, its process group gets SIGKILL, and so does any descendant seen that
    left the group (started in a session of its own).
    """
    started = time.perf_counter()
    killed_for = ""
    seen: dict[int, psutil.Process] = {}
    with log.open("w") as out:
        child = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        watched = psutil.Process(child.pid)
        while child.poll() is None:
            tick = time.perf_counter()
            tree = tree_memory(watched)
            for member in tree:
                if member.pid not in seen:
                    try:
                        seen[member.pid] = psutil.Process(member.pid)
                    except psutil.NoSuchProcess:
                        continue
            reason = sample(tree)
            if not reason and time.perf_counter() - started > timeout_s:
                reason = "timeout"
            if reason:
                killed_for = reason
                _kill(child, seen.values())
                break
            # Every interval_s, not interval_s plus what sampling took (a busy machine's /proc).
            time.sleep(max(0.0, interval_s - (time.perf_counter() - tick)))
    return WatchedRun(time.perf_counter() - started, child.wait(), log, killed_for)


def _kill(child: subprocess.Popen[bytes], seen: Iterable[psutil.Process]) -> None:
    """SIGKILL to the child's process group, then to stragglers of the tree still alive."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    for process in seen:
        try:
            # is_running() compares the start time too: a reused pid is left alone.
            if process.is_running():
                process.kill()
        except psutil.NoSuchProcess:
            continue


def newest_record(workdir: Path) -> dict[str, Any]:
    """The newest run record (``<workdir>/runs/<run_id>.json``) of a workdir."""
    records = sorted((workdir / "runs").glob("*.json"))
    return json.loads(records[-1].read_text())


def run_summary(workdir: Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """The run summary written beside ``record`` (headline quality, steps' seconds)."""
    path = workdir / "runs" / "summaries" / f"{record['run_id']}.json"
    return json.loads(path.read_text())
