"""The models one request path answers with, loaded from folders and checked before use.

Serving may not import ``pipelines``, so it is told where things are
(:class:`ModelSources`: plain folder paths, e.g. the published versions of
the pipeline's steps, which :mod:`pipelines.serving_sources` resolves) and
loads them itself. :meth:`ModelBundle.load` refuses a bundle that could not
answer correctly (an empty index, an index of another width than the user
tower, a reranker whose input layout is not its feature spec's), so a broken
model fails at load, never on a request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from features.feature_spec import FeatureSpec
from models.artifacts import SavedReranker, load_reranker, load_two_tower
from models.index.base import CandidateIndex
from models.two_tower import TwoTowerModel
from serving.encoding import SpecColumns


class BundleError(ValueError):
    """The models cannot serve together (names what is wrong and where)."""


@dataclass(frozen=True)
class ModelSources:
    """Where the request path's models and tables are (local folders).

    ``two_tower``: a :func:`models.artifacts.save_two_tower` folder; ``index``:
    the candidate index of its item vectors (:func:`models.index.load_index`);
    ``reranker``: a :func:`models.artifacts.save_reranker` folder;
    ``reranker_spec``: the ``feature_spec.json`` the reranker was trained with;
    ``users`` / ``items``: the static attribute tables (Parquet) the features
    were built from; ``versions``: a label per model (``two_tower``,
    ``index``, ``reranker``) that every response carries.
    """

    two_tower: Path
    index: Path
    reranker: Path
    reranker_spec: Path
    users: Path
    items: Path
    versions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelBundle:
    """Loaded, mutually consistent models and the tables the featurisation joins."""

    two_tower: TwoTowerModel
    index: CandidateIndex
    reranker: SavedReranker
    spec: FeatureSpec
    columns: SpecColumns
    users: pl.DataFrame
    items: pl.DataFrame
    versions: dict[str, str]

    @classmethod
    def load(cls, sources: ModelSources) -> ModelBundle:
        """Load every part of ``sources`` and check they fit together (raises :class:`BundleError`)."""
        # Imported here: Faiss loads (and logs) on import.
        from models.index import load_index

        two_tower = load_two_tower(sources.two_tower)
        index = load_index(sources.index)
        if len(index) == 0:
            raise BundleError(f"{sources.index}: the candidate index is empty")
        if index.dim != two_tower.config.embedding_dim:
            raise BundleError(
                f"{sources.index}: index vectors have {index.dim} dimensions, the user tower of "
                f"{sources.two_tower} makes {two_tower.config.embedding_dim}"
            )
        reranker = load_reranker(sources.reranker)
        spec = FeatureSpec.model_validate_json(sources.reranker_spec.read_text())
        # The request rows carry no label or targets: only the spec's features matter.
        columns = SpecColumns.of(spec, columns=[f.name for f in spec.features])
        if columns.layout() != reranker.model.layout:
            raise BundleError(
                f"{sources.reranker}: the reranker's input layout {reranker.model.layout} is not "
                f"the one its feature spec {sources.reranker_spec} describes {columns.layout()}"
            )
        return cls(
            two_tower=two_tower,
            index=index,
            reranker=reranker,
            spec=spec,
            columns=columns,
            users=pl.read_parquet(sources.users),
            items=pl.read_parquet(sources.items),
            versions=dict(sources.versions),
        )
