"""Monitoring on the tiny pipeline's own data: the reference step, monitor runs, alerts, MLflow.

Builds on the session's ``tiny_default_style_run`` (copied: these tests write
into the workdir). The tiny world has no drift event; its reference is its
held-out part (the last day), so the default window (the newest day) is the
reference's own day: no drift and, with recipients configured, no e-mail.
Features that move with time by construction (``*_total``, ids, ``weekday``,
counts whose window the 5-day log has not filled) are not judged, with reasons.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from infra.config import RayrecConfig, load_config
from monitoring.embeddings import EmbeddingReference
from monitoring.reference import ReferenceProfile
from pipelines.cli import main
from pipelines.main import MAIN
from pipelines.monitor import (
    EPOCH,
    LAST_RUN_FILE,
    PROFILE_FOLDER,
    REFERENCE_META,
    SUMMARY_FILE,
    run_monitoring,
)
from pipelines.runner import published, run_pipeline

STATIONARY = ("item_price", "item_quality", "item_category", "user_device")
SHIFTED = "item_price"
# ANN checks ask for 20 of the 200 items (the default 200 candidates is the whole catalogue).
SMALL_K = ("serving.candidates=20", "serving.max_k=20")


def _config(workdir: Path, *sets: str) -> RayrecConfig:
    return load_config(
        "tiny",
        [
            f"paths.workdir={workdir}",
            "models.split.kind=temporal",
            "models.ranker.retrieval_score=true",
            *sets,
        ],
        environ={},
    )


@pytest.fixture(scope="module")
def prepared(
    tiny_default_style_run: RayrecConfig, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A copy of the session's tiny workdir with the reference profile published."""
    workdir = tmp_path_factory.mktemp("monitoring") / "wd"
    shutil.copytree(tiny_default_style_run.paths.workdir, workdir)
    run_pipeline(MAIN, _config(workdir), until="reference_profile", track=False)
    return workdir


@pytest.fixture()
def workdir(prepared: Path, tmp_path: Path) -> Path:
    target = tmp_path / "wd"
    shutil.copytree(prepared, target)
    return target


@pytest.fixture()
def smtp(smtp_server: Callable[..., Any]) -> tuple[int, Any]:
    """A real aiosmtpd server (tests/conftest.py): its port and inbox."""
    server = smtp_server()
    return server.port, server.inbox


def _alert_sets(port: int) -> list[str]:
    return [
        "monitoring.alerts.smtp.host=127.0.0.1",
        f"monitoring.alerts.smtp.port={port}",
        "monitoring.alerts.smtp.recipients=[oncall@example.com]",
        "monitoring.alerts.smtp.sender=rayrec@example.com",
        "monitoring.alerts.attempts=1",
        "monitoring.alerts.backoff_s=0",
    ]


def _shift_last_day(config: RayrecConfig, column: str, factor: float) -> dt.date:
    """Multiply ``column`` of the newest day's examples by ``factor``, in place."""
    examples = published(config, "features").path.local_path() / "examples"
    newest = sorted(examples.glob("date=*"))[-1]
    for part in newest.glob("*.parquet"):
        frame = pl.read_parquet(part)
        frame.with_columns(pl.col(column) * factor).write_parquet(part)
    return dt.date.fromisoformat(newest.name.removeprefix("date="))


def _keep_last_day_categories(config: RayrecConfig, keep: int) -> dt.date:
    """Keep only the newest day's example rows of its ``keep`` smallest item categories,
    in place: the catalogue shown narrowed (a broken candidate filter)."""
    examples = published(config, "features").path.local_path() / "examples"
    newest = sorted(examples.glob("date=*"))[-1]
    parts = list(newest.glob("*.parquet"))
    categories = sorted(pl.concat([pl.read_parquet(p) for p in parts])["item_category"].unique())
    for part in parts:
        frame = pl.read_parquet(part)
        frame.filter(pl.col("item_category").is_in(categories[:keep])).write_parquet(part)
    return dt.date.fromisoformat(newest.name.removeprefix("date="))


