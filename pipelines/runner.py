"""Runs a pipeline: fingerprints, skip-or-run, atomic publish, lock, tracking.

For every planned step the runner computes a fingerprint from the step's code,
its config sections and the content hashes of its inputs. A published output
with the same fingerprint means the step is skipped; otherwise the step writes
into a staging folder that is published by pointer flip only when it returns.
A crash leaves the previous version current, and a rerun resumes from the first
step whose output is missing or stale.

Each run writes ``<workdir>/runs/<run_id>.json`` and one MLflow parent run with
a child run per step (params: fingerprint; metrics: duration, row counts).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import mlflow
from filelock import FileLock, Timeout

from infra.config import RayrecConfig
from infra.errors import PipelineLockedError, RayrecError, StepFailedError
from infra.logs import get_logger
from infra.publish import Published, VersionedOutput
from infra.runinfo import code_version, source_hash
from infra.storage import StoragePath
from infra.tracking import setup_mlflow
from pipelines.dag import Pipeline
from pipelines.run_summary import run_summary, summary_markdown
from pipelines.step import Step, StepContext

log = get_logger(__name__)
Status = Literal["ran", "skipped", "failed", "not run"]
# Run summaries (pipelines.run_summary) beside the run records, in their own folder.
SUMMARIES = "summaries"


@dataclass
class StepRecord:
    name: str
    status: Status = "not run"
    fingerprint: str = ""
    version: str = ""
    duration_s: float = 0.0
    row_counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


@dataclass
class RunRecord:
    run_id: str
    pipeline: str
    preset: str
    config_hash: str
    code_version: str
    started_at: str
    finished_at: str = ""
    status: Literal["running", "succeeded", "failed"] = "running"
    steps: list[StepRecord] = field(default_factory=list)
    mlflow_run_id: str = ""

    def step(self, name: str) -> StepRecord:
        return next(s for s in self.steps if s.name == name)


def step_output(config: RayrecConfig, step: str) -> VersionedOutput:
    """Where a step's versions and pointer live: ``<workdir>/steps/<step>/``."""
    workdir = StoragePath.from_uri(config.paths.workdir)
    return VersionedOutput(workdir.join("steps", step), keep=config.pipeline.keep_versions)


def published(config: RayrecConfig, step: str) -> Published | None:
    return step_output(config, step).current()


