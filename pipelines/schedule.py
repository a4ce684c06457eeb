"""Scheduled pipeline runs (``rayrec schedule``): cron slots from config become Ray Jobs.

What a slot of a ``schedule.jobs`` entry meets, in order:

- **Slots.** ``cron`` is a five-field crontab in ``schedule.timezone``, read as cron and
  Kubernetes CronJobs read it (day-of-week 0 and 7 are Sunday; APScheduler 3 counts
  from Monday, so :func:`cron_trigger` translates). A slot's fire time is the run's
  *logical date*.
- **One Ray Job per slot.** The run is submitted to the Ray Jobs API with the
  submission id ``<job>-<YYYY-MM-DDTHHMM>`` (:func:`submission_id`, e.g.
  ``retrain-2026-12-07T0300``). Ray refuses a second job with an existing id, so the
  same slot submitted again (a restart, a second scheduler, ``rayrec schedule fire``)
  is the outcome ``already_submitted``, never a second run. The entrypoint is
  ``rayrec <command> --preset P --set …`` with the scheduler's own preset and
  overrides and the workdir made absolute (:func:`job_entrypoint`).
- **No overlap.** APScheduler runs one instance of a job function at a time
  (``max_instances=1``), and a slot whose job still has a Ray Job PENDING or RUNNING
  from an earlier slot is skipped (``skipped_running``, logged), not queued behind
  it: the next slot picks up the newer data anyway.
- **Misfires: one catch-up.** The scheduler remembers per job the last slot it
  handled (``<workdir>/schedule/state.json``). When it starts again, the slots missed
  meanwhile are coalesced into one run of the newest (``coalesce=True``), if that one
  is at most ``schedule.misfire_grace_s`` old; otherwise it is recorded as
  ``missed`` and nothing runs. Slots missed while it runs (a suspended laptop) follow
  the same rule. A job the scheduler has never seen starts with its next slot.
- **History.** Every handled slot is a :class:`Submission` in the same file (job,
  logical date, submission id, outcome, Ray Job status, times); the running scheduler
  refreshes the status of unfinished ones every ``schedule.status_poll_s``;
  ``rayrec schedule status`` refreshes and lists them, ``rayrec runs`` shows them
  after the pipeline runs.

Why APScheduler's in-memory job store and a JSON file rather than its
SQLAlchemyJobStore: a persistent store pickles the job (function reference and
arguments, here the config), and re-adding a job with ``replace_existing`` resets
its next run time, losing exactly the missed slot a restart must catch up. Here the
jobs always come from config, and the only memory is a few timestamps a person can
read; the first run after a restart is handed to APScheduler as the job's
``next_run_time``, so its own coalescing and grace rules decide.

:func:`run_scheduler` is the typed function behind ``rayrec schedule``; it runs
bounded (``once``, ``until``, ``stop_after``, a ``stop`` event) for tests.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from filelock import FileLock, Timeout

from infra.config import RayrecConfig, ScheduledJob
from infra.errors import ConfigError, RayrecError
from infra.logs import get_logger
from infra.storage import StoragePath
from pipelines.runner import lock_file

log = get_logger(__name__)
# APScheduler's INFO lines repeat each fire in its own words; its warnings (a missed
# slot, a skipped instance) stay.
logging.getLogger("apscheduler").setLevel(logging.WARNING)

Outcome = Literal["submitted", "already_submitted", "skipped_running", "missed", "failed"]
Trigger = Literal["schedule", "manual"]

# Ray Job states of a run still in flight; and the ones that will not change again
# ("LOST": the Jobs API no longer knows the id, e.g. the cluster was replaced).
IN_FLIGHT = frozenset({"PENDING", "RUNNING"})
FINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED", "LOST"})
# Metadata keys on every submitted Ray Job: the overlap check finds a job's runs by them.
META_JOB = "rayrec.schedule.job"
META_WORKDIR = "rayrec.workdir"
META_LOGICAL_DATE = "rayrec.logical_date"
# Submissions kept in the history (the oldest go first): three weeks of an hourly job.
HISTORY_KEEP = 500
_STATE = ("schedule", "state.json")
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


class ScheduleError(RayrecError):
    """The scheduler cannot start or reach its Jobs API (a message the user can act on)."""


@dataclass(frozen=True)
class ConfigArgs:
    """How the scheduler's config was given (``--preset``, ``--set``): every Ray Job it
    submits gets the same, so it sees the same config and workdir."""

    preset: str = "default"
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Submission:
    """One handled slot (or manual fire) of a scheduled job, as the history keeps it."""

    job: str
    # The slot's time (ISO 8601 in schedule.timezone): the run's logical date.
    logical_date: str
    submission_id: str
    outcome: Outcome
    # The Ray Job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED, LOST), or
    # None when this slot started no Ray Job (missed, failed to submit).
    status: str | None
    trigger: Trigger
    fired_at: str
    updated_at: str
    # Why it was skipped or failed, or the running submission that blocked it.
    message: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Submission:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------- slots and ids


def _day(token: str) -> int:
    """A crontab day-of-week token as 0..7 (0 and 7: Sunday)."""
    text = token.strip().lower()
    if text.isdigit() and 0 <= int(text) <= 7:
        return int(text)
    if text[:3] in _CRON_DAYS and len(text) >= 3:
        return _CRON_DAYS.index(text[:3])
    raise ValueError(f"bad day of week {token!r}")


def _weekdays(field: str) -> str:
    """Crontab's day-of-week field in APScheduler 3's terms.

    APScheduler 3 numbers days from Monday = 0 (its docs call it a historical
    mistake, fixed only in 4.x); cron and Kubernetes from Sunday = 0 (7 too). Day
    *names* mean the same to both, so the field is expanded to names.
    """
    if field in ("*", "?"):
        return "*"
    days: set[int] = set()
    for part in field.split(","):
        body, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ValueError(f"bad step in {part!r}")
        if body == "*":
            low, high = 0, 6
        elif "-" in body:
            first, last = body.split("-", 1)
            low, high = _day(first), _day(last)
            if low == 7:
                low = 0
            if high < low:
                raise ValueError(f"day range {body!r} runs backwards")
        else:
            low = _day(body)
            # "5/2" in cron means from Friday on, every second day.
            high = 6 if step_text else low
        days.update(day % 7 for day in range(low, high + 1, step))
    return ",".join(_CRON_DAYS[day] for day in sorted(days))


def cron_trigger(cron: str, timezone: str) -> CronTrigger:
    """An APScheduler ``CronTrigger`` firing when ``cron`` (crontab semantics) does.

    >>> trigger = cron_trigger("0 3 * * 0", "UTC")  # Sundays at 03:00
    >>> trigger.get_next_fire_time(None, dt.datetime(2026, 12, 7, tzinfo=dt.UTC)).isoformat()
    '2026-12-13T03:00:00+00:00'
    """
    minute, hour, day, month, day_of_week = cron.split()
    try:
        return CronTrigger(
            minute=minute,
            hour=hour,
            day="*" if day == "?" else day,
            month=month,
            day_of_week=_weekdays(day_of_week),
            timezone=ZoneInfo(timezone),
        )
    except ValueError as exc:
        raise ConfigError(f"cron {cron!r}: {exc}") from None


def logical_date(slot: dt.datetime, timezone: str) -> str:
    """The slot as it appears in submission ids: ``YYYY-MM-DDTHHMM`` in the schedule's zone."""
    return f"{slot.astimezone(ZoneInfo(timezone)):%Y-%m-%dT%H%M}"