def test_reference_profile_has_the_spec_columns_score_and_label(prepared: Path) -> None:
    config = _config(prepared)
    current = published(config, "reference_profile")
    assert current is not None
    profile = ReferenceProfile.load(current.path.join(PROFILE_FOLDER))
    meta = json.loads(current.path.join(REFERENCE_META).read_text())
    spec = json.loads(
        (
            published(config, "train_ranker").path.local_path() / "model" / "feature_spec.json"
        ).read_text()
    )
    monitored = [f["name"] for f in spec["features"] if f["kind"] in ("numeric", "categorical")]
    judged = [name for name in monitored if name in profile.features]
    assert list(profile.features) == judged
    assert set(judged) | set(profile.unjudged) == set(monitored)
    # Ids, lifetime counters, the calendar and 7-day counts of a 4-day-old log are left out.
    for name in ("user_id", "item_id", "user_events_total", "weekday", "item_clicks_7d"):
        assert name in profile.unjudged, name
    assert "item_clicks_1d" in profile.features and "retrieval_score" in profile.features
    assert profile.predictions == ("score",)
    assert profile.labels[0] == "label"
    assert profile.frame.columns == [*judged, "score", *profile.labels]
    scores = profile.frame.get_column("score")
    assert scores.null_count() == 0 and 0.0 <= scores.min() <= scores.max() <= 1.0
    # Drawn from the reranker's held-out part (valid + test: the last 20% by time),
    # from its first whole day.
    assert profile.rows == min(config.monitoring.reference_rows, meta["held_out_rows"])
    assert meta["held_out_rows"] == profile.source_rows
    assert 0.1 < meta["held_out_rows"] / 10_000 <= 0.2
    assert set(meta["scored_with"]) >= {"train_ranker", "train_retrieval"}
    start = dt.datetime.fromisoformat(meta["period"]["start"])
    assert start.date() == dt.date(2026, 1, 5) and meta["log_age_days"] == 4.0
    # Its day's sketches are the popularity head's baseline.
    assert meta["sketch_days"] == 1
    # The two-tower's user and item vectors of the reference rows, by the version
    # that scored them, with the day-to-day noise of the warm history days.
    vectors = EmbeddingReference.load(current.path.join(PROFILE_FOLDER))
    assert vectors is not None
    # Items as shown (one per row), users once per request (a slate of 5).
    assert vectors.rows["item"] == min(config.monitoring.embeddings.rows, meta["held_out_rows"])
    assert vectors.rows["user"] == vectors.rows["item"] // config.simulator.slate_size
    assert vectors.dim == config.models.retrieval.embedding_dim
    assert vectors.model == {"train_retrieval": meta["scored_with"]["train_retrieval"]}
    assert meta["embeddings"]["rows"] == vectors.rows
    assert set(vectors.noise) == {"user", "item"}
    assert all(0.0 <= n < 0.5 for n in vectors.noise.values() if n is not None)
    norms = np.linalg.norm(vectors.vectors["user"], axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4)


def test_clean_window_writes_reports_and_summary_and_sends_no_email(
    workdir: Path, smtp: tuple[int, Any]
) -> None:
    port, inbox = smtp
    config = _config(workdir, *_alert_sets(port))
    record = run_monitoring(config, track=False)
    # No drift -> no finding, no e-mail.
    assert record.findings == [] and record.delivery is None
    assert len(inbox.envelopes) == 0
    assert record.window.end is not None and record.window.end.hour == 0
    assert record.window.end - record.window.start == dt.timedelta(days=1)
    assert record.rows["window"] > 1000
    folder = Path(record.reports)
    for name in (
        SUMMARY_FILE,
        "data_drift.html",
        "data_drift.json",
        "prediction_drift.html",
        "prediction_drift.json",
        "concept_drift.json",
    ):
        assert (folder / name).stat().st_size > 0, name
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    assert summary["window"]["key"] == record.key
    checks = {(c["check"], c["column"]): c for c in summary["checks"]}
    profile_features = json.loads(
        (published(config, "reference_profile").path.local_path() / REFERENCE_META).read_text()
    )["features"]
    assert {c for k, c in checks if k == "data_drift"} == set(profile_features)
    for column in STATIONARY:
        assert not checks[("data_drift", column)]["drifted"], checks[("data_drift", column)]
    assert ("prediction_drift", "score") in checks
    concept = [c for (k, _), c in checks.items() if k == "concept_drift"]
    assert {c["column"] for c in concept} == {"auc", "logloss", "ece"}
    assert not any(c["drifted"] for c in concept)
    sketches = {c["column"]: c for c in summary["checks"] if c["check"] == "sketch"}
    assert set(sketches) == {"dau", "popularity_head"}
    assert sketches["dau"]["judged"] and not sketches["dau"]["drifted"]
    assert (folder / "sketch_checks.json").exists()
    # The window is the reference's own day: its vectors are indistinguishable; the
    # tiny catalogue's index is exact search, its own oracle.
    vectors = {c["column"]: c for c in summary["checks"] if c["check"] == "embedding"}
    assert set(vectors) == {"user_embedding", "item_embedding", "ann_recall"}
    for side in ("user_embedding", "item_embedding"):
        assert vectors[side]["judged"] and not vectors[side]["drifted"], vectors[side]
        assert vectors[side]["statistic"] < vectors[side]["threshold"]
    assert not vectors["ann_recall"]["judged"] and "exact" in vectors["ann_recall"]["note"]
    assert (folder / "embedding_checks.json").exists()
    # Each day's sketches are built once: the window's day and its trend days.
    cached = sorted((workdir / "monitoring" / "sketch_cache").glob("*.parquet"))
    assert [p.stem for p in cached] == [f"2026-01-0{d}" for d in range(1, 6)]
    assert not record.delivery_failed
    assert (folder.parent / LAST_RUN_FILE).exists()


