"""The evaluate_two_stage step on the tiny preset: both orders judged, the truth, the skips."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from features.aggregates import CtrPrior
from features.dataset import read_events, read_table
from features.training_frame import build_training_frame
from infra.config import RayrecConfig, load_config
from infra.publish import Published
from infra.storage import StoragePath
from models.artifacts import load_two_tower
from models.index import load_index
from pipelines.main import MAIN
from pipelines.ranker.retrieval_feature import retrieval_scores
from pipelines.ranker.two_stage import candidate_frame, retrieve
from pipelines.runner import published, run_pipeline
from pipelines.step import StepContext
from pipelines.steps import two_stage
from pipelines.steps.retrieval import positives
from pipelines.steps.two_stage import (
    EVALUATE_TWO_STAGE,
    MIN_REQUESTS,
    K,
    held_out_requests,
    run_evaluate_two_stage,
    user_histories,
)
from serving.encoding import RETRIEVAL_SCORE

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> RayrecConfig:
    """The tiny pipeline up to the two-stage evaluation, once for this module (no tracking)."""
    workdir = tmp_path_factory.mktemp("two_stage") / "wd"
    config = load_config("tiny", [f"paths.workdir={workdir}"], environ={})
    run_pipeline(MAIN, config, until=EVALUATE_TWO_STAGE.name, track=False)
    return config


def _context(config: RayrecConfig, output: Path, **replaced: Path) -> StepContext:
    """The step's context over the published inputs, some of them replaced by other folders."""
    inputs = {name: published(config, name) for name in EVALUATE_TWO_STAGE.inputs}
    for name, folder in replaced.items():
        inputs[name] = Published("test", StoragePath.from_uri(folder), {})
    output.mkdir(parents=True, exist_ok=True)
    return StepContext(
        config,
        "test",
        StoragePath.from_uri(config.paths.workdir),
        StoragePath.from_uri(output),
        inputs,  # type: ignore[arg-type]
        "test",
    )


def test_retrieval_and_reranked_orders_are_judged_on_held_out_requests(
    tiny_run: RayrecConfig,
) -> None:
    current = published(tiny_run, EVALUATE_TWO_STAGE.name)
    assert current is not None
    record = json.loads(current.path.join("two_stage.json").read_text())
    assert "skipped" not in record, record
    n = record["N"]
    assert record["K"] == K and K <= n <= two_stage.N_CANDIDATES
    assert MIN_REQUESTS <= record["n_requests"] <= two_stage.MAX_REQUESTS
    assert record["n_requests"] <= record["eligible_requests"]
    # The held-out period starts at or after the reranker's test cut (the last 10% of examples).
    ranker = json.loads(published(tiny_run, "train_ranker").path.join("ranker.json").read_text())  # type: ignore[union-attr]
    assert ranker["split"] == "temporal" and record["reranker"] in ("trained", "finetuned")

    orders = ["retrieval", "reranked", "oracle"]
    for order in orders:
        for metric in ("ndcg", "recall", "true_ndcg", "global_true_ndcg", "exposed"):
            value = record[f"{order}_{metric}@{K}"]
            assert 0.0 <= value <= 1.0, (order, metric, value)
            low, high = record[f"{order}_{metric}@{K}_ci95"]
            assert low <= value <= high
        # Recall at K can never exceed what the N candidates hold.
        assert record[f"{order}_recall@{K}"] <= record[f"candidate_recall@{n}"] + 1e-12
    # The simulator's truth: the oracle is the best order of the candidates by definition.
    assert record["ground_truth"] is True
    assert record[f"oracle_true_ndcg@{K}"] == pytest.approx(1.0)
    assert record[f"oracle_true_ndcg@{K}"] >= record[f"reranked_true_ndcg@{K}"]
    assert record[f"oracle_global_true_ndcg@{K}"] <= 1.0 + 1e-12
    # The reranker reorders the list: it does not keep retrieval's top K as it is.
    assert record[f"reranked_overlap@{K}"] < 1.0
    assert record[f"reranked_true_ndcg@{K}"] != record[f"retrieval_true_ndcg@{K}"]
    difference = record[f"reranked_minus_retrieval_ndcg@{K}"]
    assert difference == pytest.approx(record[f"reranked_ndcg@{K}"] - record[f"retrieval_ndcg@{K}"])
    # The manifest carries the metrics the runner logs to MLflow.
    assert current.manifest["metrics"]["two_stage_reranked_ndcg_at_10"] == pytest.approx(
        record[f"reranked_ndcg@{K}"]
    )