def fingerprint(step: Step, config: RayrecConfig, inputs: dict[str, Published]) -> str:
    payload = {
        "step": step.name,
        "code": source_hash(*step.code) if step.code else "",
        "config": config.section_hash(*step.config_keys) if step.config_keys else "",
        "inputs": {
            name: pub.manifest.get("content_hash", pub.version)
            for name, pub in sorted(inputs.items())
        },
        "external": _stat_hash(step.external_inputs(config)) if step.external_inputs else "",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _stat_hash(paths: tuple[str, ...]) -> str:
    """Cheap identity of external input files: names, sizes and modification times."""
    digest = hashlib.sha256()
    for uri in paths:
        root = StoragePath.from_uri(uri)
        files = root.files() if root.is_dir() else [root] if root.exists() else []
        for file in files:
            info = file.fs.get_file_info(file.path)
            digest.update(f"{file.path}|{info.size}|{info.mtime_ns}".encode())
    return digest.hexdigest()


def run_pipeline(
    pipeline: Pipeline,
    config: RayrecConfig,
    until: str | None = None,
    force: bool = False,
    track: bool = True,
) -> RunRecord:
    """Run the steps needed for ``until`` (all when None); raise on the first failure."""
    workdir = StoragePath.from_uri(config.paths.workdir)
    workdir.makedirs()
    plan = pipeline.plan(until)
    record = RunRecord(
        run_id=_new_run_id(),
        pipeline=pipeline.name,
        preset=config.preset,
        config_hash=config.section_hash(),
        code_version=code_version(),
        started_at=_now(),
        steps=[StepRecord(s.name) for s in plan],
    )
    with (
        _pipeline_lock(workdir, pipeline.name, config.pipeline.lock_timeout_s),
        _tracking(config, workdir, record, track),
    ):
        try:
            for step in plan:
                _run_step(step, config, workdir, record, force, track)
            record.status = "succeeded"
        except BaseException:
            record.status = "failed"
            raise
        finally:
            record.finished_at = _now()
            _write_record(workdir, record)
    return record


def _run_step(
    step: Step,
    config: RayrecConfig,
    workdir: StoragePath,
    record: RunRecord,
    force: bool,
    track: bool,
) -> None:
    entry = record.step(step.name)
    inputs: dict[str, Published] = {}
    for name in step.inputs:
        upstream = published(config, name)
        if upstream is None:
            raise StepFailedError(f"step {step.name}: input {name!r} has never been published")
        inputs[name] = upstream
    entry.fingerprint = fingerprint(step, config, inputs)
    output = step_output(config, step.name)
    current = output.current()
    if (
        not force
        and current is not None
        and current.manifest.get("fingerprint") == entry.fingerprint
    ):
        entry.status, entry.version = "skipped", current.version
        entry.row_counts = dict(current.manifest.get("row_counts", {}))
        entry.metrics = dict(current.manifest.get("metrics", {}))
        log.info("step.skipped", step=step.name, version=current.version)
        _track_step(track, entry, None)
        return

    log.info("step.start", step=step.name)
    started = time.perf_counter()
    try:
        with output.writing() as staging:
            ctx = StepContext(config, record.run_id, workdir, staging, inputs, entry.fingerprint)
            result = step.run(ctx)
            entry.duration_s = time.perf_counter() - started
            manifest = {
                "step": step.name,
                "fingerprint": entry.fingerprint,
                "run_id": record.run_id,
                "config_hash": record.config_hash,
                "code_version": record.code_version,
                "duration_s": round(entry.duration_s, 3),
                "row_counts": dict(result.row_counts),
                "metrics": dict(result.metrics),
                **dict(result.extra),
            }
            artifact_paths = [staging.join(a) for a in result.artifacts]
            pub = output.publish(staging, manifest)
    except BaseException as exc:
        entry.status, entry.duration_s = "failed", time.perf_counter() - started
        entry.error = f"{type(exc).__name__}: {exc}"
        _track_step(track, entry, None)
        log.error("step.failed", step=step.name, error=entry.error)
        if isinstance(exc, RayrecError):
            raise
        if isinstance(exc, Exception):
            raise StepFailedError(
                f"step {step.name} failed, nothing published: {entry.error}"
            ) from exc
        raise
    entry.status, entry.version = "ran", pub.version
    entry.row_counts, entry.metrics = dict(result.row_counts), dict(result.metrics)
    # Staged paths moved with the publish; log the published copies.
    published_artifacts = [
        pub.path.join(p.path.removeprefix(staging.path).lstrip("/")) for p in artifact_paths
    ]
    _track_step(track, entry, published_artifacts)
    log.info("step.done", step=step.name, seconds=round(entry.duration_s, 2), rows=entry.row_counts)


# --------------------------------------------------------------------------- tracking


@contextmanager
def _tracking(
    config: RayrecConfig, workdir: StoragePath, record: RunRecord, enabled: bool
) -> Iterator[None]:
    if not enabled:
        yield
        return
    setup_mlflow(config.mlflow, workdir)
    tags = {
        "rayrec.pipeline": record.pipeline,
        "rayrec.run_id": record.run_id,
        "rayrec.preset": record.preset,
        "rayrec.code_version": record.code_version,
        "rayrec.config_hash": record.config_hash,
    }
    with mlflow.start_run(run_name=f"{record.pipeline}-{record.run_id}", tags=tags) as run:
        record.mlflow_run_id = run.info.run_id
        mlflow.log_text(config.to_yaml(), "config.yaml")
        mlflow.log_params(
            {
                "preset": record.preset,
                "config_hash": record.config_hash[:12],
                "code_version": record.code_version,
            }
        )
        try:
            yield
        finally:
            # The run record is written after the body; log it from the same place.
            mlflow.log_dict(_record_dict(record), "run_record.json")
            summary = run_summary(record, _links(config, workdir, record, run))
            mlflow.log_dict(summary, "summary.json")
            mlflow.log_text(summary_markdown(summary), "summary.md")
            mlflow.log_metric("total_s", summary["total_s"])
            for row in summary["quality"]:
                mlflow.log_metric(row["key"], row["value"])
            mlflow.log_metric("steps_ran", sum(s.status == "ran" for s in record.steps))
            mlflow.log_metric("steps_skipped", sum(s.status == "skipped" for s in record.steps))
            if record.status == "failed":
                # start_run's context manager marks the run FAILED as the exception leaves it.
                mlflow.set_tag(
                    "rayrec.failed_step",
                    next((s.name for s in record.steps if s.status == "failed"), ""),
                )


def _links(
    config: RayrecConfig, workdir: StoragePath, record: RunRecord, run: mlflow.ActiveRun
) -> dict[str, str]:
    """Where a reader finds the run: its MLflow run (a UI address for a tracking server),
    the workdir, the run record."""
    uri = mlflow.get_tracking_uri()
    experiment, run_id = run.info.experiment_id, run.info.run_id
    mlflow_link = (
        f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
        if uri.startswith(("http://", "https://"))
        else f"{uri} (experiment {experiment}, run {run_id}; `mlflow ui --backend-store-uri {uri}`)"
    )
    return {
        "mlflow_run": mlflow_link,
        "workdir": workdir.uri,
        "run_record": workdir.join("runs", f"{record.run_id}.json").uri,
        "experiment": config.mlflow.experiment,
    }


def _track_step(enabled: bool, entry: StepRecord, artifacts: list[StoragePath] | None) -> None:
    """One child run per step, ended explicitly so a failure never ends the parent."""
    if not enabled:
        return
    mlflow.start_run(
        run_name=entry.name,
        nested=True,
        tags={"rayrec.step": entry.name, "rayrec.status": entry.status},
    )
    try:
        mlflow.log_params({"fingerprint": entry.fingerprint[:16], "version": entry.version or "-"})
        metrics: dict[str, float] = {"duration_s": entry.duration_s}
        metrics.update({f"rows_{k}": float(v) for k, v in entry.row_counts.items()})
        metrics.update(entry.metrics)
        mlflow.log_metrics(metrics)
        if entry.error:
            mlflow.set_tag("rayrec.error", entry.error[:5000])
        for path in artifacts or []:
            _log_artifact(path)
    finally:
        mlflow.end_run(status="FAILED" if entry.status == "failed" else "FINISHED")


def _log_artifact(path: StoragePath) -> None:
    if path.is_local:
        mlflow.log_artifact(path.path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / path.name
        local.write_bytes(path.read_bytes())
        mlflow.log_artifact(str(local))


# --------------------------------------------------------------------------- lock, records


def lock_file(workdir: StoragePath, name: str) -> Path:
    """Where the lock ``name`` of ``workdir`` lives: beside the workdir's data, or for an
    object store in the user's cache keyed by the URI (it then guards one machine)."""
    if workdir.is_local:
        path = workdir.local_path() / ".locks" / f"{name}.lock"
    else:
        key = hashlib.sha256(workdir.uri.encode()).hexdigest()[:16]
        path = Path.home() / ".cache" / "rayrec" / "locks" / f"{key}-{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _pipeline_lock(workdir: StoragePath, pipeline: str, timeout_s: float) -> Iterator[None]:
    """One run of a pipeline per workdir at a time (a file lock on this machine).

    Object-store workdirs keep the lock file in the user's cache, keyed by URI:
    it guards one machine; cluster-wide exclusion is the scheduler's job.
    """
    lock_path = lock_file(workdir, pipeline)
    lock = FileLock(lock_path, timeout=timeout_s)
    try:
        lock.acquire()
    except Timeout:
        raise PipelineLockedError(
            f"another run of pipeline {pipeline!r} holds {lock_path}; wait for it or raise pipeline.lock_timeout_s"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _write_record(workdir: StoragePath, record: RunRecord) -> None:
    workdir.join("runs", f"{record.run_id}.json").write_text_atomic(
        json.dumps(_record_dict(record), indent=2)
    )
    workdir.join("runs", SUMMARIES, f"{record.run_id}.json").write_text_atomic(
        json.dumps(run_summary(record), indent=2)
    )


def _record_dict(record: RunRecord) -> dict[str, Any]:
    return asdict(record)


def list_runs(config: RayrecConfig) -> list[dict[str, Any]]:
    """Run records of this workdir, newest first."""
    folder = StoragePath.from_uri(config.paths.workdir).join("runs")
    records = [json.loads(p.read_text()) for p in folder.list_dir() if p.name.endswith(".json")]
    return sorted(records, key=lambda r: r["started_at"], reverse=True)


def _new_run_id() -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()