def test_shifted_feature_alerts_once_and_lands_in_mlflow(
    workdir: Path, smtp: tuple[int, Any], tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    port, inbox = smtp
    # The clean window first, without recipients (its warm-up findings dead-letter).
    clean = run_monitoring(_config(workdir), track=False)
    assert not any(c["drifted"] for c in clean.checks if c["column"] == SHIFTED)

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = _config(workdir, *_alert_sets(port), f"mlflow.tracking_uri={tracking}")
    day = _shift_last_day(config, SHIFTED, 3.0)
    record = run_monitoring(config, window_end=day + dt.timedelta(days=1), track=True)
    assert record.key == clean.key
    drifted = {c["column"] for c in record.checks if c["check"] == "data_drift" and c["drifted"]}
    assert SHIFTED in drifted
    assert "data_drift" in record.findings
    assert record.delivery is not None and not record.delivery_failed
    assert "data_drift" in record.delivery.sent
    assert len(inbox.envelopes) == 1
    message = inbox.messages[0]
    body = message.get_body(("plain",)).get_content()
    assert SHIFTED in body and "wasserstein" in body
    assert "reranker" in message["Subject"]
    assert message["To"] == "oncall@example.com"

    rerun = run_monitoring(config, window_end=day + dt.timedelta(days=1), track=True)
    assert rerun.delivery is not None and not rerun.delivery.sent
    assert set(rerun.delivery.suppressed_duplicate) == set(rerun.findings)
    assert len(inbox.envelopes) == 1

    client = MlflowClient(tracking)
    history = client.get_metric_history(record.mlflow_run_id, f"data_drift.{SHIFTED}")
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    assert [m.step for m in history] == [(end - EPOCH).days]
    assert history[0].value > config.monitoring.drift.distance_threshold
    run = client.get_run(record.mlflow_run_id)
    assert run.data.metrics["monitor_findings"] == len(record.findings)
    artifacts = {a.path for a in client.list_artifacts(record.mlflow_run_id, "monitoring")}
    assert "monitoring/summary.json" in artifacts
    reports = {a.path for a in client.list_artifacts(record.mlflow_run_id, "monitoring/reports")}
    assert "monitoring/reports/data_drift.html" in reports


def test_cli_monitor_run_prints_the_table_and_fails_only_on_failed_delivery(
    workdir: Path, capsys: pytest.CaptureFixture[str], free_port: Callable[[], int]
) -> None:
    base = [
        "-p",
        "tiny",
        "--set",
        f"paths.workdir={workdir}",
        "--set",
        "models.split.kind=temporal",
        "--set",
        "models.ranker.retrieval_score=true",
    ]
    code = main(["monitor", "run", *base, "--window-days", "1", "--no-track"])
    printed = capsys.readouterr().out
    assert code == 0
    for word in ("check", "column", "statistic", "threshold", "drifted", "item_price", "score"):
        assert word in printed

    # A drifted window, SMTP down with recipients and on_smtp_failure=fail: dead
    # letter and a non-zero exit.
    _shift_last_day(_config(workdir), SHIFTED, 3.0)
    down = [*_alert_sets(free_port()), "monitoring.alerts.smtp.timeout_s=2"]
    sets = [item for pair in (("--set", s) for s in down) for item in pair]
    code = main(["monitor", "run", *base, *sets, "--window-end", "2026-01-06", "--no-track"])
    assert code != 0
    assert (workdir / "monitoring" / "dead_letter.jsonl").exists()


def test_served_scores_are_judged_against_the_previous_window(workdir: Path) -> None:
    from features.event_log import EventLog
    from features.schemas import PREDICTIONS

    config = _config(workdir)
    log = EventLog(workdir / "prediction_log", PREDICTIONS)
    rng = np.random.default_rng(0)

    def answers(day: dt.date, mean: float, n: int = 3000) -> pl.DataFrame:
        start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
        return pl.DataFrame(
            {
                "request_id": np.arange(n, dtype=np.int64) + day.toordinal() * n,
                "ts": [start + dt.timedelta(seconds=int(s)) for s in rng.integers(0, 86_400, n)],
                "user_id": rng.integers(0, 100, n),
                "item_id": rng.integers(0, 100, n),
                "position": pl.Series(np.arange(n) % 10, dtype=pl.Int32),
                "score": np.clip(rng.normal(mean, 0.05, n), 0, 1),
                "retrieval_score": rng.normal(0, 1, n),
                "propensity": np.ones(n),
                "fallback": np.zeros(n, dtype=bool),
                "reranked": np.ones(n, dtype=bool),
                "generation": np.ones(n, dtype=np.int64),
                "reranker_version": ["v1"] * n,
                "two_tower_version": ["v1"] * n,
            },
            schema_overrides={"ts": pl.Datetime("us", "UTC")},
        )

    log.append(answers(dt.date(2026, 1, 4), 0.2))
    log.append(answers(dt.date(2026, 1, 5), 0.4))
    record = run_monitoring(config, window_end=dt.date(2026, 1, 6), track=False)
    assert record.rows["served"] == 3000 and record.rows["served_previous"] == 3000
    served = [c for c in record.checks if c["check"] == "served_prediction_drift"]
    assert [c["column"] for c in served] == ["score"] and served[0]["drifted"]
    assert "served_prediction_drift" in record.findings
    assert (Path(record.reports) / "served_prediction_drift.html").exists()

    # The window before has no earlier window in the log: served rows are counted, not judged.
    record = run_monitoring(config, window_end=dt.date(2026, 1, 5), track=False)
    assert record.rows["served"] == 3000 and record.rows["served_previous"] == 0
    assert not any(c["check"] == "served_prediction_drift" for c in record.checks)
    assert "served_note" in record.to_dict()


def test_monitor_ui_serves_the_workspace_of_monitor_runs(
    workdir: Path, free_port: Callable[[], int]
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    record = run_monitoring(_config(workdir), track=False)
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "rayrec"), "monitor", "ui", "-p", "tiny",
        "--set", f"paths.workdir={workdir}", "--port", str(port),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 90
        projects = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/projects", timeout=2
                ) as r:
                    projects = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)
        assert projects is not None, "the UI did not answer"
        project = next(p for p in projects if p["name"] == "rayrec reranker")
        url = f"http://127.0.0.1:{port}/api/projects/{project['id']}/snapshots"
        with urllib.request.urlopen(url, timeout=5) as r:
            names = {s["metadata"].get("name") or s.get("name") for s in json.loads(r.read())}
        assert f"data_drift {record.key}" in str(names)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_a_narrowed_catalogue_drifts_the_item_embeddings_and_names_them_in_the_email(
    workdir: Path, smtp: tuple[int, Any]
) -> None:
    port, inbox = smtp
    config = _config(workdir, *_alert_sets(port))
    day = _keep_last_day_categories(config, keep=2)
    record = run_monitoring(config, window_end=day + dt.timedelta(days=1), track=False)
    vectors = {c["column"]: c for c in record.checks if c["check"] == "embedding"}
    item = vectors["item_embedding"]
    assert item["judged"] and item["drifted"] and item["statistic"] > 2 * item["threshold"], item
    assert "item_embedding" in record.findings
    assert len(inbox.envelopes) == 1
    body = inbox.messages[0].get_body(("plain",)).get_content()
    assert "item_embedding" in body and "classifier_auc" in body