def submission_id(job: str, slot: dt.datetime, timezone: str) -> str:
    """``<job>-<logical date>``, e.g. ``retrain-2026-12-07T0300``: one Ray Job per slot.

    Cron slots are whole minutes, so minutes suffice; in a zone with daylight saving
    the repeated hour gives the same id twice and its second slot is refused as
    already submitted (one run per wall-clock slot).
    """
    return f"{job}-{logical_date(slot, timezone)}"


def workdir_uri(config: RayrecConfig) -> str:
    """The workdir as every job must see it: absolute when local, the URI otherwise."""
    path = StoragePath.from_uri(config.paths.workdir)
    return str(path.local_path().resolve()) if path.is_local else path.uri


def _is_loopback(address: str) -> bool:
    host = urlsplit(address if "://" in address else f"http://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def job_entrypoint(
    config: RayrecConfig, args: ConfigArgs, job: ScheduledJob, jobs_address: str
) -> str:
    """The shell command a job's Ray Job runs: ``rayrec <command> --preset P --set …``.

    The scheduler's overrides come first and the absolute workdir last, so the run
    reads and writes where the scheduler looks; a preset given as a YAML path is made
    absolute (a Ray Job starts in its own working directory). ``RAYREC_…``
    environment variables are *not* forwarded (they may hold secrets, and Ray shows a
    job's runtime environment on its dashboard): the cluster's own environment applies.
    """
    program = config.schedule.entrypoint
    if program is None:
        beside = Path(sys.executable).parent / "rayrec"
        program = str(beside) if beside.is_file() and _is_loopback(jobs_address) else "rayrec"
    preset = Path(args.preset)
    preset_arg = (
        str(preset.resolve())
        if preset.suffix in (".yaml", ".yml") and preset.is_file()
        else args.preset
    )
    argv = [*shlex.split(program), *job.command, "--preset", preset_arg]
    for item in (*args.overrides, f"paths.workdir={workdir_uri(config)}"):
        argv += ["--set", item]
    return shlex.join(argv)


