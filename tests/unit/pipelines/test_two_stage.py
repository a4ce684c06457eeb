"""Two-stage evaluation: graded NDCG, the report on hand-made candidates, the featurised frame."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest
import torch

from features.build import build_features
from features.simulator import ClickLogSimulator
from infra.config import load_config
from models.metrics import UserItems
from models.moe import Reranker, RerankerConfig
from pipelines.ranker.two_stage import (
    Candidates,
    candidate_frame,
    dcg_at_k,
    exposed_first,
    membership,
    ndcg_at_k,
    order_of,
    rerank_scores,
    spearman_rows,
    two_stage_report,
)
from serving.encoding import RETRIEVAL_SCORE, SCORING_POSITION, SpecColumns


def _clicked(rows: list[list[int]]) -> UserItems:
    users = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    return UserItems.from_pairs(users, np.concatenate([np.asarray(r) for r in rows]), len(rows))


def test_dcg_and_ndcg_by_hand() -> None:
    gains = np.array([[3.0, 0.0, 1.0]])
    # 3/log2(2) + 0 + 1/log2(4) = 3.5
    assert dcg_at_k(gains, 3)[0] == pytest.approx(3.5)
    assert dcg_at_k(gains, 1)[0] == pytest.approx(3.0)
    # Ideal order 3, 1, 0: 3 + 1/log2(3).
    assert ndcg_at_k(gains, gains, 3)[0] == pytest.approx(3.5 / (3 + 1 / np.log2(3)))
    # A row with no gain at all scores 0, not NaN.
    assert ndcg_at_k(np.zeros((1, 3)), np.zeros((1, 3)), 2)[0] == 0.0


def test_order_is_descending_and_stable() -> None:
    assert order_of(np.array([[1.0, 3.0, 3.0, 2.0]])).tolist() == [[1, 2, 3, 0]]


def test_spearman_of_a_monotone_map_is_one() -> None:
    a = np.array([[0.1, 0.5, 0.3, 0.9]])
    assert spearman_rows(a, np.exp(a))[0] == pytest.approx(1.0)
    assert spearman_rows(a, -a)[0] == pytest.approx(-1.0)


def test_reranking_by_the_true_scores_gives_the_oracle() -> None:
    items = np.array([[10, 11, 12, 13], [20, 21, 22, 23]])
    relevance = np.array([[0.1, 0.2, 0.9, 0.4], [0.8, 0.1, 0.3, 0.2]])
    retrieval = np.array([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])  # as retrieved
    clicked = _clicked([[12, 99], [20]])  # 99 was never retrieved
    report = two_stage_report(
        items,
        {"retrieval": retrieval, "reranked": relevance * 5 - 1, "oracle": relevance},
        relevance,
        clicked,
        k=2,
        n_boot=50,
    )
    m = report.metrics
    assert m["reranked_true_ndcg@2"] == pytest.approx(1.0)
    assert m["oracle_true_ndcg@2"] == pytest.approx(1.0)
    for key in ("ndcg@2", "recall@2", "relevance@2", "spearman"):
        assert m[f"reranked_{key}"] == pytest.approx(m[f"oracle_{key}"])
    # Request 0: retrieval puts 10, 11 first, no click among them; the oracle puts 12 first.
    # Request 1: both put 20 first. recall counts the unretrieved click (|R| = 2).
    assert report.per_request["retrieval_recall@2"].tolist() == [0.0, 1.0]
    assert report.per_request["oracle_recall@2"].tolist() == [0.5, 1.0]
    # IDCG over min(|R|, K) = 2 hits for request 0: 1 / (1 + 1/log2(3)).
    assert report.per_request["oracle_ndcg@2"][0] == pytest.approx(1 / (1 + 1 / np.log2(3)))
    assert m["candidate_recall@4"] == pytest.approx(0.75)
    # Request 0 by retrieval: gains 0.1, 0.2 against the ideal 0.9, 0.4.
    dcg = 0.1 + 0.2 / np.log2(3)
    assert report.per_request["retrieval_true_ndcg@2"][0] == pytest.approx(
        dcg / (0.9 + 0.4 / np.log2(3))
    )
    diff = m["oracle_minus_retrieval_true_ndcg@2"]
    assert diff == pytest.approx(m["oracle_true_ndcg@2"] - m["retrieval_true_ndcg@2"])
    low, high = report.intervals["oracle_minus_retrieval_true_ndcg@2"]
    assert low <= diff <= high
    assert report.n_requests == 2 and report.n_candidates == 4


def test_global_ideal_and_exposure() -> None:
    items = np.array([[1, 2, 3]])
    relevance = np.array([[0.2, 0.6, 0.4]])
    exposed = np.array([[True, False, True]])
    report = two_stage_report(
        items,
        {"retrieval": np.array([[3.0, 2.0, 1.0]]), "oracle": relevance},
        relevance,
        _clicked([[3]]),
        k=2,
        global_ideal=np.array([[0.5, 1.0]]),  # better items exist outside the candidates
        exposed=exposed,
        n_boot=10,
    )
    m = report.metrics
    assert m["oracle_global_true_ndcg@2"] == pytest.approx(
        (0.6 + 0.4 / np.log2(3)) / (1.0 + 0.5 / np.log2(3))
    )
    assert m["retrieval_exposed@2"] == pytest.approx(0.5)
    assert m["oracle_exposed@2"] == pytest.approx(0.5)
    # Exposed first: item 2 (not shown) drops to the bottom whatever the order says.
    pushed = exposed_first({"oracle": relevance}, exposed)["oracle"]
    assert order_of(pushed)[0].tolist() == [2, 0, 1]


def test_membership_and_checks() -> None:
    sets = _clicked([[5], [6, 7]])
    assert membership(np.array([[5, 6], [7, 5]]), sets).tolist() == [[True, False], [True, False]]
    with pytest.raises(ValueError, match="at least one clicked"):
        two_stage_report(
            np.array([[1, 2]]),
            {"retrieval": np.ones((1, 2))},
            np.ones((1, 2)),
            UserItems(np.array([0, 0]), np.zeros(0, np.int64)),
            k=1,
        )
    with pytest.raises(ValueError, match="baseline"):
        two_stage_report(
            np.array([[1, 2]]), {"reranked": np.ones((1, 2))}, np.ones((1, 2)), _clicked([[1]]), k=1
        )


def test_candidate_frame_is_request_major_at_the_scoring_position() -> None:
    config = load_config("tiny")
    sim = ClickLogSimulator(config.simulator, threads=1)
    events = pl.concat(list(sim.iter_event_chunks()))
    request_ts = dt.datetime.fromtimestamp(sim.world.day_start_us(4) / 1e6, tz=dt.UTC)
    history = events.filter(pl.col("ts") < request_ts)
    features = build_features(history.lazy(), sim.users, sim.items, config.features)
    # Item order deliberately not sorted, users not sorted: the frame must keep it.
    candidates = Candidates(
        user_ids=np.array([7, 3]),
        items=np.array([[9, 2, 5], [1, 8, 0]]),
        scores=np.array([[3.0, 2.0, 1.0], [0.75, 0.5, 0.25]], dtype=np.float32),
    )
    times = pl.Series(
        [request_ts + dt.timedelta(hours=5), request_ts], dtype=pl.Datetime("us", "UTC")
    )
    frame = candidate_frame(
        candidates, times, events.lazy(), sim.users, sim.items, config.features, features.prior
    )
    assert frame.get_column("user_id").to_list() == [7, 7, 7, 3, 3, 3]
    assert frame.get_column("item_id").to_list() == [9, 2, 5, 1, 8, 0]
    assert frame.get_column("position").unique().to_list() == [SCORING_POSITION]
    assert frame.get_column("hour").to_list() == [5, 5, 5, 0, 0, 0]
    # Each row carries its candidate's retrieval score, in retrieval order.
    assert frame.schema[RETRIEVAL_SCORE] == pl.Float64
    assert frame.get_column(RETRIEVAL_SCORE).to_list() == candidates.scores.ravel().tolist()
    # Point in time: user 7's counters at its request equal a filter of the log before it.
    before = events.filter(
        (pl.col("user_id") == 7)
        & (pl.col("event_type") == "impression")
        & (pl.col("ts") < request_ts + dt.timedelta(hours=5))
    )
    assert frame.get_column("user_impressions_total")[0] == before.height
    assert set(features.spec.names) <= set(frame.columns)
    # The reranker reads the frame by the training spec: one logit per candidate.
    torch.manual_seed(0)
    model = Reranker(SpecColumns.of(features.spec).layout(), RerankerConfig(embedding_dim=4))
    logits = rerank_scores(model, frame, features.spec, candidates.items.shape)
    assert logits.shape == (2, 3) and np.isfinite(logits).all()
