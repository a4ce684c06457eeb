"""Scheduling without a cluster: crontab semantics, ids, entrypoints, the scheduler's memory."""

from __future__ import annotations

import datetime as dt
import shlex
from pathlib import Path

import pytest

from infra.config import load_config
from infra.errors import ConfigError
from pipelines.schedule import (
    HISTORY_KEEP,
    ConfigArgs,
    ScheduleState,
    Submission,
    cron_trigger,
    job_entrypoint,
    submission_id,
)

UTC = dt.UTC
MONDAY = dt.datetime(2026, 12, 7, tzinfo=UTC)  # 2026-12-07 is a Monday


def _next(cron: str, after: dt.datetime, zone: str = "UTC") -> dt.datetime:
    return cron_trigger(cron, zone).get_next_fire_time(None, after)


@pytest.mark.parametrize(
    ("cron", "weekday"),
    [("0 3 * * 0", 6), ("0 3 * * 7", 6), ("0 3 * * sun", 6), ("0 3 * * 1", 0), ("0 3 * * 6", 5)],
)
def test_day_of_week_reads_as_cron_does(cron: str, weekday: int) -> None:
    # Cron (and Kubernetes) count from Sunday = 0; APScheduler 3 from Monday = 0.
    assert _next(cron, MONDAY).weekday() == weekday


def test_a_day_range_skips_what_cron_skips() -> None:
    # "1-6" is Monday to Saturday: from Saturday night the next slot is Monday's.
    saturday_night = dt.datetime(2026, 12, 12, 5, tzinfo=UTC)
    assert _next("0 4 * * 1-6", saturday_night) == dt.datetime(2026, 12, 14, 4, tzinfo=UTC)
    slots = []
    at = MONDAY
    for _ in range(7):
        at = _next("0 4 * * */2", at + dt.timedelta(seconds=1))
        slots.append(at.strftime("%a"))
    assert slots == ["Tue", "Thu", "Sat", "Sun", "Tue", "Thu", "Sat"]


def test_cron_in_the_schedule_timezone() -> None:
    # 03:00 in Berlin (UTC+1 in December) is 02:00 UTC.
    assert _next("0 3 * * *", MONDAY, "Europe/Berlin").astimezone(UTC).hour == 2


def test_bad_crons_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="must have 5 fields"):
        load_config("tiny", ['schedule.jobs={a: {command: [steps], cron: "0 3 * *"}}'], environ={})
    with pytest.raises(ConfigError, match="restricts both"):
        load_config(
            "tiny", ['schedule.jobs={a: {command: [steps], cron: "0 3 1 * 1"}}'], environ={}
        )
    with pytest.raises(ConfigError, match="lowercase"):
        load_config(
            "tiny", ['schedule.jobs={A_b: {command: [steps], cron: "0 3 * * *"}}'], environ={}
        )
    with pytest.raises(ConfigError):
        cron_trigger("61 3 * * *", "UTC")
    with pytest.raises(ConfigError, match="backwards"):
        cron_trigger("0 3 * * 5-1", "UTC")


def test_submission_id_is_the_job_and_its_logical_date() -> None:
    slot = dt.datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
    assert submission_id("retrain", slot, "UTC") == "retrain-2026-12-07T0300"
    # In the schedule's zone, as the cron reads it.
    assert submission_id("retrain", slot, "Europe/Berlin") == "retrain-2026-12-07T0400"


def test_the_entrypoint_carries_the_schedulers_config(tmp_path: Path) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("simulator:\n  n_users: 30\n")
    sets = ("simulator.n_items=40", 'data.source={"kind": "simulator"}')
    config = load_config(str(preset), [*sets, "paths.workdir=rel-wd"], environ={})
    job = config.schedule.jobs["features"]
    argv = shlex.split(
        job_entrypoint(config, ConfigArgs(str(preset), sets), job, "http://head:8265")
    )
    # A remote Jobs API: `rayrec` from the cluster's PATH.
    assert argv[:4] == ["rayrec", "run", "--until", "materialize"]
    assert argv[4:6] == ["--preset", str(preset.resolve())]
    assert argv[6:] == [
        "--set",
        sets[0],
        "--set",
        sets[1],
        "--set",
        f"paths.workdir={Path('rel-wd').resolve()}",
    ]
    # A local one: the rayrec beside this Python (a virtualenv need not be on PATH).
    local = shlex.split(job_entrypoint(config, ConfigArgs("tiny"), job, "http://127.0.0.1:8265"))
    assert Path(local[0]).name == "rayrec" and Path(local[0]).is_absolute()


def _record(job: str, n: int) -> Submission:
    stamp = dt.datetime(2026, 12, 7, tzinfo=UTC).isoformat()
    return Submission(job, stamp, f"{job}-{n}", "submitted", "PENDING", "schedule", stamp, stamp)


def test_the_memory_only_moves_forward_and_the_history_is_bounded(tmp_path: Path) -> None:
    config = load_config("tiny", [f"paths.workdir={tmp_path / 'wd'}"], environ={})
    state = ScheduleState(config)
    assert state.history() == [] and not (tmp_path / "wd").exists()  # reading makes nothing
    first = dt.datetime(2026, 12, 7, 3, tzinfo=UTC)
    state.remember("retrain", first)
    state.remember("retrain", first - dt.timedelta(days=7))
    assert state.handled_through("retrain") == first
    # A job seen for the first time starts now; known ones keep their memory.
    now = first + dt.timedelta(hours=5)
    assert state.watch(["retrain", "monitor"], now) == {"retrain": first, "monitor": now}
    for n in range(HISTORY_KEEP + 3):
        state.add(_record("monitor", n))
    history = state.history()
    assert len(history) == HISTORY_KEEP
    assert history[0].submission_id == f"monitor-{HISTORY_KEEP + 2}"  # newest first
    state.set_statuses({f"monitor-{HISTORY_KEEP + 2}": "SUCCEEDED"})
    assert state.history(1)[0].status == "SUCCEEDED"
