"""What serving answered, row by row, for monitoring: the prediction log.

Every item of every answer becomes one :data:`features.schemas.PREDICTIONS`
row (request, user, item, slot, score, retrieval score, propensity, whether
it was a fallback or reranked, which model generation answered). Monitoring
reads the log by time for prediction drift and, joined with the event log
on ``request_id`` and ``item_id``, for concept drift once clicks arrive.

The request path only appends tuples to a buffer (microseconds); a
background thread writes the buffer as one Parquet part every
``flush_interval_s`` or ``flush_rows`` rows through the same atomic staging
as the event log (:class:`features.event_log.EventLog`, here over the
predictions contract). A replica that dies loses at most its unflushed
buffer: monitoring samples, so a lost tail costs nothing it needs, and the
request path never waits for a disk.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import polars as pl

from features.event_log import EventLog
from features.schemas import PREDICTIONS
from infra.logs import get_logger
from serving.schemas import RecommendationResponse

log = get_logger(__name__)

# Column order of a buffered row (the contract's).
_COLUMNS = PREDICTIONS.names


class PredictionRecorder:
    """Buffers answers and flushes them to ``log`` (a predictions :class:`EventLog`) in the background."""

    def __init__(self, log: EventLog, flush_rows: int, flush_interval_s: float) -> None:
        if log.contract is not PREDICTIONS:
            raise ValueError(f"{log.root}: a prediction recorder needs a predictions log")
        self.log = log
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self._rows: list[tuple[object, ...]] = []
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def record(
        self, response: RecommendationResponse, generation: int | None, ts: dt.datetime
    ) -> None:
        """Buffer one row per item of ``response`` (answered at ``ts``, UTC)."""
        request_id = int(response.request_id)
        versions = response.model_versions
        rows = [
            (
                request_id,
                ts,
                response.user_id,
                item.item_id,
                position,
                item.score,
                item.retrieval_score,
                item.propensity,
                response.fallback,
                response.reranked,
                generation,
                versions.get("reranker"),
                versions.get("two_tower"),
            )
            for position, item in enumerate(response.items)
        ]
        with self._lock:
            self._rows.extend(rows)
            full = len(self._rows) >= self.flush_rows
        if full:
            self._wake.set()

    def flush(self) -> list[Path]:
        """Write what is buffered now (one part per UTC date); the parts written."""
        with self._flushing:
            with self._lock:
                rows, self._rows = self._rows, []
            if not rows:
                return []
            frame = pl.DataFrame(rows, schema=PREDICTIONS.polars_schema, orient="row")
            try:
                return self.log.append(frame)
            except Exception as exc:  # monitoring data must never break serving
                log.warning("prediction_log.flush_failed", rows=len(rows), error=str(exc))
                return []

    def close(self) -> None:
        """Stop the background thread and flush the rest."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self.flush()
