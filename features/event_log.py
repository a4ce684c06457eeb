"""The append-only event log: what serving writes and training and monitoring read.

Canonical ``events`` rows (:data:`features.schemas.EVENTS`), Parquet, one
folder per UTC date of ``ts``; the same log over another contract with a
``ts`` column (``EventLog(root, PREDICTIONS)``: serving's prediction log)
works the same way::

    <root>/date=2026-01-02/part-20260102T235959123456Z-<batch uuid>.parquet
    <root>/date=2026-01-03/part-20260102T235959123456Z-<batch uuid>.parquet
    <root>/_staging/<batch uuid>/...      work in progress, never read

A batch is written as one part per UTC date its events fall on (a batch
across midnight gives two parts, with the same name in two folders); the
stamp is the UTC time the batch was staged, so names sort in arrival order.

Commit is atomic per part: :meth:`EventLog.stage` validates the frame and
writes (and fsyncs) every part under ``_staging/<batch uuid>/``; nothing is
visible yet. :meth:`StagedBatch.commit` drops a ``COMMITTING`` marker in that
folder, then ``os.replace``-s each part into its date folder, then removes the
folder; :meth:`StagedBatch.abort` removes it. A reader therefore never sees a
partial file, and the only debris a crash can leave is under ``_staging``
(which :meth:`EventLog.read` ignores, as do Hive-style readers: the name
starts with ``_``). :meth:`EventLog.clean_staging` tidies it: a batch whose
commit had begun (marker present) is completed, since its caller had already
acted on it (serving commits after the online store took the events); any
other batch older than ``min_age`` was never committed and is deleted.

The parts of one batch are each atomic, not atomic together: a crash in the
middle of committing a batch that spans midnight may show one date's part
before the other's until :meth:`EventLog.clean_staging` completes it.

Local folders only: ``os.replace`` is what makes a part appear whole. An
object store (``s3://``, ``gs://``) would take the same staging layout through
:class:`infra.storage.StoragePath` (a single PUT or a server-side copy is
all-or-nothing per object, so :meth:`~infra.storage.StoragePath.move` of each
staged part gives the same guarantee); it is refused here until needed.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import polars as pl

from features.schemas import EVENTS, TableContract, check_schema
from features.validation import ValidationRules, validate_table
from infra.config import RayrecConfig
from infra.errors import ConfigError, DataValidationError
from infra.storage import StoragePath

STAGING = "_staging"
# Written into a staged batch's folder when its commit begins: the batch is then
# completed, never deleted, by clean_staging (see module doc).
COMMIT_MARKER = "COMMITTING"
DATE_PREFIX = "date="
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
# Staged batches younger than this may still be in flight in another process.
DEFAULT_MIN_STAGING_AGE = dt.timedelta(hours=1)


def event_log_root(config: RayrecConfig) -> str:
    """Where serving appends events: ``serving.event_log``, or ``<workdir>/event_log``."""
    return config.serving.event_log or f"{config.paths.workdir.rstrip('/')}/event_log"


def prediction_log_root(config: RayrecConfig) -> str:
    """Where serving logs its answers: ``serving.prediction_log``, or
    ``<workdir>/prediction_log`` (read with ``EventLog(root, PREDICTIONS)``)."""
    return config.serving.prediction_log or f"{config.paths.workdir.rstrip('/')}/prediction_log"


class BatchState(StrEnum):
    STAGED = "staged"
    COMMITTED = "committed"
    ABORTED = "aborted"


def check_events(
    events: pl.DataFrame, where: str = "event log", contract: TableContract = EVENTS
) -> pl.DataFrame:
    """``events`` in contract column order, or :class:`DataValidationError` naming the problem.

    ``events`` (n rows) must hold exactly the :data:`~features.schemas.EVENTS`
    columns (any order; nullable ones too) in their canonical dtypes (``ts``
    ``Datetime("us", "UTC")``, ``position`` Int32, ``request_id`` Int64, ...):
    the log converts nothing. Every row must then pass the contract's checks
    (:func:`features.validation.validate_table`: no null in a required column,
    ids >= 0, ``event_type`` one of the enum, ``propensity`` in [0, 1], ``ts``
    from 1990 to one day after now); the error quotes the first bad rows' reasons.
    """
    missing = [c for c in contract.columns if c.name not in events.columns]
    if missing:
        col = missing[0]
        raise DataValidationError(
            f"{where}: column {col.name!r} is missing (expected {col.dtype}); the log takes "
            f"frames in the canonical {contract.name} schema (features.schemas), "
            f"found {events.columns}"
        )
    extra = [c for c in events.columns if c not in contract.names]
    if extra:
        raise DataValidationError(
            f"{where}: unexpected column(s) {', '.join(repr(c) for c in extra)}; the "
            f"{contract.name} contract has exactly {contract.names}"
        )
    check_schema(events.schema, contract, where)
    result = validate_table(events, contract, ValidationRules())
    if result.quarantined.height:
        reasons = result.quarantined.get_column("_reason").head(3).to_list()
        raise DataValidationError(
            f"{where}: {result.quarantined.height:,} of {events.height:,} rows break the "
            f"{contract.name} "
            f"contract, e.g. rows {result.quarantined.get_column('_source_row').head(3).to_list()}: "
            + " | ".join(reasons)
        )
    return result.valid


@dataclass
class StagedBatch:
    """One validated batch written under ``_staging/<batch_id>/``, not yet visible.

    ``parts`` maps each staged file to where :meth:`commit` puts it (one per
    UTC date of the batch). Commit or abort exactly once.
    """

    log: EventLog
    batch_id: str
    rows: int
    parts: list[tuple[Path, Path]]
    state: BatchState = field(default=BatchState.STAGED)

    @property
    def folder(self) -> Path:
        return self.log.staging_root / self.batch_id

    @property
    def targets(self) -> list[Path]:
        """Where the parts will be (or are, once committed), in date order."""
        return [target for _, target in self.parts]

    def commit(self) -> list[Path]:
        """Move every part into its date folder (``os.replace``); returns their paths.

        Raises ``RuntimeError`` when the batch was already committed or aborted.
        Should a move fail or the process die half-way, the ``COMMITTING``
        marker makes :meth:`EventLog.clean_staging` finish the job.
        """
        self._expect_staged("commit")
        if self.parts:
            (self.folder / COMMIT_MARKER).touch()
        _commit_parts(self.parts)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.state = BatchState.COMMITTED
        return self.targets

    def abort(self) -> None:
        """Delete the staged parts; the log is as if the batch never came.

        A no-op on a batch already aborted; ``RuntimeError`` on a committed one.
        """
        if self.state == BatchState.ABORTED:
            return
        self._expect_staged("abort")
        shutil.rmtree(self.folder, ignore_errors=True)
        self.state = BatchState.ABORTED

    def _expect_staged(self, op: str) -> None:
        if self.state != BatchState.STAGED:
            raise RuntimeError(f"cannot {op} event batch {self.batch_id}: it is {self.state}")


class EventLog:
    """The event log under ``root`` (a local folder; created on the first write).

    Safe for several writers at once (processes or threads: every batch has
    its own uuid, staging folder and part names) and for readers meanwhile.
    """

    def __init__(self, root: str | Path, contract: TableContract = EVENTS) -> None:
        if "ts" not in contract.names:
            raise ValueError(f"{contract.name}: a log is partitioned by ts, the contract has none")
        self.contract = contract
        text = os.fspath(root)
        # Checked before resolving: opening an s3:// filesystem already calls the network.
        if "://" in text and not text.startswith("file://"):
            raise ConfigError(
                f"event log {text}: only local folders are supported (the commit is an "
                "os.replace); see features.event_log for what object storage would need"
            )
        self.root = StoragePath.from_uri(text).local_path()

    def __repr__(self) -> str:
        return f"EventLog({str(self.root)!r})"

    @property
    def staging_root(self) -> Path:
        return self.root / STAGING

    # ------------------------------------------------------------------ writes

    def stage(self, events: pl.DataFrame) -> StagedBatch:
        """Validate ``events`` (:func:`check_events`) and write its parts to staging.

        ``events``: (n, 9) canonical frame. Rows keep their order within each
        part. Raises :class:`DataValidationError` (nothing written) when the
        frame breaks the contract. An empty frame stages a batch of no parts.
        """
        frame = check_events(events, f"{self.contract.name} log {self.root}", self.contract)
        batch_id = uuid.uuid4().hex
        staged = StagedBatch(self, batch_id, frame.height, [])
        if frame.height == 0:
            return staged
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{PART_PREFIX}{stamp}-{batch_id}{PART_SUFFIX}"
        day = pl.col("ts").dt.date()
        days = frame.select(day.unique().sort()).to_series().to_list()
        folder = self.staging_root / batch_id
        try:
            for date in days:
                source = folder / _date_folder(date) / name
                source.parent.mkdir(parents=True, exist_ok=True)
                _write_synced(frame.filter(day == date), source)
                staged.parts.append((source, self.root / _date_folder(date) / name))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return staged

    def append(self, events: pl.DataFrame) -> list[Path]:
        """:meth:`stage` then :meth:`StagedBatch.commit`: the committed part paths."""
        return self.stage(events).commit()

    def clean_staging(self, min_age: dt.timedelta = DEFAULT_MIN_STAGING_AGE) -> dict[str, int]:
        """Tidy ``_staging`` after crashes; returns ``{"completed": n, "deleted": n}`` batches.

        A batch whose commit had begun is completed now, whatever its age;
        one that never began committing is deleted once its folder is older
        than ``min_age`` (younger ones may be another writer's, in flight).
        """
        counts = {"completed": 0, "deleted": 0}
        if not self.staging_root.is_dir():
            return counts
        now = time.time()
        for folder in sorted(p for p in self.staging_root.iterdir() if p.is_dir()):
            if (folder / COMMIT_MARKER).exists():
                parts = [
                    (source, self.root / source.parent.name / source.name)
                    for source in sorted(folder.glob(f"{DATE_PREFIX}*/{PART_PREFIX}*"))
                ]
                _commit_parts(parts)
                shutil.rmtree(folder, ignore_errors=True)
                counts["completed"] += 1
            elif now - folder.stat().st_mtime > min_age.total_seconds():
                shutil.rmtree(folder, ignore_errors=True)
                counts["deleted"] += 1
        return counts

    # ------------------------------------------------------------------ reads

    def dates(self) -> list[dt.date]:
        """UTC dates holding at least one committed part, ascending."""
        out = []
        if not self.root.is_dir():
            return out
        for folder in self.root.iterdir():
            date = _parse_date_folder(folder)
            if date is not None and any(_part_files(folder)):
                out.append(date)
        return sorted(out)

    def parts(self, start: dt.date | None = None, end: dt.date | None = None) -> list[Path]:
        """Committed part files of the dates ``start..end`` (inclusive; None: open), sorted
        by date then name (arrival order within a date)."""
        files: list[Path] = []
        for date in self.dates():
            if (start is None or date >= start) and (end is None or date <= end):
                files.extend(sorted(_part_files(self.root / _date_folder(date))))
        return files

    def read(self, start: dt.date | None = None, end: dt.date | None = None) -> pl.DataFrame:
        """Every committed event of the UTC dates ``start..end`` (inclusive; None: open).

        Returns the (n, 9) canonical events frame (:data:`features.schemas.EVENTS`
        columns and dtypes), rows by date, then part (arrival order), then row;
        the empty frame with that schema when nothing matches. ``_staging`` is
        never read.
        """
        files = self.parts(start, end)
        if not files:
            return pl.DataFrame(schema=self.contract.polars_schema)
        frame = pl.read_parquet(files).select(self.contract.names)
        check_schema(frame.schema, self.contract, f"{self.contract.name} log {self.root}")
        return frame


def _date_folder(date: dt.date) -> str:
    return f"{DATE_PREFIX}{date.isoformat()}"


def _parse_date_folder(path: Path) -> dt.date | None:
    if not path.name.startswith(DATE_PREFIX) or not path.is_dir():
        return None
    try:
        return dt.date.fromisoformat(path.name.removeprefix(DATE_PREFIX))
    except ValueError:
        return None


def _part_files(folder: Path) -> list[Path]:
    return [
        p
        for p in folder.iterdir()
        if p.name.startswith(PART_PREFIX) and p.name.endswith(PART_SUFFIX) and p.is_file()
    ]


def _write_synced(frame: pl.DataFrame, path: Path) -> None:
    with path.open("wb") as handle:
        frame.write_parquet(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _commit_parts(parts: list[tuple[Path, Path]]) -> None:
    folders = set()
    for source, target in parts:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        folders.add(target.parent)
    for folder in folders:  # the renames themselves survive a power cut
        _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