def test_ann_recall_is_judged_on_the_live_index_and_alerts_when_it_degrades(
    workdir: Path, smtp: tuple[int, Any]
) -> None:
    port, inbox = smtp
    # HNSW over 200 items: the window's users find what exact search finds.
    healthy = _config(workdir, *_alert_sets(port), "models.index.kind=hnsw", *SMALL_K)
    run_pipeline(MAIN, healthy, until="index", track=False)
    record = run_monitoring(healthy, track=False)
    ann = next(c for c in record.checks if c["column"] == "ann_recall")
    assert ann["judged"] and not ann["drifted"] and ann["statistic"] >= 0.95, ann
    assert ann["threshold"] == healthy.monitoring.embeddings.ann_min_recall
    assert "ann_recall" not in record.findings

    # IVF probing 1 of 5 lists misses a good part of the exact top 20 (0.65 here).
    broken = _config(
        workdir,
        *_alert_sets(port),
        "models.index.kind=ivf",
        "models.index.ivf_nlist=5",
        "models.index.ivf_nprobe=1",
        "models.index.refine_factor=1",
        *SMALL_K,
    )
    run_pipeline(MAIN, broken, until="index", track=False)
    record = run_monitoring(broken, track=False)
    ann = next(c for c in record.checks if c["column"] == "ann_recall")
    assert ann["judged"] and ann["drifted"] and ann["statistic"] < 0.8, ann
    summary = json.loads((Path(record.reports) / "embedding_checks.json").read_text())
    detail = next(c for c in summary if c["check"] == "ann_recall")
    assert detail["kind"] == "ivf" and detail["k"] == 20 and detail["items"] == 200
    assert "ann_recall" in record.findings
    body = inbox.messages[-1].get_body(("plain",)).get_content()
    assert "ann_recall" in body and "recall_vs_exact" in body
