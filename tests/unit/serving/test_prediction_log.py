"""The prediction log's buffer: rows per answered item, flushed by size, time and close."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest

from features.event_log import EventLog
from features.schemas import EVENTS, PREDICTIONS
from serving.prediction_log import PredictionRecorder
from serving.schemas import RecommendationResponse, ScoredItem

TS = dt.datetime(2026, 3, 1, 23, 59, 59, tzinfo=dt.UTC)


def _answer(request_id: int, n: int, fallback: bool = False) -> RecommendationResponse:
    return RecommendationResponse(
        request_id=str(request_id),
        user_id=7,
        items=tuple(
            ScoredItem(item_id=10 + i, score=0.5 - 0.1 * i, retrieval_score=None, propensity=1.0)
            for i in range(n)
        ),
        fallback=fallback,
        reranked=not fallback,
        degraded=False,
        model_versions={"reranker": "r/1", "two_tower": "t/1"},
        timings_ms={},
    )


def test_rows_per_item_flushed_on_close(tmp_path: Path) -> None:
    log = EventLog(tmp_path, PREDICTIONS)
    recorder = PredictionRecorder(log, flush_rows=1_000, flush_interval_s=60)
    recorder.record(_answer(1, 3), 4, TS)
    recorder.record(_answer(2, 2, fallback=True), 4, TS + dt.timedelta(seconds=2))
    assert log.read().height == 0  # buffered, nothing written yet
    recorder.close()
    rows = log.read().sort("request_id", "position")
    assert rows.height == 5
    assert rows["position"].to_list() == [0, 1, 2, 0, 1]
    assert rows["score"].to_list() == pytest.approx([0.5, 0.4, 0.3, 0.5, 0.4])
    assert rows["fallback"].to_list() == [False] * 3 + [True] * 2
    assert rows["generation"].to_list() == [4] * 5
    # The two answers fall on two UTC dates: one part per date.
    assert log.dates() == [dt.date(2026, 3, 1), dt.date(2026, 3, 2)]


def test_a_full_buffer_is_flushed_in_the_background(tmp_path: Path) -> None:
    log = EventLog(tmp_path, PREDICTIONS)
    recorder = PredictionRecorder(log, flush_rows=4, flush_interval_s=60)
    recorder.record(_answer(1, 5), None, TS)
    deadline = time.monotonic() + 10
    while log.read().height < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.read().height == 5
    recorder.close()


def test_needs_a_predictions_log(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="predictions log"):
        PredictionRecorder(EventLog(tmp_path, EVENTS), flush_rows=1, flush_interval_s=1)
