"""Data sources: each maps one family of public or user files onto the hand-over shapes.

:func:`load_source` picks the reader from the config's type through an
explicit mapping. Interaction sources (MovieLens, generic files, RecBole)
return :class:`~features.dataset.InteractionTables` with raw event values for
validation to type; CTR sources (Criteo, Avazu) return a
:class:`~features.dataset.CtrTable`. The simulator is not read but generated,
by its own step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from features.dataset import CtrTable, InteractionTables
from features.sources.ctr import load_ctr
from features.sources.files import load_interaction_files
from features.sources.movielens import load_movielens
from features.sources.recbole import load_recbole
from infra.config import (
    CtrSourceConfig,
    InteractionFilesSourceConfig,
    MovieLensSourceConfig,
    RecBoleSourceConfig,
    SimulatorSourceConfig,
)
from infra.errors import SourceError

_LOADERS: dict[type, Callable[[Any], InteractionTables | CtrTable]] = {
    MovieLensSourceConfig: load_movielens,
    CtrSourceConfig: load_ctr,
    InteractionFilesSourceConfig: load_interaction_files,
    RecBoleSourceConfig: load_recbole,
}


def load_source(
    config: MovieLensSourceConfig
    | CtrSourceConfig
    | InteractionFilesSourceConfig
    | RecBoleSourceConfig
    | SimulatorSourceConfig,
) -> InteractionTables | CtrTable:
    """Read the source that ``config`` describes."""
    if isinstance(config, SimulatorSourceConfig):
        raise SourceError(
            "the simulator source is generated, not read: the simulate step writes its events"
        )
    loader = _LOADERS.get(type(config))
    if loader is None:
        raise SourceError(f"no reader for source config {type(config).__name__}")
    return loader(config)


__all__ = ["load_source"]
