"""Seconds and memory of the whole main job as the simulated world grows (issue 18).

    python benchmarks/scale.py [--sizes 1,4,15] [--preset default] [--timeout-s S] --json PATH

For each multiplier N, in order, runs ``rayrec run -p P --set simulator.scale=N``
(N times the preset's users, items and impressions a day; 15 on the default
preset is ~26M events) on a fresh workdir, in a child process of its own
session, bounded by ``--timeout-s`` and by ``--kill-above-gb`` of memory (the
machine is shared). Ray's temp folder is pinned to a fresh folder per run
(``RAY_TMPDIR``), so the run's object spilling lands where it can be measured,
and ``RAY_ADDRESS`` is dropped: the run starts its own local Ray, whose GCS,
raylet and workers are descendants of the driver. Every 0.5 s the script
samples the PSS of each process of that tree (``/proc/<pid>/smaps_rollup``: PSS
shares each shared page among its mappers, so the sum is what the run holds;
summed RSS would count Ray's object store and the common libraries once per
process), reads the run's log (JSON lines, ``logging.format=json``) to learn
which step is running (the runner logs ``step.start`` / ``step.done``) and
charges the sample to that step. A size that fails ends the series: the larger
ones are reported as not run.

Keys: ``sizes`` (one object per multiplier asked for: ``multiplier``,
``events`` (rows the ingest step wrote), ``users``, ``items``, ``total_s`` (the
child's wall seconds, start-up included), ``peak_pss_mb`` (the largest sum of
PSS over the tree in one sample), ``max_process_mb`` and ``max_process`` (the
largest PSS of a single process, and which: ``rayrec`` is the driver,
``ray::…`` Ray's workers), ``s_per_million_events`` (``total_s`` per million
events, of a completed run only), ``spilled_mb`` (bytes Ray spilled: the files that appeared in the
session's spill folder, each at its largest, or the raylet's own logged total
when that is larger; a file written and deleted within one sample can be
missed, so a lower bound), ``spill_peak_mb`` (the most on disk at once),
``completed``, ``killed_for``, ``quality`` (the run summary's headline metrics)
and ``steps`` (per step, in run order: ``status``, ``seconds`` from the run
record, ``peak_pss_mb``, ``max_process_mb``, ``max_process``, ``samples``;
``(outside steps)`` is start-up before the first step, the gaps between steps
and shut-down)), and ``bars``: ``baseline`` (the multiplier the ratios divide
by: 1 when asked for, else the smallest), ``largest``, and whether each bar is
met: the largest size completes; peak PSS ≤ 8 GiB at every size; the largest
size's peak PSS ≤ 1.5× and its seconds per million events ≤ 1.2× the
baseline's, both measured in this run. MB are MiB.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name
# would shadow the `features` package: drop the folder before importing it; the
# repository root goes last, so the shared helpers import as `benchmarks.…`.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.append(str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from benchmarks.watched_run import (
    ProcessMemory,
    newest_record,
    rayrec_run_command,
    run_summary,
    watch_run,
)

OUTSIDE = "(outside steps)"
# Issue 18's bars.
BAR_PEAK_PSS_MB = 8 * 1024.0
BAR_PEAK_GROWTH = 1.5
BAR_S_PER_M_GROWTH = 1.2
# The raylet's own (throttled, so also a lower bound) running total of spilled bytes.
RAYLET_SPILLED = re.compile(r"Spilled (\d+) MiB, \d+ objects")


@dataclass
class Peak:
    """The largest memory seen over the samples charged to one step (bytes)."""

    pss: int = 0
    process_pss: int = 0
    process: str = ""
    samples: int = 0

    def add(self, tree: list[ProcessMemory]) -> None:
        self.samples += 1
        self.pss = max(self.pss, sum(member.pss for member in tree))
        biggest = max(tree, key=lambda member: member.pss, default=None)
        if biggest is not None and biggest.pss > self.process_pss:
            self.process_pss, self.process = biggest.pss, biggest.label


class StepLog:
    """Follows the run's JSON log as it grows: which step is running now.

    Only whole lines are read (a line still being written waits for the next
    call); lines that are not the runner's JSON (Ray's own warnings) are skipped.
    It also keeps each step's status and seconds as logged, which is all there
    is of a run killed before it wrote its run record.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.current = OUTSIDE
        # step -> [status, seconds]: "running" until its done / failed line.
        self.steps: dict[str, list[Any]] = {}
        # step -> the row counts its done line reports (ingest's: events, users, items).
        self.rows: dict[str, dict[str, int]] = {}

    def update(self) -> str:
        """The step running as of the log's last complete line (``OUTSIDE`` between steps)."""
        try:
            with self.path.open("rb") as log:
                log.seek(self.offset)
                chunk = log.read()
        except FileNotFoundError:
            return self.current
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            self._read(line)
        return self.current

    def _read(self, line: bytes) -> None:
        if not line.startswith(b"{"):
            return
        try:
            entry = json.loads(line)
        except ValueError:
            return
        event = entry.get("event") if isinstance(entry, dict) else None
        if event == "step.start":
            self.current = str(entry.get("step", OUTSIDE))
            self.steps[self.current] = ["running", None]
        elif event in ("step.done", "step.failed"):
            ended = self.steps.setdefault(str(entry.get("step")), ["", None])
            ended[:] = ["ran" if event == "step.done" else "failed", entry.get("seconds")]
            self.rows[str(entry.get("step"))] = dict(entry.get("rows") or {})
            self.current = OUTSIDE