def test_candidates_carry_the_retrieval_score_the_reranker_feature_is_trained_on(
    tiny_run: RayrecConfig,
) -> None:
    """The index's score of a candidate = the two-tower score of its featurised row
    (:func:`retrieval_scores`, what ``models.ranker.retrieval_score`` trains on)."""
    data = published(tiny_run, "validate").path  # type: ignore[union-attr]
    features = published(tiny_run, "features").path  # type: ignore[union-attr]
    record = json.loads(
        published(tiny_run, EVALUATE_TWO_STAGE.name).path.join("two_stage.json").read_text()  # type: ignore[union-attr]
    )
    events = read_events(data).collect()
    items = read_table(data.join("items.parquet"))
    clicks = positives(events.lazy())
    start = dt.datetime.fromisoformat(record["held_out_from"])
    held = held_out_requests(events, clicks, clicks.head(0), items, start)
    model = load_two_tower(published(tiny_run, "train_retrieval").path.local_path() / "model")  # type: ignore[union-attr]
    index = load_index(published(tiny_run, "index").path.local_path() / "index")  # type: ignore[union-attr]
    length = tiny_run.features.history_length
    history, users = user_histories(events.lazy(), held.requests, length, model.config.n_items)
    candidates = retrieve(model, history, users, index, 20, held.exclude)
    prior_record = json.loads(features.join("prior.json").read_text())
    prior = CtrPrior(prior_record["rate"], prior_record["strength"])
    users_table = read_table(data.join("users.parquet"))
    frame = candidate_frame(
        candidates,
        held.requests.get_column("ts"),
        events.lazy(),
        users_table,
        items,
        tiny_run.features,
        prior,
    )
    np.testing.assert_allclose(
        frame.get_column(RETRIEVAL_SCORE).to_numpy(),
        retrieval_scores(model, frame, length),
        rtol=0,
        atol=1e-5,
    )
    # candidate_frame reads only the requests' users' and the candidates' events: its
    # features are those the whole log gives (20 of the 200 items a request: the
    # filter leaves most items' events out).
    assert np.unique(candidates.items).size < items.height
    rows = frame.select("user_id", "item_id", "ts", "request_id", "position", "label")
    whole = build_training_frame(rows, events.lazy(), users_table, items, tiny_run.features, prior)
    keys = ["request_id", "item_id"]
    ours = frame.drop(RETRIEVAL_SCORE).sort(keys)
    assert ours.equals(whole.select(ours.columns).sort(keys))


def test_the_step_skips_with_the_reason(
    tiny_run: RayrecConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def reason(ctx: StepContext) -> str:
        result = run_evaluate_two_stage(ctx)
        written = json.loads(ctx.output.join("two_stage.json").read_text())
        assert written == {"skipped": result.extra["skipped"]}
        return written["skipped"]

    # A CTR table (no user or item ids) has nothing to retrieve for.
    ctr = tmp_path / "ctr"
    ctr.mkdir()
    (ctr / "dataset.json").write_text(json.dumps({"kind": "ctr", "name": "criteo"}))
    assert "CTR table" in reason(_context(tiny_run, tmp_path / "out-ctr", validate=ctr))

    # No trained reranker (its step skipped on too little data).
    empty = tmp_path / "no-ranker"
    empty.mkdir()
    assert reason(_context(tiny_run, tmp_path / "out-model", train_ranker=empty)) == "no reranker"

    # Too few held-out requests.
    monkeypatch.setattr(two_stage, "MIN_REQUESTS", 10**6)
    assert reason(_context(tiny_run, tmp_path / "out-few")).startswith("too few held-out requests")