# --------------------------------------------------------------------------- state


def _lock_file(config: RayrecConfig, name: str) -> Path:
    return lock_file(StoragePath.from_uri(config.paths.workdir), name)


class ScheduleState:
    """The scheduler's memory, ``<workdir>/schedule/state.json``.

    Per job, ``handled_through``: every slot at or before it was handled (submitted,
    refused, skipped or missed), so a restart runs only what came after. Then the
    history of submissions, newest last, and the Jobs API address the last scheduler
    used (``rayrec schedule status`` refreshes through it). Every change is a
    read-modify-write under a file lock, published atomically: the scheduler's threads
    and a ``rayrec schedule status`` in another process may write at the same time.
    """

    def __init__(self, config: RayrecConfig) -> None:
        self.path = StoragePath.from_uri(config.paths.workdir).join(*_STATE)
        self._config = config
        self._thread_lock = threading.Lock()

    def read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"jobs": {}, "submissions": []}
        return json.loads(self.path.read_text())

    @contextmanager
    def _changing(self) -> Iterator[dict[str, Any]]:
        # The lock file is made on the first write, so reading (`rayrec runs`) creates nothing.
        with self._thread_lock, FileLock(_lock_file(self._config, "schedule-state")):
            data = self.read()
            yield data
            data["submissions"] = data["submissions"][-HISTORY_KEEP:]
            self.path.write_text_atomic(json.dumps(data, indent=1))

    def handled_through(self, job: str) -> dt.datetime | None:
        value = self.read()["jobs"].get(job, {}).get("handled_through")
        return None if value is None else dt.datetime.fromisoformat(value)

    def remember(self, job: str, slot: dt.datetime) -> None:
        """Record that ``job``'s slots up to ``slot`` are handled (it only moves forward)."""
        with self._changing() as data:
            entry = data["jobs"].setdefault(job, {})
            current = entry.get("handled_through")
            if current is None or dt.datetime.fromisoformat(current) < slot:
                entry["handled_through"] = slot.isoformat()

    def watch(self, jobs: Sequence[str], now: dt.datetime) -> dict[str, dt.datetime]:
        """``handled_through`` of each job; a job seen for the first time starts at ``now``."""
        with self._changing() as data:
            for job in jobs:
                data["jobs"].setdefault(job, {}).setdefault("handled_through", now.isoformat())
            return {
                job: dt.datetime.fromisoformat(data["jobs"][job]["handled_through"]) for job in jobs
            }

    def add(self, submission: Submission, handled: dt.datetime | None = None) -> None:
        """Append ``submission`` to the history; with ``handled``, :meth:`remember` it too."""
        with self._changing() as data:
            data["submissions"].append(asdict(submission))
            if handled is not None:
                entry = data["jobs"].setdefault(submission.job, {})
                current = entry.get("handled_through")
                if current is None or dt.datetime.fromisoformat(current) < handled:
                    entry["handled_through"] = handled.isoformat()

    def history(self, limit: int | None = None) -> list[Submission]:
        """Submissions, newest first."""
        records = [Submission.from_dict(r) for r in reversed(self.read()["submissions"])]
        return records if limit is None else records[:limit]

    def set_statuses(self, statuses: dict[str, str]) -> None:
        """The Ray Job status of each submission id (every record of that id)."""
        if not statuses:
            return
        stamp = _utc_now()
        with self._changing() as data:
            for record in data["submissions"]:
                status = statuses.get(record["submission_id"])
                if status is not None and record["status"] is not None:
                    record["status"], record["updated_at"] = status, stamp

    @property
    def jobs_address(self) -> str | None:
        return self.read().get("jobs_address")

    @jobs_address.setter
    def jobs_address(self, address: str) -> None:
        with self._changing() as data:
            data["jobs_address"] = address