class SpillWatch:
    """Bytes Ray spilled under one Ray temp folder, from its sessions' spill folders.

    Each spill file has a unique name and is written once, then deleted when its
    objects are freed; the sum of every file seen, at its largest, is what was
    spilled (a file written and deleted between two scans is missed).
    """

    def __init__(self, ray_tmp: Path) -> None:
        self.ray_tmp = ray_tmp
        self.files: dict[str, int] = {}
        self.peak_on_disk = 0

    def scan(self) -> None:
        on_disk = 0
        # session_<date>_… only: session_latest is a link to the same folder.
        for folder in self.ray_tmp.glob("ray/session_[0-9]*/ray_spilled_objects_*"):
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:
                    continue
                on_disk += size
                key = f"{folder.name}/{entry.name}"
                self.files[key] = max(self.files.get(key, 0), size)
        self.peak_on_disk = max(self.peak_on_disk, on_disk)

    def spilled_bytes(self) -> int:
        """The files' total, or the raylet's last logged total when that is larger."""
        logged = 0
        for log in self.ray_tmp.glob("ray/session_[0-9]*/logs/raylet*.out"):
            for match in RAYLET_SPILLED.finditer(log.read_text(errors="replace")):
                logged = max(logged, int(match.group(1)) * 2**20)
        return max(sum(self.files.values()), logged)


@dataclass
class SizeRun:
    """What one multiplier's run measured, before it is reported."""

    multiplier: float
    seconds: float
    code: int
    killed_for: str
    peaks: dict[str, Peak] = field(default_factory=dict)
    # From the log (StepLog.steps), for a run that left no run record.
    logged_steps: dict[str, list[Any]] = field(default_factory=dict)
    logged_rows: dict[str, dict[str, int]] = field(default_factory=dict)
    spilled: int = 0
    spill_peak: int = 0
    record: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    log: str = ""


