"""A pipeline step: what it reads, what it writes, and what makes it rerun.

Steps are plain functions of a :class:`StepContext`; the runner owns staging,
publishing, skipping and tracking, so a step only writes files into
``ctx.output`` and returns what it counted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.config import RayrecConfig
from infra.publish import Published
from infra.storage import StoragePath


@dataclass(frozen=True)
class StepResult:
    """What a step reports: rows per output table, metrics, files to attach to MLflow."""

    row_counts: Mapping[str, int] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    # Paths relative to the step's output folder, logged as MLflow artifacts.
    artifacts: tuple[str, ...] = ()
    # Anything else worth keeping in the published manifest (JSON-serialisable).
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepContext:
    """Everything a step may touch."""

    config: RayrecConfig
    run_id: str
    workdir: StoragePath
    # Staging folder for this step's files; published atomically by the runner.
    output: StoragePath
    # Published outputs of the steps named in ``Step.inputs``.
    inputs: Mapping[str, Published]
    fingerprint: str

    def input_path(self, step: str) -> StoragePath:
        return self.inputs[step].path


@dataclass(frozen=True)
class Step:
    """A node of the DAG.

    ``config_keys`` are the dotted config sections that change this step's
    output; with the input hashes and ``code`` (modules whose source counts)
    they make the fingerprint that decides whether a rerun can be skipped.
    """

    name: str
    run: Callable[[StepContext], StepResult]
    description: str
    inputs: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()
    code: tuple[str, ...] = ()
    # Files outside the workdir that the step reads (a source folder): their
    # names, sizes and mtimes join the fingerprint so an edited file reruns it.
    external_inputs: Callable[[RayrecConfig], tuple[str, ...]] | None = None
