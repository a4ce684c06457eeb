"""The loop closes: events the serving API logged are ingested by the next run (issue 8).

The tiny simulator's log plus serving's event log (written by the same
``EventLog`` serving appends to); validation types both, quarantining events of
unknown users like any others; new events change the ingest fingerprint.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl

from features.dataset import read_events
from features.event_log import EventLog, event_log_root
from features.schemas import EVENTS
from infra.config import RayrecConfig, load_config
from pipelines.main import MAIN
from pipelines.runner import published, run_pipeline

SERVED_AT = dt.datetime(2026, 1, 6, 12, 0, tzinfo=dt.UTC)


def _config(workdir: Path, *sets: str) -> RayrecConfig:
    return load_config("tiny", [f"paths.workdir={workdir}", *sets], environ={})


def _served(users: list[int], item: int, at: dt.datetime) -> pl.DataFrame:
    n = len(users)
    return pl.DataFrame(
        {
            "user_id": users,
            "item_id": [item] * n,
            "ts": [at + dt.timedelta(seconds=i) for i in range(n)],
            "event_type": ["click"] * n,
            "label": [1.0] * n,
            "position": [0] * n,
            "request_id": list(range(1, n + 1)),
            "propensity": [1.0] * n,
            "value": [None] * n,
        },
        schema=EVENTS.polars_schema,
    )


def _validated(config: RayrecConfig) -> pl.DataFrame:
    current = published(config, "validate")
    assert current is not None
    return read_events(current.path).collect()


def test_served_events_are_ingested_and_new_ones_retrigger_the_run(tmp_path: Path) -> None:
    config = _config(tmp_path / "wd", "data.include_event_log=true")
    # Before serving wrote anything: the source alone.
    first = run_pipeline(MAIN, config, until="validate", track=False)
    alone = _validated(config).height
    assert first.step("ingest").row_counts["event_log_events"] == 0

    log = EventLog(event_log_root(config))
    log.append(_served([1, 2, 3], item=5, at=SERVED_AT))
    second = run_pipeline(MAIN, config, until="validate", track=False)
    assert second.step("ingest").status == "ran"
    assert second.step("ingest").row_counts["event_log_events"] == 3
    events = _validated(config)
    assert events.height == alone + 3
    served = events.filter(pl.col("ts") >= SERVED_AT)
    assert sorted(served.get_column("user_id").to_list()) == [1, 2, 3]

    # Nothing new: skipped. An event of a user the source never had: quarantined.
    assert run_pipeline(MAIN, config, until="ingest", track=False).step("ingest").status == (
        "skipped"
    )
    log.append(_served([10_000], item=5, at=SERVED_AT + dt.timedelta(hours=1)))
    third = run_pipeline(MAIN, config, until="validate", track=False)
    assert third.step("ingest").row_counts["event_log_events"] == 4
    assert third.step("validate").row_counts["events_quarantined"] == 1
    assert _validated(config).height == alone + 3


def test_without_the_flag_the_log_is_not_read(tmp_path: Path) -> None:
    config = _config(tmp_path / "wd")
    EventLog(event_log_root(config)).append(_served([1], item=5, at=SERVED_AT))
    record = run_pipeline(MAIN, config, until="validate", track=False)
    assert "event_log_events" not in record.step("ingest").row_counts
    assert _validated(config).filter(pl.col("ts") >= SERVED_AT).height == 0
