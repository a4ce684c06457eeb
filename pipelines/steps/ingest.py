"""ingest: bring data in from the configured source (simulate, import files).

The output is a dataset folder (see :mod:`features.dataset`) holding *raw*
tables; nothing downstream reads it before ``validate`` has typed it.
"""

from __future__ import annotations

from features.dataset import InteractionTables, write_ctr_table, write_interactions
from features.simulator import ClickLogSimulator
from features.sources import load_source
from infra.config import RayrecConfig, SimulatorSourceConfig
from pipelines.step import Step, StepContext, StepResult


def run_ingest(ctx: StepContext) -> StepResult:
    source = ctx.config.data.source
    if isinstance(source, SimulatorSourceConfig):
        counts = ClickLogSimulator(ctx.config.simulator).write(ctx.output)
        return StepResult(row_counts=counts, extra={"source": "simulator"})
    data = load_source(source)
    if isinstance(data, InteractionTables):
        counts = write_interactions(data, ctx.output)
    else:
        counts = write_ctr_table(data, ctx.output)
    return StepResult(row_counts=counts, extra={"source": source.kind})


def _source_files(config: RayrecConfig) -> tuple[str, ...]:
    source = config.data.source
    return () if isinstance(source, SimulatorSourceConfig) else (source.path,)


INGEST = Step(
    name="ingest",
    run=run_ingest,
    description="simulate or import the configured data source (raw tables)",
    config_keys=("data.source", "simulator"),
    code=("features.simulator", "features.sources", "features.dataset", "pipelines.steps.ingest"),
    external_inputs=_source_files,
)
