"""Monitoring runs on the pipeline's own data: reference profile, current windows, checks, alerts.

The parts (what a check is, how it decides, how an alert is mailed once) live in
:mod:`monitoring`, which sees predictions as columns; this module feeds them the
pipeline's published outputs and the reranker that scores them.

Reference (the ``reference_profile`` step, :mod:`pipelines.steps.monitoring`)
    ``monitoring.reference_rows`` rows drawn (seeded, uniform) from the last
    ``monitoring.reference_days`` of the reranker's held-out part (valid +
    test of the ``features`` examples split as ``train_ranker`` split them: on
    its training rows a model's scores are sharper and its AUC higher than on
    any later window, which would read as drift every day; the log's age
    where that period starts says which windowed counts had filled up: the
    others, like growing counters and ids, are not judged, see
    :class:`features.feature_spec.DriftRole`), scored by the reranker serving uses (the
    fine-tuned one when ``finetune_ranker`` published a model, else
    ``train_ranker``'s; with the retrieval score from ``train_retrieval``'s
    two-tower when the spec has it) and saved as a
    :class:`~monitoring.reference.ReferenceProfile` (the spec's numeric and
    categorical features, ``score``, the labels). ``reference_meta.json``
    names the exact step versions that scored it.

Current window (:func:`run_monitoring`)
    The ``features`` examples with ``ts`` in ``[end - window_days, end)``
    (default ``end``: midnight after the newest example), sampled (seeded,
    uniform) to ``monitoring.max_window_rows`` and scored by the very model
    versions the reference names, so a prediction drift is the data's, not a
    model swap's. Checks: data drift over the profile's feature columns,
    prediction drift of ``score``, concept drift of the labels against the
    scores (not judged below ``monitoring.concept_min_labels``) and, when
    serving's prediction log has reranked rows in the window, drift of the
    served scores against the log's previous window of the same length (served
    candidates are the reranker's own top k, not the logged impressions the
    reference holds: against the reference they would always differ).

Outputs
    ``<workdir>/monitoring/reports/<window key>/`` published atomically
    (:class:`infra.publish.VersionedOutput`: a version folder and a
    ``CURRENT`` pointer) with ``summary.json`` and per check Evidently HTML +
    JSON (``data_drift``, ``prediction_drift``, ``served_prediction_drift``)
    and ``concept_drift.json``; one :class:`~monitoring.alerts.Alert` per run
    through :class:`~monitoring.alerts.AlertSender` (sent once per finding and
    window, cooldown, dead letter); with tracking on, an MLflow run (nested in
    the pipeline's when called as a step) with the metrics as time series
    (``step`` = days since 1970-01-01 of the window's end), the summary and
    the reports as artifacts.

With no recipients configured (the default) findings go to the dead-letter
file with a warning and the run succeeds whatever ``on_smtp_failure`` says:
nothing was configured to fail. With recipients, a failed delivery under
``on_smtp_failure: fail`` marks the record ``delivery_failed`` (the CLI exits
non-zero, the pipeline step fails after the reports are published).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import polars as pl

from features.dataset import read_events, read_examples
from features.event_log import EventLog, prediction_log_root
from features.feature_spec import SPEC_FILE, FeatureSpec
from features.schemas import PREDICTIONS
from features.training_frame import has_impressions
from infra.config import DriftTestConfig, MonitoringConfig, RayrecConfig, SketchConfig
from infra.errors import RayrecError
from infra.logs import get_logger
from infra.publish import Published, VersionedOutput
from infra.storage import StoragePath
from infra.tracking import setup_mlflow
from models.artifacts import SavedReranker, load_reranker, load_two_tower
from models.calibration import click_probabilities
from monitoring.alerts import (
    Alert,
    AlertDeliveryError,
    AlertSender,
    DeliveryReport,
    FeatureDrift,
    Finding,
    Window,
)
from monitoring.columns import ROW, ScanRows
from monitoring.concept import ConceptResult, concept_day_noise, concept_drift, noise_key
from monitoring.drift import DriftResult, data_drift, day_noise, prediction_drift
from monitoring.embeddings import EMBEDDING_TEST, RECALL_TEST, EmbeddingReference
from monitoring.reference import ReferenceProfile
from monitoring.sketch_checks import (
    HEAD_TEST,
    SKETCH_SCHEMA,
    dau_check,
    day_sketches,
    head_check,
    load_sketches,
)
from monitoring.verdict import Verdict, noise_threshold, not_judged
from monitoring.workspace import add_reports, workspace_path
from pipelines.embedding_checks import embedding_checks
from pipelines.ranker.encoded import temporal_cuts
from pipelines.ranker.retrieval_feature import with_retrieval_score
from pipelines.runner import published, step_output
from serving.encoding import RETRIEVAL_SCORE, encode_examples
from serving.scoring import predict

log = get_logger(__name__)

MONITOR = "reranker"
REFERENCE_STEP = "reference_profile"
PROFILE_FOLDER = "profile"
REFERENCE_META = "reference_meta.json"
SUMMARY_FILE = "summary.json"
LAST_RUN_FILE = "last_run.json"
SKETCH_CACHE = "sketch_cache"
SCORE = "score"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


class MonitoringError(RayrecError):
    """Monitoring cannot run on this workdir (names what to run first)."""


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Scorer:
    """The reranker (and its spec, and the two-tower for its retrieval-score input) that
    scores example rows into calibrated click probabilities; ``sources`` names the
    ``{step: version}`` each part came from."""

    reranker: SavedReranker
    reranker_step: str
    spec: FeatureSpec
    two_tower: Any | None
    history_length: int
    sources: dict[str, str]

    def score(self, frame: pl.DataFrame) -> pl.DataFrame:
        """``frame`` plus ``score`` (Float64; and ``retrieval_score`` when the spec reads it)."""
        if RETRIEVAL_SCORE in self.spec.names and RETRIEVAL_SCORE not in frame.columns:
            if self.two_tower is None:
                raise MonitoringError("the reranker reads retrieval_score but no two-tower exists")
            frame = with_retrieval_score(frame, self.two_tower, self.history_length)
        if frame.height == 0:
            return frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(SCORE))
        logits = predict(self.reranker.model, encode_examples(frame, self.spec))
        probabilities = click_probabilities(logits, self.reranker.calibrator)
        return frame.with_columns(pl.Series(SCORE, probabilities, dtype=pl.Float64))


def load_scorer(
    train_ranker: Published,
    finetune_ranker: Published | None,
    train_retrieval: Published | None,
    history_length: int,
) -> Scorer | None:
    """The reranker serving uses (fine-tuned when published, else trained), its spec (saved
    beside ``train_ranker``'s model) and the two-tower when the spec reads its score.
    None when ``train_ranker`` published no model."""
    trained = Path(train_ranker.path.local_path()) / "model"
    if not trained.exists():
        return None
    spec = FeatureSpec.model_validate_json((trained / SPEC_FILE).read_text())
    sources = {"train_ranker": train_ranker.version}
    folder, step = trained, "train_ranker"
    if finetune_ranker is not None:
        finetuned = Path(finetune_ranker.path.local_path()) / "model"
        if finetuned.exists():
            folder, step = finetuned, "finetune_ranker"
            sources["finetune_ranker"] = finetune_ranker.version
    two_tower = None
    if RETRIEVAL_SCORE in spec.names and train_retrieval is not None:
        model = Path(train_retrieval.path.local_path()) / "model"
        if model.exists():
            two_tower = load_two_tower(model)
            sources["train_retrieval"] = train_retrieval.version
    return Scorer(load_reranker(folder), step, spec, two_tower, history_length, sources)


def _version(config: RayrecConfig, step: str, version: str) -> Published:
    path = step_output(config, step).root.join(version)
    if not path.exists():
        raise MonitoringError(
            f"the reference profile was scored with {step} {version}, which is gone "
            f"(pipeline.keep_versions): run `rayrec run --until {REFERENCE_STEP}`"
        )
    return Published(version, path, {})


def scorer_of_reference(config: RayrecConfig, sources: dict[str, str]) -> Scorer:
    """The exact model versions the reference profile was scored with."""
    picked = {step: _version(config, step, version) for step, version in sources.items()}
    scorer = load_scorer(
        picked["train_ranker"],
        picked.get("finetune_ranker"),
        picked.get("train_retrieval"),
        config.features.history_length,
    )
    if scorer is None:
        raise MonitoringError("the reference profile's train_ranker version has no model")
    return scorer


# --------------------------------------------------------------------------- record


@dataclass
class MonitorRecord:
    """What one monitoring run judged, wrote and sent."""

    window: Window
    window_days: int
    rows: dict[str, int]
    checks: list[dict[str, Any]]
    findings: list[str]
    reports: str | None = None
    delivery: DeliveryReport | None = None
    delivery_failed: bool = False
    delivery_note: str = ""
    mlflow_run_id: str | None = None
    seconds: float = 0.0
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return window_key(self.window)

    def to_dict(self) -> dict[str, Any]:
        return {
            "monitor": MONITOR,
            "window": {
                "start": self.window.start.isoformat() if self.window.start else None,
                "end": self.window.end.isoformat() if self.window.end else None,
                "key": self.key,
                "days": self.window_days,
            },
            "rows": self.rows,
            "reason": self.reason,
            "checks": self.checks,
            "findings": self.findings,
            "reports": self.reports,
            "delivery": self.delivery.model_dump(mode="json") if self.delivery else None,
            "delivery_failed": self.delivery_failed,
            "delivery_note": self.delivery_note,
            "mlflow_run_id": self.mlflow_run_id,
            "seconds": round(self.seconds, 3),
            **self.details,
        }


def window_key(window: Window) -> str:
    """A folder name for a window: ``20240305T0000-20240306T0000``."""
    assert window.start is not None and window.end is not None
    return f"{window.start:%Y%m%dT%H%M}-{window.end:%Y%m%dT%H%M}"


def window_bounds(
    newest: dt.datetime, window_end: dt.datetime | dt.date | None, window_days: int
) -> Window:
    """``[end - window_days, end)``; ``end`` defaults to midnight UTC after ``newest``.

    A date (or a naive datetime) is taken as UTC; a date means its midnight.
    """
    if window_end is None:
        newest = _utc(newest)
        end = dt.datetime.combine(newest.date(), dt.time(), tzinfo=dt.UTC) + DAY
    elif isinstance(window_end, dt.datetime):
        end = _utc(window_end)
    else:
        end = dt.datetime.combine(window_end, dt.time(), tzinfo=dt.UTC)
    return Window(start=end - window_days * DAY, end=end)


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# --------------------------------------------------------------------------- run


def served_scores(config: RayrecConfig, start: dt.datetime, end: dt.datetime) -> pl.DataFrame:
    """Reranked rows of serving's prediction log with ``ts`` in ``[start, end)`` (``score``)."""
    root = StoragePath.from_uri(prediction_log_root(config))
    if not root.is_local or not root.exists():
        return pl.DataFrame(schema=PREDICTIONS.polars_schema)
    frame = EventLog(root.local_path(), PREDICTIONS).read(
        start.date(), (end - dt.timedelta(microseconds=1)).date()
    )
    return frame.filter(
        (pl.col("ts") >= start) & (pl.col("ts") < end) & pl.col("reranked").fill_null(False)
    )


def validated_events(config: RayrecConfig) -> StoragePath:
    current = published(config, "validate")
    if current is None:
        raise MonitoringError("no validated events published: run `rayrec run --until validate`")
    return current.path


def _sketched_events(folder: StoragePath, start: dt.datetime, end: dt.datetime) -> pl.LazyFrame:
    """The validated events under ``folder`` the sketches count, with ``ts`` in ``[start,
    end)``: the impressions of a click log, every event of a log without them."""
    events = read_events(folder)
    if has_impressions(events):
        events = events.filter(pl.col("event_type") == "impression")
    return events.filter((pl.col("ts") >= start) & (pl.col("ts") < end))


def sketches_of_days(
    events: pl.LazyFrame, days: Sequence[dt.date], sketches: SketchConfig
) -> pl.DataFrame:
    """:func:`~monitoring.sketch_checks.day_sketches` of ``events`` on ``days``, one UTC day
    at a time: a sketch is per day anyway, so a day's ``user_id, item_id, ts`` is all
    that is ever in memory, not the period's (14 days of a 25M-event log)."""
    built = [
        day_sketches(
            events.filter(pl.col("ts").dt.date() == day)
            .select("user_id", "item_id", "ts")
            .collect(engine="streaming"),
            sketches,
        )
        for day in days
    ]
    return pl.concat(built) if built else pl.DataFrame(schema=SKETCH_SCHEMA)


def sketches_between(
    folder: StoragePath, start: dt.datetime, end: dt.datetime, sketches: SketchConfig
) -> pl.DataFrame:
    """Per-day sketches of the validated events under ``folder`` with ``ts`` in ``[start,
    end)`` (:func:`_sketched_events`), a day at a time."""
    events = _sketched_events(folder, start, end)
    days = (
        events.select(pl.col("ts").dt.date().unique().sort().alias("day"))
        .collect(engine="streaming")
        .get_column("day")
        .to_list()
    )
    return sketches_of_days(events, days, sketches)


def cached_day_sketches(
    config: RayrecConfig, folder: StoragePath, start: dt.datetime, end: dt.datetime
) -> pl.DataFrame:
    """Per-day sketches (:data:`~monitoring.sketch_checks.SKETCH_SCHEMA`) of the events
    with ``ts`` in ``[start, end)``, built once per day.

    A day's sketches are kept under ``<workdir>/monitoring/sketch_cache/<day>.parquet``
    with the number of events they were built from; they are reused while the log
    still holds that many events for the day (a day still filling up, or a log
    ingested anew with other events, is rebuilt). Counting reads one column, so a
    run costs one day's sketches, not ``trend_days`` of them.
    """
    cache = StoragePath.from_uri(config.paths.workdir).join("monitoring", SKETCH_CACHE)
    in_range = _sketched_events(folder, start, end)
    counts = (
        in_range.group_by(pl.col("ts").dt.date().alias("day"))
        .len()
        .sort("day")
        .collect(engine="streaming")
        .rows()
    )
    kept: list[pl.DataFrame] = []
    missing: list[dt.date] = []
    for day, count in counts:
        path = cache.join(f"{day.isoformat()}.parquet")
        if path.exists():
            frame = pl.read_parquet(io.BytesIO(path.read_bytes()))
            if frame.height == 1 and frame.item(0, "events") == count:
                kept.append(frame.drop("events"))
                continue
        missing.append(day)
    if missing:
        built = sketches_of_days(in_range, missing, config.features.sketches)
        for day, count in counts:
            if day not in missing:
                continue
            frame = built.filter(pl.col("day") == day)
            buffer = io.BytesIO()
            frame.with_columns(pl.lit(count, dtype=pl.Int64).alias("events")).write_parquet(buffer)
            cache.join(f"{day.isoformat()}.parquet").write_bytes_atomic(buffer.getvalue())
            kept.append(frame)
    if not kept:
        return pl.DataFrame(schema=SKETCH_SCHEMA)
    return pl.concat(kept).sort("day")


def sketch_checks(
    config: RayrecConfig, window: Window, reference: pl.DataFrame | None
) -> list[Verdict]:
    """DAU of the window against the trend days before it; its popularity head against the
    reference's days (none saved: not judged, with the reason)."""
    settings = config.monitoring.sketches
    assert window.start is not None and window.end is not None
    sketches = config.features.sketches
    folder = validated_events(config)
    current = cached_day_sketches(config, folder, window.start, window.end)
    trend_start = window.start - settings.trend_days * DAY
    trend = cached_day_sketches(config, folder, trend_start, window.start)
    checks = [dau_check(current, trend, settings.margin, settings.dau_floor, settings.min_days)]
    if reference is None:
        checks.append(not_judged("popularity_head", HEAD_TEST, "no reference sketches"))
    else:
        checks.append(
            head_check(
                current,
                reference,
                sketches,
                settings.head_k,
                settings.margin,
                settings.head_floor,
                settings.min_days,
            )
        )
    return checks


SKETCH_GROUP = "sketch"
EMBEDDING_GROUP = "embedding"


def _group(verdict: Verdict) -> str:
    """The check group a single-statistic verdict belongs to (rows, metrics, report file)."""
    return EMBEDDING_GROUP if verdict.test in (EMBEDDING_TEST, RECALL_TEST) else SKETCH_GROUP


def published_reference(config: RayrecConfig) -> StoragePath:
    """The published reference profile step's folder (see :func:`load_reference`)."""
    current = published(config, REFERENCE_STEP)
    if current is None:
        raise MonitoringError(
            f"no reference profile (never published): run `rayrec run --until {REFERENCE_STEP}`"
        )
    return current.path


def load_reference(
    config: RayrecConfig,
) -> tuple[ReferenceProfile, dict[str, Any], pl.DataFrame | None]:
    """The profile, its ``reference_meta.json`` and its days' sketches (None: not saved)."""
    current = published(config, REFERENCE_STEP)
    if current is None or not current.path.join(PROFILE_FOLDER, "reference.json").exists():
        reason = (current.manifest.get("skipped") if current else None) or "never published"
        raise MonitoringError(
            f"no reference profile ({reason}): run `rayrec run --until {REFERENCE_STEP}`"
        )
    meta = json.loads(current.path.join(REFERENCE_META).read_text())
    folder = current.path.join(PROFILE_FOLDER)
    return ReferenceProfile.load(folder), meta, load_sketches(folder)


def judge_window(
    profile: ReferenceProfile, current: pl.DataFrame, settings: MonitoringConfig, seed: int
) -> tuple[dict[str, DriftResult], ConceptResult | None]:
    """Data drift of the profile's features, prediction drift of ``score`` and, when the
    window has labels, concept drift: ``current`` (the window's rows, scored) against
    ``profile``, each side sampled to ``settings.max_window_rows``."""
    results = {
        "data_drift": data_drift(
            profile.frame,
            current,
            profile.features,
            settings.drift,
            settings.max_window_rows,
            seed,
            noise=profile.noise,
        ),
        "prediction_drift": prediction_drift(
            profile.frame,
            current,
            settings.drift,
            settings.max_window_rows,
            seed,
            SCORE,
            noise=profile.noise,
        ),
    }
    concept = None
    if profile.labels and profile.labels[0] in current.columns:
        concept = concept_drift(
            profile.frame,
            current,
            settings.concept_ci,
            settings.concept_min_labels,
            seed,
            label=profile.labels[0],
            score=SCORE,
            max_rows=settings.max_window_rows,
            min_change=concept_min_change(profile, settings),
        )
    return results, concept


def concept_min_change(profile: ReferenceProfile, settings: MonitoringConfig) -> dict[str, float]:
    """Per concept metric, the change a window must show: ``concept_min_change``, raised to
    ``drift.noise_margin`` times the reference days' own day-to-day change when measured."""
    return {
        metric: noise_threshold(
            floor, settings.drift.noise_margin, profile.noise.get(noise_key(metric))
        )
        for metric, floor in settings.concept_min_change.items()
    }


def run_monitoring(
    config: RayrecConfig,
    window_end: dt.datetime | dt.date | None = None,
    window_days: int | None = None,
    *,
    track: bool = True,
    sender: AlertSender | None = None,
) -> MonitorRecord:
    """Judge one window against the reference profile; publish reports, alert, track.

    See the module docstring. ``track``: log to MLflow (a nested run when one is
    active). ``sender``: the alert sender (default: from ``monitoring.alerts``).
    """
    started = time.perf_counter()
    settings = config.monitoring
    days = window_days or settings.window_days
    profile, meta, reference_sketches = load_reference(config)
    reference_vectors = EmbeddingReference.load(published_reference(config).join(PROFILE_FOLDER))
    features = published(config, "features")
    if features is None:
        raise MonitoringError("no features published: run `rayrec run --until features`")
    examples = read_examples(features.path)
    if "ts" not in examples.collect_schema().names():
        raise MonitoringError("the examples have no ts column: a table without time has no windows")
    newest = examples.select(pl.col("ts").max()).collect(engine="streaming").item()
    window = window_bounds(newest, window_end, days)
    assert window.start is not None and window.end is not None
    # Row numbers, not rows: only the samples the checks judge are read.
    rows = ScanRows.of(examples, (pl.col("ts") >= window.start) & (pl.col("ts") < window.end))
    record = MonitorRecord(window, days, {"window": rows.height}, [], [])
    record.details["reference"] = {
        "rows": profile.rows,
        "created_at": profile.created_at,
        "scored_with": meta.get("scored_with", {}),
        "period": meta.get("period"),
        "unjudged": profile.unjudged,
    }
    seed = profile.seed
    results: dict[str, DriftResult] = {}
    concept: ConceptResult | None = None
    served_note = ""
    vectors: list[Verdict] = []
    if rows.height == 0:
        record.reason = "no examples in the window"
    else:
        scorer = scorer_of_reference(config, meta["scored_with"])
        current = scorer.score(rows.sample(settings.max_window_rows, [seed, 0]))
        record.rows["used"] = current.height
        results, concept = judge_window(profile, current, settings, seed)
        record.details["concept_min_change"] = concept_min_change(profile, settings)
        if settings.embeddings.enabled:
            vectors = embedding_checks(config, reference_vectors, rows, seed)
    sketches = (
        sketch_checks(config, window, reference_sketches) if settings.sketches.enabled else []
    )
    sketches += vectors
    served = served_scores(config, window.start, window.end)
    record.rows["served"] = served.height
    if served.height:
        before = served_scores(config, window.start - days * DAY, window.start)
        record.rows["served_previous"] = before.height
        if before.height:
            results["served_prediction_drift"] = prediction_drift(
                before, served, settings.drift, settings.max_window_rows, seed, SCORE
            )
        else:
            served_note = "no served rows in the previous window to compare with"
    record.checks = _checks(results, concept, sketches)
    if served_note:
        record.details["served_note"] = served_note
    findings = _findings(config, window, results, concept, sketches)
    record.findings = [f.key for f in findings]

    output = VersionedOutput(
        StoragePath.from_uri(config.paths.workdir).join("monitoring", "reports", record.key),
        keep=config.pipeline.keep_versions,
    )
    with output.writing() as staging:
        for name, result in results.items():
            result.save_html(staging.join(f"{name}.html"))
            result.save_json(staging.join(f"{name}.json"))
            staging.join(f"{name}_summary.json").write_text_atomic(
                json.dumps(result.to_dict(), indent=2, default=str)
            )
        if concept is not None:
            staging.join("concept_drift.json").write_text_atomic(
                json.dumps(concept.to_dict(), indent=2)
            )
        for group in (SKETCH_GROUP, EMBEDDING_GROUP):
            judged = [c.to_dict() for c in sketches if _group(c) == group]
            if judged:
                staging.join(f"{group}_checks.json").write_text_atomic(
                    json.dumps(judged, indent=2, default=str)
                )
        staging.join(SUMMARY_FILE).write_text_atomic(json.dumps(record.to_dict(), indent=2))
        report = output.publish(staging, {"window": record.key, "findings": record.findings})
    record.reports = report.path.uri
    workdir = StoragePath.from_uri(config.paths.workdir)
    if workdir.is_local:
        snapshots = {name: r.snapshot for name, r in results.items() if r.snapshot is not None}
        try:
            add_reports(workspace_path(workdir.local_path()), MONITOR, record.key, snapshots)
        except Exception as exc:  # the reports are published; the UI's copy is a convenience
            record.details["workspace_error"] = repr(exc)[:300]
            log.warning("monitor.workspace_failed", window=record.key, error=repr(exc)[:300])

    if findings:
        first = findings[0].key.split(":")[0]
        html = report.path.join(f"{first}.html")
        alert = Alert(
            monitor=MONITOR,
            window=window,
            findings=tuple(findings),
            report_path=(html if html.exists() else report.path.join(SUMMARY_FILE)).uri,
        )
        _deliver(config, alert, record, sender)

    record.seconds = time.perf_counter() - started
    if track:
        _track(config, record, report.path, results, concept, sketches)
    # The published version is immutable and holds the record as it was at publish
    # time; the final one (delivery, MLflow run, seconds) goes beside its pointer.
    output.root.join(LAST_RUN_FILE).write_text_atomic(json.dumps(record.to_dict(), indent=2))
    log.info(
        "monitor.done",
        window=record.key,
        rows=record.rows,
        findings=record.findings,
        seconds=round(record.seconds, 2),
    )
    return record


def _deliver(
    config: RayrecConfig, alert: Alert, record: MonitorRecord, sender: AlertSender | None
) -> None:
    alerts = config.monitoring.alerts
    if sender is None:
        if not alerts.smtp.recipients:
            # Nothing configured to fail: dead-letter with a warning (module docstring).
            alerts = alerts.model_copy(update={"on_smtp_failure": "warn"})
            record.delivery_note = "no recipients configured: findings dead-lettered"
        sender = AlertSender(alerts, config.paths.workdir)
    try:
        record.delivery = sender.send(alert)
    except AlertDeliveryError as exc:
        record.delivery_failed = True
        record.delivery_note = str(exc)
        log.error("monitor.alert_failed", window=record.key, error=str(exc)[:300])


# --------------------------------------------------------------------------- findings


def _checks(
    results: dict[str, DriftResult],
    concept: ConceptResult | None,
    sketches: list[Verdict],
) -> list[dict[str, Any]]:
    """One row per judged column or metric: check, column, test, statistic, threshold, drifted."""
    rows: list[dict[str, Any]] = []
    for sketch in sketches:
        rows.append(
            {
                "check": _group(sketch),
                "column": sketch.check,
                "test": sketch.test,
                "statistic": sketch.statistic,
                "threshold": sketch.threshold,
                "drifted": sketch.drifted,
                "judged": sketch.judged,
                "note": sketch.reason or sketch.note,
            }
        )
    for check, result in results.items():
        for column in result.columns:
            rows.append(
                {
                    "check": check,
                    "column": column.column,
                    "test": column.test.method if column.test else None,
                    "statistic": column.statistic,
                    "threshold": column.test.threshold if column.test else None,
                    "drifted": column.drifted,
                    "judged": column.judged,
                    "note": column.reason,
                }
            )
    if concept is not None:
        if not concept.judged:
            rows.append(
                {
                    "check": "concept_drift",
                    "column": "label",
                    "test": None,
                    "statistic": None,
                    "threshold": None,
                    "drifted": False,
                    "judged": False,
                    "note": concept.reason,
                }
            )
        for metric in concept.metrics:
            rows.append(
                {
                    "check": "concept_drift",
                    "column": metric.metric,
                    "test": metric.interval,
                    "statistic": metric.current,
                    "threshold": [metric.low, metric.high],
                    "drifted": metric.drifted,
                    "judged": True,
                    "note": f"reference {metric.reference:.4g}"
                    + (", worse" if metric.worse else ""),
                }
            )
    return rows


def _verdict_finding(window: Window, sketch: Verdict) -> Finding:
    d = sketch.details
    assert sketch.statistic is not None and sketch.threshold is not None
    if sketch.check == "dau":
        title = f"Daily active users moved {d['change']:+.0%} against their trend"
        reference = f"median {d['trend_median']:,.0f} over {len(d['trend_days'])} days"
        current = f"{d['current']:,.0f}"
    elif sketch.test == EMBEDDING_TEST:
        side = sketch.check.removesuffix("_embedding")
        title = f"The {side} embeddings drifted: {sketch.note}"
        healthy = (
            f"; healthy days up to {0.5 + max(sketch.baseline):.3f}" if sketch.baseline else ""
        )
        reference = f"AUC 0.5 (indistinguishable){healthy}"
        current = f"AUC {d['auc']:.3f} on {d['rows'][1]:,} window vectors"
    elif sketch.test == RECALL_TEST:
        title = f"The live index lost recall: {sketch.note}"
        built = d.get("build_recall")
        reference = f"{d['kind']} over {d['items']:,} items" + (
            f", recall {built:.3f} at build (item queries)" if built is not None else ""
        )
        current = f"recall@{d['k']} {sketch.statistic:.3f} on {d['queries']} user queries"
    else:
        title = (
            f"The popularity head changed: {len(d['new_in_head'])} new items in the top {d['k']}"
        )
        reference = "top " + ", ".join(str(i) for i in d["reference_head"][:8])
        current = "top " + ", ".join(str(i) for i in d["head"][:8])
    return Finding(
        monitor=MONITOR,
        window=window,
        key=sketch.check,
        title=title,
        features=(
            FeatureDrift(
                feature=sketch.check,
                test=sketch.test,
                statistic=sketch.statistic,
                threshold=sketch.threshold,
                reference=reference,
                current=current,
            ),
        ),
    )


def _feature_drifts(result: DriftResult) -> tuple[FeatureDrift, ...]:
    return tuple(
        FeatureDrift(
            feature=c.column,
            test=c.test.method,
            statistic=float(c.statistic),
            threshold=c.test.threshold,
            reference=c.brief("reference"),
            current=c.brief("current"),
        )
        for c in result.columns
        if c.drifted and c.test is not None and c.statistic is not None
    )


def _findings(
    config: RayrecConfig,
    window: Window,
    results: dict[str, DriftResult],
    concept: ConceptResult | None,
    sketches: list[Verdict],
) -> list[Finding]:
    """Data drift (share of drifted features at least ``drifted_share_alert``), prediction
    drift, served prediction drift, and each concept metric that drifted the harmful way
    (an improvement needs nobody's action; it stays in the summary)."""
    findings: list[Finding] = []
    data = results.get("data_drift")
    if (
        data is not None
        and data.drifted
        and data.drifted_share >= config.monitoring.drifted_share_alert
    ):
        findings.append(
            Finding(
                monitor=MONITOR,
                window=window,
                key="data_drift",
                title=f"Data drift in {len(data.drifted)} of {len(data.judged)} features",
                features=_feature_drifts(data),
            )
        )
    titles = {
        "prediction_drift": "The reranker's score distribution drifted",
        "served_prediction_drift": "Served scores drifted against the previous window",
    }
    for key, title in titles.items():
        result = results.get(key)
        if result is not None and result.drifted:
            findings.append(
                Finding(
                    monitor=MONITOR,
                    window=window,
                    key=key,
                    title=title,
                    features=_feature_drifts(result),
                )
            )
    findings += [_verdict_finding(window, c) for c in sketches if c.drifted]
    if concept is not None:
        for metric in concept.metrics:
            if metric.worse:
                findings.append(
                    Finding(
                        monitor=MONITOR,
                        window=window,
                        key=f"concept_drift:{metric.metric}",
                        severity="critical",
                        title=f"Concept drift: {metric.metric} got worse",
                        detail=metric.describe(),
                    )
                )
    return findings


# --------------------------------------------------------------------------- MLflow


def _track(
    config: RayrecConfig,
    record: MonitorRecord,
    folder: StoragePath,
    results: dict[str, DriftResult],
    concept: ConceptResult | None,
    sketches: list[Verdict],
) -> None:
    """Metrics as time series (step: days since epoch of the window end), summary, reports."""
    assert record.window.end is not None
    step = (record.window.end - EPOCH).days
    metrics: dict[str, float] = {
        "monitor_rows": float(record.rows.get("window", 0)),
        "monitor_findings": float(len(record.findings)),
    }
    for check, result in results.items():
        metrics[f"{check}_share"] = result.drifted_share
        metrics[f"{check}_columns"] = float(len(result.drifted))
        for column in result.columns:
            if column.statistic is not None:
                metrics[f"{check}.{column.column}"] = float(column.statistic)
        if check.endswith("prediction_drift"):
            mean = result.columns[0].current.get("mean")
            if mean is not None:
                metrics[f"{check}.score_mean"] = float(mean)
    if concept is not None:
        for metric in concept.metrics:
            metrics[f"concept_drift.{metric.metric}"] = metric.current
            metrics[f"concept_drift.{metric.metric}_reference"] = metric.reference
            metrics[f"concept_drift.{metric.metric}_drifted"] = float(metric.drifted)
    for sketch in sketches:
        if sketch.statistic is not None:
            metrics[f"{_group(sketch)}.{sketch.check}"] = sketch.statistic
        if sketch.check == "dau" and "current" in sketch.details:
            metrics["sketch.dau_estimate"] = float(sketch.details["current"])
    nested = mlflow.active_run() is not None
    if not nested:
        setup_mlflow(config.mlflow, StoragePath.from_uri(config.paths.workdir))
    tags = {"rayrec.monitor": MONITOR, "rayrec.window": record.key}
    with mlflow.start_run(run_name=f"monitor-{record.key}", nested=nested, tags=tags) as run:
        record.mlflow_run_id = run.info.run_id
        mlflow.log_params({"window_start": record.window.start, "window_days": record.window_days})
        mlflow.log_metrics(metrics, step=step)
        mlflow.log_dict(record.to_dict(), "monitoring/summary.json")
        for file in folder.files():
            if file.is_local:
                mlflow.log_artifact(file.path, "monitoring/reports")


def held_out_rows(
    examples: pl.LazyFrame, split: str, ratios: Sequence[float], seed: int
) -> pl.Expr:
    """The filter of the reranker's held-out part (valid + test) of the ``features``
    examples, as ``train_ranker`` split them (:mod:`pipelines.ranker.encoded`), over a
    scan with row numbers (:data:`~monitoring.columns.ROW`, :class:`ScanRows`).

    ``temporal``: ``ts`` from the valid cut on (:func:`~pipelines.ranker.encoded.temporal_cuts`,
    a streaming pass: the cuts ``split_examples`` makes). ``random``: the seeded hash of
    the row's number in the table against the first ratio, the rows
    ``pipelines.ranker.encoded._part_of_rows`` puts in valid or test (a test pins the two
    together). A filter, not rows: the held-out part is a fifth of the log.
    """
    if split == "random":
        uniform = pl.col(ROW).cast(pl.UInt64).hash(seed).cast(pl.Float64) / float(2**64)
        return uniform >= float(np.cumsum(ratios)[0])
    valid_cut, _ = temporal_cuts(examples.select("ts"), ratios)
    return pl.lit(False) if valid_cut is None else pl.col("ts") >= valid_cut


@dataclass(frozen=True)
class Period:
    """A reference period: its first midnight, the last ``ts`` of its rows, and the log's
    age in days at its start."""

    start: dt.datetime
    end: dt.datetime
    log_age_days: float


def reference_period(
    frame: pl.LazyFrame, log_start: dt.datetime, days: int | None
) -> Period | None:
    """The reference period of ``frame``'s rows: their last ``days`` UTC days (all of them
    when None or when they span fewer; a partial first day left out), and the log's age
    in days where it starts (from the UTC midnight of ``log_start``, the log's first
    row): what says which windowed counts had filled up
    (:func:`monitoring.columns.judged_columns`). None when ``frame`` has no rows.

    One streaming aggregate (first and last ``ts``): the rows stay on storage.
    """
    earliest, latest = (
        frame.select(pl.col("ts").min().alias("first"), pl.col("ts").max().alias("last"))
        .collect(engine="streaming")
        .row(0)
    )
    if earliest is None:
        return None
    first = _midnight(earliest)
    if _utc(earliest) > first and _utc(latest) >= first + DAY:
        # A split cuts at a row, not at midnight: a partial first day has another
        # mix of hours and smaller daily counts, so it starts at the next midnight.
        first += DAY
    start = first
    if days is not None:
        start = max(first, _midnight(latest) - (days - 1) * DAY)
    return Period(start, _utc(latest), (start - _midnight(log_start)) / DAY)


def log_start(examples: pl.LazyFrame) -> dt.datetime:
    """The first ``ts`` of the examples (a streaming aggregate)."""
    first: dt.datetime = examples.select(pl.col("ts").min()).collect(engine="streaming").item()
    return first


def _midnight(value: dt.datetime) -> dt.datetime:
    value = _utc(value)
    return dt.datetime.combine(value.date(), dt.time(), tzinfo=dt.UTC)


def reference_from_examples(
    reference: ScanRows,
    scorer: Scorer,
    rows: int,
    seed: int,
    *,
    period: Period | None = None,
    window_days: int = 1,
    drift: DriftTestConfig | None = None,
    history: pl.LazyFrame | None = None,
    reference_days: int | None = None,
) -> ReferenceProfile:
    """The profile of ``rows`` rows drawn from ``reference`` (the reranker's held-out part
    in its reference ``period``: :func:`reference_period`; None for a table without
    time), with its day-to-day noise per column when ``drift`` is given and the rows
    have time.

    The noise is measured on ``history`` when given (the examples; their days up to
    the end of the reference, the last ``reference_days`` from the first where every
    judged windowed count had filled up: :func:`noise_days`), a sample of
    ``drift.noise_rows`` rows a day scored by the same models: more days than the
    held-out part has give a steadier maximum, and a model scores its training days
    with the same bias each day, so their differences are still the days' own. Else on
    the sampled reference rows. Only sampled rows are read.
    """
    scored = scorer.score(reference.sample(rows, seed))
    log_age_days = None if period is None else period.log_age_days
    profile = ReferenceProfile.build(
        scored, scorer.spec, rows, seed, log_age_days=log_age_days, window_days=window_days
    )
    noise: dict[str, float] = {}
    if drift is not None and "ts" in scored.columns:
        days = scored
        if history is not None and period is not None:
            warm = noise_days(
                history, profile, scorer.spec, period.end, reference_days, drift, seed
            )
            if warm is not None:
                days = scorer.score(warm)
        noise = day_noise(
            days, days.get_column("ts"), profile.columns, drift, drift.noise_rows, seed
        )
        if profile.labels:
            # On the held-out rows' own days (see concept_day_noise), not the history's.
            noise.update(
                concept_day_noise(scored, scored.get_column("ts"), profile.labels[0], SCORE)
            )
    return replace(profile, source_rows=reference.height, noise=noise)


def noise_days(
    history: pl.LazyFrame,
    profile: ReferenceProfile,
    spec: FeatureSpec,
    end: dt.datetime,
    days: int | None,
    drift: DriftTestConfig,
    seed: int,
) -> pl.DataFrame | None:
    """The rows the day-to-day noise is measured on: ``drift.noise_rows`` a day (seeded) of
    ``history`` from the first day where every judged windowed count had filled up
    to ``end`` (the reference rows' last ``ts``), its last ``days`` days. None with
    fewer than 3 such days or no judged feature (the reference rows' own days then).

    Streaming aggregates and a read of the sampled rows: never the days themselves.
    """
    if not profile.features:
        return None
    first = _midnight(log_start(history))
    warmup = max((spec[name].warmup_days or 0) for name in profile.features)
    ts = pl.col("ts")
    warm = (ts >= first + warmup * DAY) & (ts <= end)
    found = reference_period(history.filter(warm), first, days)
    if found is None:
        return None
    warm = warm & (ts >= found.start)
    count = history.filter(warm).select(ts.dt.date().n_unique()).collect(engine="streaming").item()
    if count < 3:
        return None
    return ScanRows.of(history, warm).sample(drift.noise_rows * count, seed)
