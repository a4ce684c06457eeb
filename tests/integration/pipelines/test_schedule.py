"""`rayrec schedule` against a real Ray Jobs API: a slot fires as a Ray Job that succeeds,
missed slots catch up once after a restart, a duplicate submission is refused, no overlap.

The module starts its own Ray head (``ray start --head --block`` in a subprocess, a
temp dir of its own, the Jobs API on 127.0.0.1) and stops it by that process's PID,
then sweeps what is left by the temp dir in the command line: a session-wide Ray of
the test process (``ray_session``) or others' clusters on this machine are never
touched, and no test here calls ``ray.init``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from filelock import FileLock

from infra.config import RayrecConfig, load_config
from pipelines import cli
from pipelines.cli import main
from pipelines.schedule import (
    META_JOB,
    META_WORKDIR,
    ConfigArgs,
    ScheduleState,
    fire,
    refresh,
    run_scheduler,
    workdir_uri,
)

pytestmark = pytest.mark.timeout(420)

UTC = dt.UTC
CHEAP = ["config", "show"]  # a real rayrec command that needs no data: seconds as a Ray Job


def _wait_started(url: str, deadline_s: float) -> Any:
    """A client once the Jobs API takes jobs: a warm-up job has run (the job agent is
    up some seconds after the dashboard answers)."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            client = JobSubmissionClient(url)
            sid = client.submit_job(entrypoint="true", submission_id="warm-up")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert _wait_final(client, sid, deadline - time.monotonic()) == "SUCCEEDED"
    return client


