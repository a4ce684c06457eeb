"""A named DAG of steps in a checked, deterministic order."""

from __future__ import annotations

from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter

from infra.errors import ConfigError
from pipelines.step import Step


@dataclass(frozen=True)
class Pipeline:
    name: str
    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"pipeline {self.name}: duplicate step names in {names}")
        for step in self.steps:
            unknown = [i for i in step.inputs if i not in names]
            if unknown:
                raise ValueError(
                    f"pipeline {self.name}: step {step.name} reads unknown step(s) {unknown}"
                )
        try:
            self.order()
        except CycleError as exc:
            raise ValueError(f"pipeline {self.name}: cycle {exc.args[1]}") from None

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise ConfigError(
            f"pipeline {self.name} has no step {name!r}; steps: {', '.join(self.names)}"
        )

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.order()]

    def order(self) -> list[Step]:
        """Topological order; ties keep declaration order, so runs are reproducible."""
        position = {s.name: i for i, s in enumerate(self.steps)}
        sorter = TopologicalSorter({s.name: set(s.inputs) for s in self.steps})
        sorter.prepare()
        ordered: list[str] = []
        while sorter.is_active():
            ready = sorted(sorter.get_ready(), key=position.__getitem__)
            ordered.extend(ready)
            sorter.done(*ready)
        return [self.step(n) for n in ordered]

    def plan(self, until: str | None = None) -> list[Step]:
        """The steps to run to produce ``until`` (all of them when None), in order."""
        if until is None:
            return self.order()
        needed = {until}
        frontier = [self.step(until)]
        while frontier:
            for name in frontier.pop().inputs:
                if name not in needed:
                    needed.add(name)
                    frontier.append(self.step(name))
        return [s for s in self.order() if s.name in needed]