# --------------------------------------------------------------------------- the Jobs API


def connect(config: RayrecConfig, start_local: bool = False) -> tuple[Any, str]:
    """A ``JobSubmissionClient`` and its address.

    Ray's own rule first: ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS`` in the
    environment win (the client reads them whatever it is given). Then
    ``schedule.jobs_address``. Then, with ``start_local`` (the scheduler itself), a
    local Ray with its dashboard started in this process, whose jobs end with it;
    otherwise the address the last scheduler of this workdir recorded. A cluster with
    token authentication needs ``RAY_AUTH_MODE=token`` and its token here, as for
    ``ray job submit``.
    """
    from ray.job_submission import JobSubmissionClient

    address = (
        os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or config.schedule.jobs_address
    )
    if address is None and start_local:
        address = _local_dashboard(config)
    if address is None:
        address = ScheduleState(config).jobs_address
    if address is None:
        raise ScheduleError(
            "no Ray Jobs API: set schedule.jobs_address (e.g. http://127.0.0.1:8265) or "
            "RAY_ADDRESS, or start `rayrec schedule`"
        )
    try:
        return JobSubmissionClient(address), address
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ScheduleError(f"Ray Jobs API at {address} does not answer: {first}") from None


def _local_dashboard(config: RayrecConfig) -> str:
    import ray

    from infra.ray_runtime import ensure_ray

    ensure_ray(config.ray.model_copy(update={"include_dashboard": True}))
    # A second init only returns the running context, the public way to its dashboard.
    url = ray.init(ignore_reinit_error=True).dashboard_url
    if not url:
        raise ScheduleError(
            "this process's Ray runs without a dashboard (no Jobs API): set schedule.jobs_address"
        )
    return url if "://" in url else f"http://{url}"


def in_flight(client: Any, job: str, workdir: str) -> list[tuple[str, str]]:
    """(submission id, status) of ``job``'s Ray Jobs for ``workdir`` still PENDING/RUNNING.

    Found through the Jobs API by their metadata, not through the history, so runs
    submitted by another scheduler or before the history was lost count too.
    """
    found = []
    for details in client.list_jobs():
        meta = details.metadata or {}
        status = str(details.status.value)
        if meta.get(META_JOB) == job and meta.get(META_WORKDIR) == workdir and status in IN_FLIGHT:
            found.append((details.submission_id, status))
    return sorted(found)


