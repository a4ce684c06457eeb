"""benchmarks/scale.py's bookkeeping, without a run: step attribution, spill counting, bars."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "scale.py"


@pytest.fixture(scope="module")
def scale() -> ModuleType:
    """The script as a module (benchmarks/ is not a package; the script fixes sys.path)."""
    spec = importlib.util.spec_from_file_location("benchmark_scale", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _line(event: str, step: str) -> str:
    entry: dict[str, Any] = {"step": step, "event": event, "level": "info"}
    if event == "step.done":
        entry.update(seconds=1.5, rows={"events": 7})
    return json.dumps(entry) + "\n"


def test_step_log_follows_start_and_done_and_waits_for_whole_lines(
    scale: ModuleType, tmp_path: Path
) -> None:
    log = tmp_path / "run.log"
    steps = scale.StepLog(log)
    assert steps.update() == scale.OUTSIDE  # no log yet
    log.write_text("Ray says something\n" + _line("step.start", "ingest"))
    assert steps.update() == "ingest"
    with log.open("a") as out:
        out.write(_line("step.done", "ingest") + '{"step": "features", "event": "step.st')
    assert steps.update() == scale.OUTSIDE  # the half-written line is not read yet
    with log.open("a") as out:
        out.write('art"}\n')
    assert steps.update() == "features"
    # What a killed run leaves: the steps as logged, and ingest's row counts.
    assert steps.steps == {"ingest": ["ran", 1.5], "features": ["running", None]}
    assert steps.rows == {"ingest": {"events": 7}}


def test_spill_watch_counts_each_file_once_at_its_largest(
    scale: ModuleType, tmp_path: Path
) -> None:
    session = tmp_path / "ray" / "session_2026-12-08_00-00-00_1_2"
    spill = session / "ray_spilled_objects_abc"
    spill.mkdir(parents=True)
    (tmp_path / "ray" / "session_latest").symlink_to(session)  # must not count twice
    watch = scale.SpillWatch(tmp_path)
    (spill / "a").write_bytes(b"x" * 100)
    (spill / "b").write_bytes(b"x" * 50)
    watch.scan()
    (spill / "a").unlink()  # freed objects: the file goes, its bytes were spilled
    (spill / "c").write_bytes(b"x" * 30)
    watch.scan()
    assert watch.spilled_bytes() == 180
    assert watch.peak_on_disk == 150


def test_spill_watch_takes_the_raylets_total_when_larger(scale: ModuleType, tmp_path: Path) -> None:
    logs = tmp_path / "ray" / "session_2026-12-08_00-00-00_1_2" / "logs"
    logs.mkdir(parents=True)
    (logs / "raylet.out").write_text(
        "... :info_message:Spilled 2 MiB, 3 objects, write throughput 105 MiB/s.\n"
        "... :info_message:Spilled 5 MiB, 9 objects, write throughput 99 MiB/s.\n"
    )
    assert scale.SpillWatch(tmp_path).spilled_bytes() == 5 * 2**20


def _size(multiplier: float, peak: float, s_per_m: float, completed: bool = True) -> Any:
    return {
        "multiplier": multiplier,
        "peak_pss_mb": peak,
        "s_per_million_events": s_per_m,
        "completed": completed,
    }


def test_bars_divide_by_the_one_x_run(scale: ModuleType) -> None:
    sizes = [_size(1, 3000.0, 200.0), _size(4, 3500.0, 210.0), _size(15, 4200.0, 230.0)]
    bars = scale.bars(sizes)
    assert (bars["baseline"], bars["largest"]) == (1, 15)
    assert bars["peak_pss_growth"] == {"ratio": 1.4, "limit": 1.5, "met": True}
    assert bars["s_per_million_events_growth"]["ratio"] == 1.15
    assert bars["peak_pss_at_every_size"]["met"] and bars["largest_completes"]["met"]


def test_bars_fail_when_the_largest_did_not_finish_or_memory_is_over(scale: ModuleType) -> None:
    sizes = [_size(1, 9000.0, 200.0), scale.not_run(15, "not run: x4 failed")]
    bars = scale.bars(sizes)
    assert not bars["largest_completes"]["met"]
    assert not bars["peak_pss_at_every_size"]["met"]
    assert bars["peak_pss_growth"] == {"ratio": None, "limit": 1.5, "met": False}


def test_peak_charges_the_largest_process(scale: ModuleType) -> None:
    from benchmarks.watched_run import ProcessMemory

    peak = scale.Peak()
    peak.add([ProcessMemory(1, "rayrec", 300, 900), ProcessMemory(2, "ray::Worker", 500, 900)])
    peak.add([ProcessMemory(1, "rayrec", 100, 900)])
    assert (peak.pss, peak.process_pss, peak.process, peak.samples) == (800, 500, "ray::Worker", 2)


def test_a_killed_run_reports_its_logged_steps_and_no_speed(scale: ModuleType) -> None:
    run = scale.SizeRun(
        multiplier=4.0,
        seconds=100.0,
        code=-9,
        killed_for="timeout",
        peaks={"ingest": scale.Peak(pss=2**30, process_pss=2**29, process="rayrec", samples=3)},
        logged_steps={"ingest": ["ran", 12.0], "train_ranker": ["running", None]},
        logged_rows={"ingest": {"events": 1_000_000, "users": 10, "items": 5}},
    )
    size = scale.report_size(run)
    assert (size["events"], size["completed"], size["s_per_million_events"]) == (
        1_000_000,
        False,
        None,
    )
    assert size["peak_pss_mb"] == 1024.0 and size["max_process_mb"] == 512.0
    assert size["steps"]["ingest"]["seconds"] == 12.0
    assert size["steps"]["train_ranker"]["status"] == "running"