def _wait_final(client: Any, sid: str, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(sid)
        if status.is_terminal() or time.monotonic() > deadline:
            return str(status.value)
        time.sleep(0.3)


def _ours(temp_dir: Path) -> list[psutil.Process]:
    """Processes of the cluster this module started: its temp dir is in their command line."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(temp_dir) in part for part in process.info["cmdline"] or []):
                found.append(process)
    return found


@pytest.fixture(scope="module")
def jobs_api(free_port: Callable[[], int]) -> Iterator[tuple[str, Any]]:
    """(address, client) of a Ray head started for this module, its Jobs API on 127.0.0.1."""
    # Short: Ray's socket paths under it must stay within the 107-byte Unix limit.
    temp_dir = Path(tempfile.mkdtemp(prefix="rrs-", dir="/tmp"))
    dashboard = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") and not k.startswith("RAYREC_")
    }
    # Ray 2.60 turns on token auth for a new cluster when a token file exists, while a
    # client turns it on only if told (RAY_AUTH_MODE=token, sticky per process): the
    # cluster is on 127.0.0.1 and lives for this module, so it runs without.
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ray = Path(sys.executable).parent / "ray"
    log = (temp_dir / "ray-start.log").open("w")
    process = subprocess.Popen(
        [
            str(ray),
            "start",
            "--head",
            "--block",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--include-dashboard=true",
            "--num-cpus=1",
            "--object-store-memory=100000000",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        try:
            # Generous: on 2 shared, busy cores a Ray head has taken two minutes to take jobs.
            client = _wait_started(url, 240.0)
        except Exception as exc:
            log.flush()
            tail = (temp_dir / "ray-start.log").read_text()[-2000:]
            raise RuntimeError(f"the Ray head did not take jobs: {exc}\n{tail}") from exc
        yield url, client
    finally:
        # SIGTERM to `ray start --block` alone: it drains and stops its processes
        # (a signal to the whole group kills the GCS first and its drain hangs).
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        for leftover in _ours(temp_dir):
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _config(
    tmp_path: Path, url: str, jobs: dict[str, Any], *extra: str
) -> tuple[RayrecConfig, ConfigArgs]:
    """The tiny preset with ``jobs`` as the whole schedule, and the args its Ray Jobs get."""
    sets = (
        f"paths.workdir={tmp_path / 'wd'}",
        f"schedule.jobs_address={url}",
        f"schedule.jobs={json.dumps(jobs)}",
        *extra,
    )
    return load_config("tiny", sets, environ={}), ConfigArgs("tiny", sets)


@pytest.fixture(autouse=True)
def _jobs_api_from_config(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray's client prefers these to the address it is given.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)


def _ray_jobs(client: Any, config: RayrecConfig, job: str) -> list[Any]:
    workdir = workdir_uri(config)
    return [
        d
        for d in client.list_jobs()
        if (d.metadata or {}).get(META_JOB) == job
        and (d.metadata or {}).get(META_WORKDIR) == workdir
    ]


def test_a_slot_fires_as_a_ray_job_that_succeeds(tmp_path: Path, jobs_api: tuple[str, Any]) -> None:
    url, client = jobs_api
    config, args = _config(tmp_path, url, {"cheap": {"command": CHEAP, "cron": "* * * * *"}})
    started = dt.datetime.now(UTC)
    # Live: the next minute's slot, through APScheduler's own loop (at most a minute away).
    handled = run_scheduler(config, args, stop_after=1, until=started + dt.timedelta(seconds=90))
    assert [r.outcome for r in handled] == ["submitted"]
    record = handled[0]
    slot = dt.datetime.fromisoformat(record.logical_date)
    assert slot.second == 0 and started < slot <= dt.datetime.now(UTC)
    assert record.submission_id == f"cheap-{slot:%Y-%m-%dT%H%M}"
    assert _wait_final(client, record.submission_id) == "SUCCEEDED"
    # The job saw the scheduler's config: same preset, the workdir made absolute.
    logs = client.get_job_logs(record.submission_id)
    assert "preset: tiny" in logs and f"workdir: {workdir_uri(config)}" in logs
    state = ScheduleState(config)
    assert state.handled_through("cheap") == slot
    [latest] = refresh(client, state)
    assert (latest.submission_id, latest.status) == (record.submission_id, "SUCCEEDED")


def test_missed_slots_catch_up_once_after_a_restart(
    tmp_path: Path, jobs_api: tuple[str, Any]
) -> None:
    url, client = jobs_api
    now = dt.datetime.now(UTC).replace(second=0, microsecond=0)
    # "cheap" fires at two minutes that passed while the scheduler was down, and not
    # again for an hour; "stale" once a day, its slot 10 minutes ago: past the grace.
    missed = [now - dt.timedelta(minutes=3), now - dt.timedelta(minutes=2)]
    stale_slot = now - dt.timedelta(minutes=10)
    jobs = {
        "cheap": {"command": CHEAP, "cron": f"{missed[0].minute},{missed[1].minute} * * * *"},
        "stale": {"command": CHEAP, "cron": f"{stale_slot.minute} {stale_slot.hour} * * *"},
    }
    config, args = _config(tmp_path, url, jobs, "schedule.misfire_grace_s=300")
    # The scheduler's memory when it stopped 5 minutes ago (each job handled up to then).
    state = ScheduleState(config)
    state.remember("cheap", now - dt.timedelta(minutes=5))
    state.remember("stale", stale_slot - dt.timedelta(days=1))

    handled = {r.job: r for r in run_scheduler(config, args, once=True)}
    assert set(handled) == {"cheap", "stale"}
    # Both missed slots of "cheap" coalesce into one run of the newer.
    cheap = handled["cheap"]
    assert cheap.outcome == "submitted"
    assert dt.datetime.fromisoformat(cheap.logical_date) == missed[1]
    assert cheap.submission_id == f"cheap-{missed[1]:%Y-%m-%dT%H%M}"
    # "stale" is recorded as missed and starts no Ray Job.
    assert (handled["stale"].outcome, handled["stale"].status) == ("missed", None)
    assert _ray_jobs(client, config, "stale") == []
    assert state.handled_through("stale") == stale_slot

    # Restarted again: nothing is due, so nothing runs twice.
    assert run_scheduler(config, args, once=True) == []
    assert [d.submission_id for d in _ray_jobs(client, config, "cheap")] == [cheap.submission_id]
    assert _wait_final(client, cheap.submission_id) == "SUCCEEDED"
    assert [r.outcome for r in state.history()] == ["submitted", "missed"]


def test_a_duplicate_submission_is_refused(
    tmp_path: Path,
    jobs_api: tuple[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, client = jobs_api
    # Wide enough that the tables below do not fold the ids (captured output is 80 wide).
    monkeypatch.setattr(cli.out, "width", 200)
    config, args = _config(tmp_path, url, {"nightly": {"command": CHEAP, "cron": "0 3 * * *"}})
    state = ScheduleState(config)
    slot = dt.datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
    submit = dict(client=client, jobs_address=url, state=state)

    first = fire(config, args, "nightly", slot, **submit)
    assert (first.outcome, first.submission_id) == ("submitted", "nightly-2026-12-07T0300")
    assert _wait_final(client, first.submission_id) == "SUCCEEDED"
    # Ray itself refuses the id a second time ...
    with pytest.raises(RuntimeError, match="already exists"):
        client.submit_job(entrypoint="true", submission_id=first.submission_id)
    # ... which the scheduler reports as a clear outcome, not a crash.
    again = fire(config, args, "nightly", slot, **submit)
    assert (again.outcome, again.status) == ("already_submitted", "SUCCEEDED")
    # The same through the CLI (a manual backfill of that logical date).
    sets = [a for item in args.overrides for a in ("--set", item)]
    assert (
        main(["schedule", "fire", "nightly", "--at", "2026-12-07T03:00", "-p", "tiny", *sets]) == 0
    )
    assert "nightly-2026-12-07T0300: already_submitted (SUCCEEDED)" in capsys.readouterr().out
    assert [d.submission_id for d in _ray_jobs(client, config, "nightly")] == [first.submission_id]

    # The history, with Ray's status, in `rayrec schedule status` and `rayrec runs`.
    assert main(["schedule", "status", "-p", "tiny", *sets]) == 0
    shown = capsys.readouterr().out
    assert shown.count("nightly-2026-12-07T0300") == 3 and "already_submitted" in shown
    assert "SUCCEEDED" in shown and "(manual)" in shown
    assert main(["runs", "-p", "tiny", *sets]) == 0
    assert "nightly-2026-12-07T0300" in capsys.readouterr().out


def test_no_overlapping_runs_of_a_job(tmp_path: Path, jobs_api: tuple[str, Any]) -> None:
    url, client = jobs_api
    # A real pipeline run that stays RUNNING: it waits for the workdir's pipeline lock,
    # which this test holds.
    jobs = {
        "features": {"command": ["run", "--until", "ingest", "--no-track"], "cron": "0 2 * * *"}
    }
    config, args = _config(tmp_path, url, jobs, "pipeline.lock_timeout_s=300")
    state = ScheduleState(config)
    submit = dict(client=client, jobs_address=url, state=state)
    lock_path = tmp_path / "wd" / ".locks" / "main.lock"
    lock_path.parent.mkdir(parents=True)
    slot = dt.datetime(2026, 12, 7, 2, 0, tzinfo=UTC)
    with FileLock(lock_path):
        first = fire(config, args, "features", slot, **submit)
        assert first.outcome == "submitted"
        try:
            deadline = time.monotonic() + 60
            while str(client.get_job_status(first.submission_id).value) != "RUNNING":
                assert time.monotonic() < deadline, client.get_job_logs(first.submission_id)
                time.sleep(0.3)
            # The next night's slot comes while the first run still runs: skipped.
            second = fire(config, args, "features", slot + dt.timedelta(days=1), **submit)
            assert second.outcome == "skipped_running" and second.status is None
            assert first.submission_id in second.message
            assert [d.submission_id for d in _ray_jobs(client, config, "features")] == [
                first.submission_id
            ]
            # A skipped slot is handled: a restart does not run it after all.
            assert state.handled_through("features") == slot + dt.timedelta(days=1)
        finally:
            client.stop_job(first.submission_id)
            assert _wait_final(client, first.submission_id) == "STOPPED"
