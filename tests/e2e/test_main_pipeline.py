"""The main job end to end on the tiny preset, through the CLI, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from infra.config import load_config
from pipelines.cli import main
from pipelines.runner import list_runs, published


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "wd"


def test_tiny_run_publishes_every_step_tracks_it_and_skips_on_rerun(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", "--preset", "tiny", "--set", f"paths.workdir={workdir}"]
    assert main(args) == 0
    config = load_config("tiny", [f"paths.workdir={workdir}"], environ={})
    for step in ("ingest", "validate", "summarize", "features"):
        assert published(config, step) is not None, step

    validated = published(config, "validate")
    assert validated is not None
    assert validated.manifest["row_counts"]["events_quarantined"] == 0
    events = pl.scan_parquet(
        str(validated.path.join("events").local_path() / "**/*.parquet")
    ).collect()
    assert events.height == validated.manifest["row_counts"]["events"]

    summary = json.loads(published(config, "summarize").path.join("summary.json").read_text())  # type: ignore[union-attr]
    assert summary["days"] == config.simulator.n_days
    ctr = [summary["ctr_by_position"][str(p)] for p in range(config.simulator.slate_size)]
    assert ctr[0] > ctr[-1]  # position bias shows in the data

    client = MlflowClient(f"sqlite:///{workdir}/mlflow/mlflow.db")
    run_id = list_runs(config)[0]["mlflow_run_id"]
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'"
    )
    # The parent's final summary: headline quality, every step's time, links.
    final = json.loads(
        Path(client.download_artifacts(run_id, "summary.json", str(workdir / "dl"))).read_text()
    )
    assert final["status"] == "succeeded" and final["run"] == list_runs(config)[0]["run_id"]
    assert [s["step"] for s in final["steps"]] == [c["name"] for c in list_runs(config)[0]["steps"]]
    quality = {q["key"]: q["value"] for q in final["quality"]}
    assert {"retrieval_recall_at_10", "ranker_test_auc", "two_stage_reranked_ndcg_at_10"} <= set(
        quality
    )
    assert quality["ranker_test_auc"] == parent.data.metrics["ranker_test_auc"]
    assert run_id in final["links"]["mlflow_run"]
    assert 0 < final["total_s"] == parent.data.metrics["total_s"]
    assert (
        "## Quality"
        in Path(client.download_artifacts(run_id, "summary.md", str(workdir / "dl"))).read_text()
    )
    summarize_run = next(c for c in children if c.info.run_name == "summarize")
    assert summarize_run.data.metrics["events"] == summary["events"]
    assert {a.path for a in client.list_artifacts(summarize_run.info.run_id)} >= {
        "summary.json",
        "dataset_summary.png",
    }

    # Retrieval: trained, indexed, registered as champion (the first model), loadable by alias.
    registered = json.loads(
        published(config, "register_retrieval").path.join("registered.json").read_text()  # type: ignore[union-attr]
    )
    assert registered["promoted"] and registered["reason"] == "no champion yet"
    champion = client.get_model_version_by_alias(
        config.models.retrieval.registered_model, "champion"
    )
    assert str(champion.version) == registered["version"]
    index = json.loads(published(config, "index").path.join("index.json").read_text())  # type: ignore[union-attr]
    assert index["count"] == config.simulator.world_size.n_items

    # Reranker: trained on the feature spec's examples, better than chance, registered,
    # and its pyfunc scores raw example rows as the step's own test metrics did.
    ranker = json.loads(published(config, "train_ranker").path.join("ranker.json").read_text())  # type: ignore[union-attr]
    assert ranker["split"] == "temporal"
    assert ranker["test"]["auc"] > 0.6 and ranker["logistic_test"]["auc"] > 0.5
    # The simulator rates some clicks: the rating head trains on them. Tiny has a few
    # dozen rated test rows, too few to beat the mean reliably (unit tests check learning).
    rating = ranker["second_task"]
    assert rating["task"]["name"] == "rating", rating["note"]
    assert rating["test"]["n"] > 0
    assert 0 < rating["test"]["rmse"] < 1.2 * rating["test"]["baseline_rmse"]
    ranker_registered = json.loads(
        published(config, "register_ranker").path.join("registered.json").read_text()  # type: ignore[union-attr]
    )
    assert ranker_registered["promoted"]
    import mlflow.pyfunc

    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow/mlflow.db")
    scorer = mlflow.pyfunc.load_model(f"models:/{config.models.ranker.registered_model}@champion")
    examples = pl.scan_parquet(
        str(published(config, "features").path.join("examples").local_path() / "**/*.parquet")  # type: ignore[union-attr]
    ).collect()
    scored = scorer.predict(examples.drop("label").head(50).to_pandas())
    assert len(scored) == 50 and scored["probability"].between(0, 1).all()
    assert scored["rating"].between(0, 6).all()

    # Serving reads both champions from the registry (serving.models_from: champion).
    from pipelines.serving_sources import champion_sources
    from serving.bundle import ModelBundle

    sources = champion_sources(config)
    ranker_name = config.models.ranker.registered_model
    assert sources.versions["reranker"] == f"{ranker_name}/v{ranker_registered['version']}"
    bundle = ModelBundle.load(sources)
    assert len(bundle.index) == bundle.two_tower.config.n_items
    assert champion_sources(config) == sources  # downloaded once per version

    capsys.readouterr()
    assert main(args) == 0
    assert {s["status"] for s in list_runs(config)[0]["steps"]} == {"skipped"}
    # A run that skipped everything still summarises the published steps' quality.
    rerun = list_runs(config)[0]["run_id"]
    again = json.loads((workdir / "runs" / "summaries" / f"{rerun}.json").read_text())
    assert {q["key"] for q in again["quality"]} == set(quality) and again["total_s"] == 0

    capsys.readouterr()
    assert main(["evaluate", "retrieval", *args[1:]]) == 0
    printed = capsys.readouterr().out
    assert "recall@10" in printed and "popularity" in printed

    assert main(["evaluate", "ranker", *args[1:]]) == 0
    printed = capsys.readouterr().out
    assert "gauc" in printed and "logistic regression" in printed

    # Fine-tuning ran in the DAG (tuning is off in tiny); the CLI reports it for another window.
    tuning = json.loads(published(config, "tune_ranker").path.join("tuning.json").read_text())  # type: ignore[union-attr]
    assert tuning == {"skipped": "tuning off"}
    finetuned = json.loads(
        published(config, "finetune_ranker").path.join("finetune.json").read_text()
    )  # type: ignore[union-attr]
    assert 0 < finetuned["trainable_parameters"] < finetuned["total_parameters"]
    assert finetuned["rows"]["tune"] > 0 and finetuned["rows"]["holdout"] > 0
    assert main(["finetune", "ranker", "--window", "2", *args[1:]]) == 0
    printed = capsys.readouterr().out
    assert "window 2 day(s): AUC" in printed

    # Two-stage evaluation ran last, judged against the simulator's truth, logged to MLflow.
    two_stage = json.loads(
        published(config, "evaluate_two_stage").path.join("two_stage.json").read_text()  # type: ignore[union-attr]
    )
    assert "skipped" not in two_stage, two_stage
    assert two_stage["ground_truth"] and two_stage["n_requests"] > 0
    assert 0 <= two_stage["reranked_ndcg@10"] <= 1 and 0 <= two_stage["oracle_ndcg@10"] <= 1
    two_stage_run = next(c for c in children if c.info.run_name == "evaluate_two_stage")
    assert two_stage_run.data.metrics["two_stage_reranked_ndcg_at_10"] == pytest.approx(
        two_stage["reranked_ndcg@10"]
    )
    assert main(["evaluate", "two-stage", *args[1:]]) == 0
    assert "candidate_recall@100" in capsys.readouterr().out

    # Monitoring ran last: a reference profile beside the reranker, the newest day judged
    # against it, reports on disk, a nested MLflow run with the drift metrics.
    reference = published(config, "reference_profile")
    assert reference is not None and reference.manifest["row_counts"]["reference"] > 0
    monitored = json.loads(published(config, "monitor").path.join("summary.json").read_text())  # type: ignore[union-attr]
    assert monitored["rows"]["window"] > 0
    assert (Path(monitored["reports"]) / "data_drift.html").exists()
    monitor_run = next(c for c in children if c.info.run_name.startswith("monitor-"))
    assert "prediction_drift.score" in monitor_run.data.metrics


def test_bad_rows_are_quarantined_and_the_step_fails_above_the_bound(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--preset", "tiny", "--set", f"paths.workdir={workdir}"]
    assert main(["run", *base, "--until", "ingest"]) == 0
    config = load_config("tiny", [f"paths.workdir={workdir}"], environ={})
    ingested = published(config, "ingest")
    assert ingested is not None
    # Corrupt the raw events in place, as a broken upstream export would.
    first_file = sorted(ingested.path.join("events").local_path().rglob("*.parquet"))[0]
    frame = pl.read_parquet(first_file)
    n_bad = frame.height // 2
    corrupted = frame.with_columns(
        pl.when(pl.int_range(pl.len()) < n_bad)
        .then(None)
        .otherwise(pl.col("user_id"))
        .alias("user_id")
    )
    corrupted.write_parquet(first_file)

    # validate has never run here, so it runs now (--force would also regenerate ingest).
    assert main(["run", *base, "--until", "validate"]) == 2
    err = capsys.readouterr().err
    assert f"events: {n_bad:,} of" in err and "worst: user_id: null in a required column" in err
    assert published(config, "validate") is None  # nothing published
    quarantine = next((workdir / "quarantine").rglob("events.parquet"))
    bad = pl.read_parquet(quarantine)
    assert bad.height == n_bad
    assert set(bad["_reason"]) == {"user_id: null in a required column"}

    # Raising the bound lets the same data through, without the bad rows.
    assert (
        main(["run", *base, "--until", "validate", "--set", "data.validation.max_bad_fraction=0.5"])
        == 0
    )
    validated = published(
        load_config(
            "tiny", [f"paths.workdir={workdir}", "data.validation.max_bad_fraction=0.5"], environ={}
        ),
        "validate",
    )
    assert validated is not None
    assert validated.manifest["row_counts"]["events_quarantined"] == n_bad


def test_features_step_publishes_the_offline_store(workdir: Path) -> None:
    run = ["run", "--preset", "tiny", "--set", f"paths.workdir={workdir}", "--no-track"]
    assert main([*run, "--until", "materialize"]) == 0
    config = load_config("tiny", [f"paths.workdir={workdir}"], environ={})
    features = published(config, "features")
    assert features is not None
    root = features.path.local_path()
    examples = pl.read_parquet(root / "examples" / "**" / "*.parquet")
    spec = json.loads((root / "feature_spec.json").read_text())
    assert examples.height == features.manifest["row_counts"]["examples"]
    # Every feature in the spec is a column of the frame, and the label is there.
    assert {f["name"] for f in spec["features"]} <= set(examples.columns)
    assert "label" in examples.columns
    # Impressions are the examples of a click log; partitions follow the day of each row.
    impressions = pl.read_parquet(
        published(config, "validate").path.local_path() / "events" / "**" / "*.parquet"
    )  # type: ignore[union-attr]
    assert examples.height == impressions.filter(pl.col("event_type") == "impression").height
    latest = pl.read_parquet(root / "latest" / "user.parquet")
    assert latest.get_column("clicks_total").sum() == examples.get_column("label").sum()


def test_materialize_serves_the_batch_values_from_the_online_store(workdir: Path) -> None:
    from features.online_store import make_online_store

    run = ["run", "--preset", "tiny", "--set", f"paths.workdir={workdir}", "--no-track"]
    assert main([*run, "--until", "materialize"]) == 0
    config = load_config("tiny", [f"paths.workdir={workdir}"], environ={})
    latest = published(config, "features").path.join("latest")  # type: ignore[union-attr]
    users = pl.read_parquet(latest.join("user.parquet").local_path())
    history = pl.read_parquet(latest.join("history.parquet").local_path())
    store = make_online_store(config.features, workdir)
    try:
        busiest = users.sort("events_total", descending=True).row(0, named=True)
        read = store.read_user(busiest["user_id"])
        assert read.found and not read.degraded
        for name in ("events_7d", "clicks_total", "impressions_total", "ctr_smoothed"):
            assert read.values[name] == busiest[name], name
        expected_history = history.filter(pl.col("user_id") == busiest["user_id"]).get_column(
            "history"
        )[0]
        assert store.read_history(busiest["user_id"]) == expected_history.to_list()
        unknown = store.read_user(10**9)
        assert not unknown.found and unknown.values["clicks_total"] == 0
    finally:
        store.close()