def measure_size(
    multiplier: float,
    preset: str,
    sets: list[str],
    folder: Path,
    timeout_s: float,
    kill_above_bytes: int,
) -> SizeRun:
    """One fresh ``rayrec run`` at ``simulator.scale=multiplier``, watched (module doc)."""
    workdir = folder / "wd"
    log = folder / "run.log"
    folder.mkdir(parents=True, exist_ok=True)
    # Short, in /tmp: Ray's unix sockets live below it and their paths are capped at 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr-scale-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmp)
    command = rayrec_run_command(
        preset,
        workdir,
        [f"simulator.scale={multiplier:g}", "logging.format=json", *sets],
    )
    steps = StepLog(log)
    spill = SpillWatch(ray_tmp)
    peaks: dict[str, Peak] = {}

    def sample(tree: list[ProcessMemory]) -> str | None:
        step = steps.update()
        spill.scan()
        peaks.setdefault(step, Peak()).add(tree)
        total = sum(member.pss for member in tree)
        if total > kill_above_bytes:
            return f"memory: tree PSS {total / 2**30:.1f} GiB > --kill-above-gb"
        return None

    try:
        run = watch_run(command, log, timeout_s, sample, env=env)
        steps.update()
        result = SizeRun(
            multiplier,
            run.seconds,
            run.code,
            run.killed_for,
            peaks,
            steps.steps,
            steps.rows,
            spill.spilled_bytes(),
            spill.peak_on_disk,
            log=str(log),
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if (workdir / "runs").is_dir():
        result.record = newest_record(workdir)
        if run.code == 0:
            result.summary = run_summary(workdir, result.record)
    return result


def report_size(run: SizeRun) -> dict[str, Any]:
    """The JSON object of one size (keys in the module doc)."""
    record_steps = run.record["steps"] if run.record else []
    ingest = next((s for s in record_steps if s["name"] == "ingest"), None)
    counts = ingest["row_counts"] if ingest else run.logged_rows.get("ingest", {})
    events = int(counts.get("events", 0))
    completed = run.code == 0 and not run.killed_for
    whole = Peak()
    for peak in run.peaks.values():
        whole.samples += peak.samples
        whole.pss = max(whole.pss, peak.pss)
        if peak.process_pss > whole.process_pss:
            whole.process_pss, whole.process = peak.process_pss, peak.process
    timed = (
        [(s["name"], s["status"], s["duration_s"]) for s in record_steps]
        if record_steps
        else [(name, status, seconds) for name, (status, seconds) in run.logged_steps.items()]
    )
    steps: dict[str, Any] = {}
    for name, status, seconds in timed:
        steps[name] = {
            "status": status,
            "seconds": None if seconds is None else round(seconds, 2),
            **_peak_keys(run.peaks.get(name)),
        }
    steps[OUTSIDE] = {"status": "", "seconds": None, **_peak_keys(run.peaks.get(OUTSIDE))}
    return {
        "multiplier": run.multiplier,
        "events": events,
        "users": counts.get("users"),
        "items": counts.get("items"),
        "total_s": round(run.seconds, 1),
        "peak_pss_mb": _mib(whole.pss),
        "max_process_mb": _mib(whole.process_pss),
        "max_process": whole.process,
        # Only of a finished run: a failed one stopped early and would look fast.
        "s_per_million_events": (
            round(run.seconds / (events / 1e6), 2) if events and completed else None
        ),
        "spilled_mb": _mib(run.spilled),
        "spill_peak_mb": _mib(run.spill_peak),
        "completed": completed,
        "code": run.code,
        "killed_for": run.killed_for,
        "quality": {q["key"]: q["value"] for q in run.summary["quality"]} if run.summary else {},
        "steps": steps,
        "samples": whole.samples,
    }


def not_run(multiplier: float, reason: str) -> dict[str, Any]:
    """The JSON object of a size the series stopped before."""
    keys = ("events", "total_s", "peak_pss_mb", "max_process_mb", "s_per_million_events")
    return {
        "multiplier": multiplier,
        **dict.fromkeys(keys),
        "spilled_mb": None,
        "completed": False,
        "killed_for": reason,
        "steps": {},
    }


def bars(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 18's bars, the ratios against the baseline size measured in this run."""
    base = next((s for s in sizes if s["multiplier"] == 1), min(sizes, key=_multiplier))
    top = max(sizes, key=_multiplier)
    both = base["completed"] and top["completed"]
    peak_ratio = _ratio(top["peak_pss_mb"], base["peak_pss_mb"]) if both else None
    speed_ratio = (
        _ratio(top["s_per_million_events"], base["s_per_million_events"]) if both else None
    )
    peaks = [s["peak_pss_mb"] for s in sizes]
    worst = max((p for p in peaks if p is not None), default=None)
    return {
        "baseline": base["multiplier"],
        "largest": top["multiplier"],
        "largest_completes": {"met": bool(top["completed"])},
        "peak_pss_at_every_size": {
            "limit_mb": BAR_PEAK_PSS_MB,
            "worst_mb": worst,
            "met": all(s["completed"] and s["peak_pss_mb"] <= BAR_PEAK_PSS_MB for s in sizes),
        },
        "peak_pss_growth": {
            "ratio": peak_ratio,
            "limit": BAR_PEAK_GROWTH,
            "met": peak_ratio is not None and peak_ratio <= BAR_PEAK_GROWTH,
        },
        "s_per_million_events_growth": {
            "ratio": speed_ratio,
            "limit": BAR_S_PER_M_GROWTH,
            "met": speed_ratio is not None and speed_ratio <= BAR_S_PER_M_GROWTH,
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,4,15", help="multipliers of the preset's world")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--timeout-s", type=float, default=4 * 3600.0, help="per size")
    parser.add_argument(
        "--kill-above-gb",
        type=float,
        default=16.0,
        help="end a run whose tree PSS passes this (GiB): the machine is shared",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep workdirs and logs here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    multipliers = [float(part) for part in args.sizes.split(",") if part.strip()]
    if not multipliers or any(m <= 0 for m in multipliers):
        parser.error(f"--sizes takes positive multipliers, got {args.sizes!r}")

    root = args.keep or Path(tempfile.mkdtemp(prefix="rayrec-scale-"))
    sizes: list[dict[str, Any]] = []
    try:
        for multiplier in multipliers:
            if sizes and not sizes[-1]["completed"]:
                sizes.append(not_run(multiplier, f"not run: x{sizes[-1]['multiplier']:g} failed"))
                continue
            folder = root / f"x{multiplier:g}"
            shutil.rmtree(folder, ignore_errors=True)
            run = measure_size(
                multiplier,
                args.preset,
                args.sets,
                folder,
                args.timeout_s,
                int(args.kill_above_gb * 2**30),
            )
            sizes.append(report_size(run))
            if not sizes[-1]["completed"]:
                tail = Path(run.log).read_text(errors="replace")[-3000:]
                print(f"x{multiplier:g} failed ({run.code}, {run.killed_for or 'exit'}):\n{tail}")
            if args.keep is None:
                shutil.rmtree(folder / "wd", ignore_errors=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    report = {
        "preset": args.preset,
        "sets": args.sets,
        "sizes": sizes,
        "bars": bars(sizes),
        "cpus": os.cpu_count(),
    }
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


def print_table(report: dict[str, Any]) -> None:
    print(f"\nrayrec run --preset {report['preset']} at simulator.scale = each multiplier")
    print(
        f"{'x':>5s} {'events':>11s} {'total s':>9s} {'s/M ev':>8s} {'peak PSS MB':>12s} "
        f"{'max proc MB':>12s} {'spilled MB':>11s}  done  largest process"
    )
    for size in report["sizes"]:
        print(
            f"{size['multiplier']:5g} {_num(size['events'], 11, 0)} {_num(size['total_s'], 9, 1)} "
            f"{_num(size['s_per_million_events'], 8, 1)} {_num(size['peak_pss_mb'], 12, 0)} "
            f"{_num(size['max_process_mb'], 12, 0)} {_num(size['spilled_mb'], 11, 0)}  "
            f"{'yes ' if size['completed'] else 'NO  '}  "
            f"{size.get('max_process') or size['killed_for']}"
        )
    for size in report["sizes"]:
        if not size["steps"]:
            continue
        print(f"\nx{size['multiplier']:g} per step")
        print(
            f"{'step':22s} {'status':8s} {'seconds':>9s} {'peak PSS MB':>12s} "
            f"{'max proc MB':>12s}  process"
        )
        for name, step in size["steps"].items():
            print(
                f"{name:22s} {step['status']:8s} {_num(step['seconds'], 9, 1)} "
                f"{_num(step['peak_pss_mb'], 12, 0)} {_num(step['max_process_mb'], 12, 0)}  "
                f"{step['max_process']}"
            )
    b = report["bars"]
    print(f"\nbars (baseline x{b['baseline']:g}, largest x{b['largest']:g})")
    print(f"  largest completes: {_met(b['largest_completes'])}")
    every = b["peak_pss_at_every_size"]
    print(
        f"  peak PSS <= {every['limit_mb']:.0f} MB at every size: worst "
        f"{_num(every['worst_mb'], 0, 0).strip()} MB, {_met(every)}"
    )
    for key, label in (
        ("peak_pss_growth", "peak PSS"),
        ("s_per_million_events_growth", "s per million events"),
    ):
        bar = b[key]
        ratio = "-" if bar["ratio"] is None else f"{bar['ratio']:.3f}"
        print(f"  {label}, largest / baseline: {ratio} (<= {bar['limit']}), {_met(bar)}")


def _peak_keys(peak: Peak | None) -> dict[str, Any]:
    if peak is None:  # no sample fell in the step (shorter than the interval)
        return {"peak_pss_mb": None, "max_process_mb": None, "max_process": "", "samples": 0}
    return {
        "peak_pss_mb": _mib(peak.pss),
        "max_process_mb": _mib(peak.process_pss),
        "max_process": peak.process,
        "samples": peak.samples,
    }


def _mib(n_bytes: int) -> float:
    return round(n_bytes / 2**20, 1)


def _multiplier(size: dict[str, Any]) -> float:
    return float(size["multiplier"])


def _ratio(top: float | None, base: float | None) -> float | None:
    return round(top / base, 3) if top is not None and base else None


def _num(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width},.{digits}f}"


def _met(bar: dict[str, Any]) -> str:
    return "met" if bar["met"] else "NOT met"


if __name__ == "__main__":
    main()