def _submit(
    client: Any, sid: str, entrypoint: str, metadata: dict[str, str], timeout_s: float
) -> bool:
    """Submit; True if submitted, False if Ray already has ``sid``.

    A Jobs API that is up but not ready ("No available agent", a dropped connection)
    is retried for ``timeout_s``; a retry whose first try did land is reported by Ray
    as a duplicate, which is the truth.
    """
    import requests

    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=sid, metadata=metadata)
            return True
        except RuntimeError as exc:
            if "already exists" in str(exc):
                return False
            retry = "No available agent" in str(exc) or "try again" in str(exc)
            if not retry or time.monotonic() + delay > deadline:
                raise
        except requests.exceptions.ConnectionError:
            if time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _status(client: Any, sid: str) -> str:
    try:
        return str(client.get_job_status(sid).value)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            return "LOST"
        raise


# --------------------------------------------------------------------------- firing


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _cause(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # Ray's HTTP errors carry the server's traceback: its last line is the cause.
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def fire(
    config: RayrecConfig,
    args: ConfigArgs,
    name: str,
    slot: dt.datetime,
    *,
    client: Any,
    jobs_address: str,
    state: ScheduleState,
    trigger: Trigger = "schedule",
) -> Submission:
    """Run slot ``slot`` of job ``name``: submit its Ray Job unless one of the job's runs
    is still in flight; record the outcome in the history (module doc).

    Never raises for Jobs-API trouble: that is the outcome ``failed``, and the slot
    stays unhandled, so a restart within the grace period tries it again. Manual
    fires (``trigger="manual"``) do not move the schedule's memory.
    """
    schedule = config.schedule
    job = schedule.jobs[name]
    sid = submission_id(name, slot, schedule.timezone)
    workdir = workdir_uri(config)
    fired_at = _utc_now()
    status: str | None = None
    message = ""
    try:
        running = in_flight(client, name, workdir)
        if any(other == sid for other, _ in running):
            outcome: Outcome = "already_submitted"
            status = dict(running)[sid]
        elif running:
            outcome = "skipped_running"
            message = f"{running[0][0]} is still {running[0][1]}"
        else:
            metadata = {
                META_JOB: name,
                META_WORKDIR: workdir,
                META_LOGICAL_DATE: slot.astimezone(ZoneInfo(schedule.timezone)).isoformat(),
            }
            entrypoint = job_entrypoint(config, args, job, jobs_address)
            if _submit(client, sid, entrypoint, metadata, schedule.submit_timeout_s):
                outcome, status = "submitted", "PENDING"
                message = entrypoint
            else:
                outcome, status = "already_submitted", _status(client, sid)
    except Exception as exc:
        outcome, status, message = "failed", None, _cause(exc)
    record = Submission(
        job=name,
        logical_date=slot.astimezone(ZoneInfo(schedule.timezone)).isoformat(),
        submission_id=sid,
        outcome=outcome,
        status=status,
        trigger=trigger,
        fired_at=fired_at,
        updated_at=_utc_now(),
        message=message,
    )
    handled = slot if trigger == "schedule" and outcome != "failed" else None
    state.add(record, handled)
    level = log.warning if outcome in ("failed", "skipped_running") else log.info
    level(
        f"schedule.{outcome}", job=name, submission_id=sid, status=status, message=message or None
    )
    return record


def refresh(client: Any, state: ScheduleState) -> list[Submission]:
    """Ask Ray for the status of every unfinished submission in the history; returns the history."""
    pending = {s.submission_id for s in state.history() if s.status and s.status not in FINAL}
    statuses = {}
    for sid in sorted(pending):
        try:
            statuses[sid] = _status(client, sid)
        except Exception as exc:  # one unreachable answer must not stop the others
            log.warning("schedule.status_unknown", submission_id=sid, error=_cause(exc))
    state.set_statuses(statuses)
    return state.history()


def _not_run(
    config: RayrecConfig, name: str, slot: dt.datetime, outcome: Outcome, message: str
) -> Submission:
    timezone = config.schedule.timezone
    stamp = _utc_now()
    return Submission(
        job=name,
        logical_date=slot.astimezone(ZoneInfo(timezone)).isoformat(),
        submission_id=submission_id(name, slot, timezone),
        outcome=outcome,
        status=None,
        trigger="schedule",
        fired_at=stamp,
        updated_at=stamp,
        message=message,
    )


class _SlotExecutor(ThreadPoolExecutor):
    """APScheduler's thread-pool executor, handing each run its slot.

    APScheduler 3 calls a job function with its stored arguments only, but a run
    needs its scheduled time (the logical date): the executor adds it as ``slot``.
    With ``coalesce=True`` a run has exactly one scheduled time.
    """

    def _do_submit_job(self, job: Any, run_times: list[dt.datetime]) -> None:
        super()._do_submit_job(_AtSlot(job, run_times[-1]), run_times[-1:])


class _AtSlot:
    """An APScheduler job seen through with ``slot=<its run time>`` added to its kwargs."""

    def __init__(self, job: Any, slot: dt.datetime) -> None:
        self._job, self._slot = job, slot

    def __getattr__(self, name: str) -> Any:
        return getattr(self._job, name)

    @property
    def kwargs(self) -> dict[str, Any]:
        return {**self._job.kwargs, "slot": self._slot}

    def __str__(self) -> str:
        return str(self._job)


@contextmanager
def _one_scheduler(config: RayrecConfig) -> Iterator[None]:
    """One scheduler per workdir: a second would fire every slot twice (refused by Ray,
    but noise in the history)."""
    lock = FileLock(_lock_file(config, "scheduler"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ScheduleError(
            f"another `rayrec schedule` runs for {config.paths.workdir} (lock {lock.lock_file})"
        ) from None
    try:
        yield
    finally:
        lock.release()


def run_scheduler(
    config: RayrecConfig,
    args: ConfigArgs,
    *,
    once: bool = False,
    until: dt.datetime | None = None,
    stop_after: int | None = None,
    stop: threading.Event | None = None,
    on_fire: Callable[[Submission], None] | None = None,
) -> list[Submission]:
    """``rayrec schedule``: fire every enabled job's slots until stopped; returns the
    slots handled, in order (module doc for the policy).

    Bounded runs: ``once`` handles what is due at start (the catch-up) and returns;
    ``until`` (an aware time) and ``stop_after`` (handled slots) end it, as does
    setting ``stop``. ``on_fire`` sees each handled slot as it happens.
    """
    schedule = config.schedule
    timezone = ZoneInfo(schedule.timezone)
    jobs = {name: job for name, job in schedule.jobs.items() if job.enabled}
    triggers = {}
    for name, job in jobs.items():
        try:
            triggers[name] = cron_trigger(job.cron, schedule.timezone)
        except ConfigError as exc:
            raise ConfigError(f"schedule.jobs.{name}: {exc}") from None
    stop = stop or threading.Event()
    handled: list[Submission] = []
    done_lock = threading.Lock()

    # No address anywhere: connect() starts a local Ray in this process (see below).
    local = not (
        os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or schedule.jobs_address
    )
    with _one_scheduler(config):
        client, address = connect(config, start_local=True)
        state = ScheduleState(config)
        state.jobs_address = address
        now = dt.datetime.now(timezone)
        through = state.watch(list(jobs), now)
        first = {
            name: trigger.get_next_fire_time(through[name], now)
            for name, trigger in triggers.items()
        }
        due = sum(1 for when in first.values() if when is not None and when <= now)
        log.info(
            "schedule.start",
            jobs_address=address,
            jobs={n: (w.isoformat() if w else None) for n, w in first.items()},
            due_now=due,
        )
        if once and due == 0:
            return handled

        def finish(record: Submission) -> None:
            with done_lock:
                handled.append(record)
                count = len(handled)
            if on_fire is not None:
                on_fire(record)
            if (stop_after is not None and count >= stop_after) or (once and count >= due):
                stop.set()

        def listen(event: Any) -> None:
            name = event.job_id
            if name not in jobs:
                return
            if event.code == EVENT_JOB_EXECUTED:
                finish(event.retval)
                return
            if event.code == EVENT_JOB_MISSED:
                slot = event.scheduled_run_time
                late = dt.datetime.now(dt.UTC) - slot
                record = _not_run(
                    config,
                    name,
                    slot,
                    "missed",
                    f"{late.total_seconds():.0f} s late, past misfire_grace_s "
                    f"{schedule.misfire_grace_s}",
                )
            elif event.code == EVENT_JOB_MAX_INSTANCES:
                slot = event.scheduled_run_times[-1]
                record = _not_run(
                    config, name, slot, "skipped_running", "the previous slot is still firing"
                )
            else:  # EVENT_JOB_ERROR: fire() raised, a bug; keep the slot for a restart
                slot = event.scheduled_run_time
                record = _not_run(config, name, slot, "failed", _cause(event.exception))
                state.add(record)
                finish(record)
                return
            log.warning(f"schedule.{record.outcome}", job=name, submission_id=record.submission_id)
            state.add(record, slot)
            finish(record)

        scheduler = BackgroundScheduler(
            timezone=timezone,
            executors={"default": _SlotExecutor(max_workers=max(2, len(jobs)))},
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": schedule.misfire_grace_s,
            },
        )
        scheduler.add_listener(
            listen,
            EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES,
        )
        run = partial(fire, config, args, client=client, jobs_address=address, state=state)
        for name, trigger in triggers.items():
            if first[name] is None:
                continue
            scheduler.add_job(
                run,
                trigger=trigger,
                id=name,
                name=name,
                # "slot" is filled with each run's scheduled time by _SlotExecutor
                # (APScheduler checks the function's arguments when a job is added).
                kwargs={"name": name, "slot": None},
                # The first slot after the last one handled, perhaps in the past: then
                # APScheduler's coalesce and misfire rules decide the catch-up.
                next_run_time=first[name],
            )
        if not once:
            scheduler.add_job(
                partial(refresh, client, state),
                trigger="interval",
                seconds=schedule.status_poll_s,
                id="_status",
                name="refresh statuses",
            )
        if once and until is None:
            # A backstop only: each due job reports within its submission's retries.
            until = dt.datetime.now(dt.UTC) + due * dt.timedelta(
                seconds=schedule.submit_timeout_s + 60
            )
        scheduler.start()
        try:
            timeout = (
                None
                if until is None
                else max(0.0, (until - dt.datetime.now(dt.UTC)).total_seconds())
            )
            stop.wait(timeout)
        finally:
            scheduler.shutdown(wait=True)
        log.info("schedule.stop", handled=len(handled))
        if local and (once or until is not None or stop_after is not None):
            # The local Ray, and every job on it, ends with this process: a bounded run
            # (--once from the system's cron, say) waits for the runs it started.
            _wait_for_runs(
                client, state, [r.submission_id for r in handled if r.outcome == "submitted"]
            )
    return handled


def _wait_for_runs(client: Any, state: ScheduleState, ids: Sequence[str]) -> None:
    if ids:
        log.info("schedule.waiting_for_runs", submission_ids=list(ids))
    for sid in ids:
        while (status := _status(client, sid)) not in FINAL:
            time.sleep(2.0)
        state.set_statuses({sid: status})
