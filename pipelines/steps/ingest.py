"""ingest: bring data in from the configured source (simulate, import files).

The output is a dataset folder (see :mod:`features.dataset`) holding *raw*
tables; nothing downstream reads it before ``validate`` has typed it. Neither
path holds the log: the simulator writes ``simulator.chunk_rows`` at a time, and
a source that hands its events over as a scan (MovieLens' rating file) is
written in chunks by :func:`~features.dataset.write_interactions`.

With ``data.include_event_log`` the events serving's API took in (its event
log, :mod:`features.event_log`) are added beside the source's events as one
more part per date: this closes the loop events → features → models →
serving → events. The log's files are an external input of the step, so a
run after new events re-ingests and everything downstream retrains; events
whose user or item the source does not know are quarantined by ``validate``
like any others. The log is read as it is (no deduplication against the
source: events posted to the API are new events).
"""

from __future__ import annotations

from pathlib import Path

from features.dataset import (
    InteractionTables,
    write_ctr_table,
    write_events_by_date,
    write_interactions,
)
from features.event_log import EventLog, event_log_root
from features.simulator import ClickLogSimulator
from features.sources import load_source
from infra.config import RayrecConfig, SimulatorSourceConfig
from infra.errors import ConfigError
from infra.storage import StoragePath
from pipelines.step import Step, StepContext, StepResult

# The part number of the event log's events in each date folder (the source's
# parts count up from 0).
EVENT_LOG_PART = 99_999


def run_ingest(ctx: StepContext) -> StepResult:
    source = ctx.config.data.source
    if isinstance(source, SimulatorSourceConfig):
        counts = ClickLogSimulator(ctx.config.simulator).write(ctx.output)
        extra = {"source": "simulator"}
    else:
        data = load_source(source)
        if isinstance(data, InteractionTables):
            counts = write_interactions(data, ctx.output)
        else:
            if ctx.config.data.include_event_log:
                raise ConfigError(
                    "data.include_event_log: a CTR table has no events to join the log to"
                )
            counts = write_ctr_table(data, ctx.output)
        extra = {"source": source.kind}
    if ctx.config.data.include_event_log:
        counts["event_log_events"] = append_event_log(ctx.config, ctx.output)
        extra["event_log"] = event_log_root(ctx.config)
    return StepResult(row_counts=counts, extra=extra)


def append_event_log(config: RayrecConfig, folder: StoragePath) -> int:
    """Write serving's committed events beside the source's under ``folder/events``; their count."""
    root = Path(StoragePath.from_uri(event_log_root(config)).local_path())
    if not root.exists():
        return 0
    events = EventLog(root).read()
    write_events_by_date(events, folder.join("events"), part=EVENT_LOG_PART)
    return events.height


def _external_inputs(config: RayrecConfig) -> tuple[str, ...]:
    source = config.data.source
    files = () if isinstance(source, SimulatorSourceConfig) else (source.path,)
    return (*files, event_log_root(config)) if config.data.include_event_log else files


INGEST = Step(
    name="ingest",
    run=run_ingest,
    description="simulate or import the configured data source (raw tables), "
    "with serving's event log when data.include_event_log",
    config_keys=("data.source", "data.include_event_log", "simulator"),
    code=(
        "features.simulator",
        "features.sources",
        "features.dataset",
        "features.event_log",
        "pipelines.steps.ingest",
    ),
    external_inputs=_external_inputs,
)
