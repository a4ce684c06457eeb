"""Embedding drift and ANN health on the pipeline's own data (:mod:`monitoring.embeddings`).

Reference (:func:`reference_embeddings`, in the ``reference_profile`` step)
    The ``train_retrieval`` two-tower's user vectors (id + point-in-time history)
    of ``monitoring.embeddings.rows`` requests and item vectors of as many rows,
    drawn (seeded) from the reference period, and the day-to-day noise of each side measured on the
    same warm history days the column noise uses; saved in the profile folder
    with the model version that made them.

Window (:func:`embedding_checks`, in :func:`pipelines.monitor.run_monitoring`)
    The same two-tower version embeds a sample of the window's rows: the user
    vectors and the item vectors are each judged against the reference's by a
    domain classifier (``user_embedding``, ``item_embedding``). The window's
    sampled requests' user vectors then query the live index (the published ``index`` step,
    what serving searches) and exact search over that index's own vectors, top
    ``serving.candidates`` each: ``ann_recall`` is the share of the exact top
    the index found. An exact index is its own oracle and is not judged.

The user side has one vector per request (the query the index answered), the
item side one per shown row (the mix of items shown, popularity included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from infra.config import EmbeddingCheckConfig, RayrecConfig
from infra.logs import get_logger
from infra.publish import Published
from models.artifacts import load_two_tower
from models.two_tower import TwoTowerModel
from monitoring.columns import ScanRows
from monitoring.embeddings import (
    EMBEDDING_TEST,
    RECALL_TEST,
    SIDES,
    EmbeddingReference,
    ann_health,
    day_noise,
    embedding_drift,
)
from monitoring.verdict import Verdict, not_judged
from pipelines.ranker.retrieval_feature import row_vectors
from pipelines.runner import published, step_output

if TYPE_CHECKING:
    # Faiss loads (and logs) on import of models.index: only its type here.
    from models.index.base import CandidateIndex

log = get_logger(__name__)

EMBEDDING_STEP = "train_retrieval"
INDEX_STEP = "index"
ANN_CHECK = "ann_recall"
# The columns the two-tower reads from an example row.
EMBEDDING_COLUMNS = ("user_id", "item_id", "user_history")


def _embeddable(columns: Sequence[str]) -> bool:
    return all(column in columns for column in EMBEDDING_COLUMNS)


def reference_embeddings(
    rows: ScanRows,
    noise_rows: pl.DataFrame | None,
    train_retrieval: Published | None,
    config: RayrecConfig,
    seed: int,
) -> EmbeddingReference | None:
    """The embedding reference of ``rows`` (the reference period's rows), with the noise of
    ``noise_rows`` (a sample of warm history days; None: not measured, the floor
    decides). None when no two-tower was trained or the rows lack its inputs. Only the
    sampled rows are read."""
    if train_retrieval is None or not _embeddable(rows.columns):
        return None
    folder = Path(train_retrieval.path.local_path()) / "model"
    if not folder.exists():
        return None
    model = load_two_tower(folder)
    history_length = config.features.history_length
    settings = config.monitoring.embeddings
    vectors = side_vectors(model, rows, settings.rows, history_length, seed)
    noise: dict[str, float | None] = dict.fromkeys(SIDES)
    if noise_rows is not None and "ts" in noise_rows.columns and noise_rows.height:
        for side in SIDES:
            frame = requests(noise_rows) if side == "user" else noise_rows
            found = row_vectors(model, frame, history_length)
            days = frame.get_column("ts").dt.date().to_physical().to_numpy()[found.known]
            noise[side] = day_noise(getattr(found, side), days, seed)
    return EmbeddingReference(vectors, noise, {EMBEDDING_STEP: train_retrieval.version})


def request_keys(columns: Sequence[str]) -> list[str]:
    """What tells requests apart (``request_id``; else user and ``ts``): the user side
    judges the queries the two-tower answered, one vector each. A slate's rows share
    one user vector, so an impression-weighted sample puts copies of a vector on both
    sides of the classifier's split: healthy days then told apart at AUC ~0.7 in the
    tiny world (0.66 one per request; one per active user-day leaves too few)."""
    return ["request_id"] if "request_id" in columns else ["user_id", "ts"]


def requests(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per request (the first of its rows; :func:`request_keys`)."""
    return frame.filter(pl.int_range(pl.len()).over(request_keys(frame.columns)) == 0)


def side_vectors(
    model: TwoTowerModel, frame: ScanRows, rows: int, history_length: int, seed: int | list[int]
) -> dict[str, np.ndarray]:
    """``{"user": (U, D), "item": (I, D)}``: the user vectors of at most ``rows`` sampled
    requests (:func:`request_keys`, the first row of each) and the item vectors of at
    most ``rows`` sampled rows (impression-weighted: the mix of items shown is what
    moves). Reads the sampled rows (and the request keys) only."""
    requested = frame.first_of(request_keys(frame.columns))
    users = row_vectors(model, requested.sample(rows, seed), history_length)
    items = row_vectors(model, frame.sample(rows, seed), history_length)
    return {"user": users.user, "item": items.item}


def _not_judged(reason: str) -> list[Verdict]:
    return [
        *(not_judged(f"{side}_embedding", EMBEDDING_TEST, reason) for side in SIDES),
        not_judged(ANN_CHECK, RECALL_TEST, reason),
    ]


def embedding_checks(
    config: RayrecConfig,
    reference: EmbeddingReference | None,
    window: ScanRows,
    seed: int,
) -> list[Verdict]:
    """``user_embedding``, ``item_embedding`` and ``ann_recall`` of ``window`` (the window's
    example rows); each not judged, with the reason, when its inputs are missing."""
    settings = config.monitoring.embeddings
    if reference is None:
        return _not_judged("the reference profile has no embeddings (no two-tower was trained)")
    if not _embeddable(window.columns):
        return _not_judged(f"the examples lack {list(EMBEDDING_COLUMNS)}")
    version = reference.model.get(EMBEDDING_STEP, "")
    folder = step_output(config, EMBEDDING_STEP).root.join(version, "model")
    if not version or not folder.exists():
        return _not_judged(
            f"the two-tower that made the reference ({EMBEDDING_STEP} {version or '?'}) is gone"
        )
    model = load_two_tower(Path(folder.local_path()))
    vectors = side_vectors(model, window, settings.rows, config.features.history_length, [seed, 1])
    checks = [
        embedding_drift(
            f"{side}_embedding",
            reference.vectors[side],
            vectors[side],
            reference.noise.get(side),
            seed,
            settings.margin,
            settings.floor,
            settings.min_rows,
        )
        for side in SIDES
    ]
    checks.append(ann_check(config, model, vectors["user"], seed))
    return checks


def ann_check(
    config: RayrecConfig, model: TwoTowerModel, queries: np.ndarray, seed: int
) -> Verdict:
    """Recall of the live index against exact search over its own vectors, for at most
    ``monitoring.embeddings.ann_queries`` of ``queries`` (Q, D), top ``serving.candidates``."""
    # Imported here: Faiss loads (and logs) on import, which every CLI command would pay.
    from models.index import load_index

    settings = config.monitoring.embeddings
    current = published(config, INDEX_STEP)
    folder = None if current is None else Path(current.path.local_path()) / "index"
    if current is None or folder is None or not folder.exists():
        return not_judged(ANN_CHECK, RECALL_TEST, "no index published")
    index = load_index(folder)
    if index.kind == "exact":
        return not_judged(ANN_CHECK, RECALL_TEST, "the live index is exact search (its own oracle)")
    if index.dim != model.config.embedding_dim:
        return not_judged(
            ANN_CHECK,
            RECALL_TEST,
            f"the index holds {index.dim}-d vectors, the reference's two-tower makes "
            f"{model.config.embedding_dim}-d ones",
        )
    verdict = ann_recall(index, queries, config.serving.candidates, settings, seed)
    built = current.manifest.get("metrics", {}).get(
        f"index_recall_at_{config.models.index.recall_k}"
    )
    return replace(
        verdict,
        details={
            **verdict.details,
            "kind": index.kind,
            "items": len(index),
            "index_version": current.version,
            "build_recall": built,
        },
    )


def ann_recall(
    index: CandidateIndex,
    queries: np.ndarray,
    candidates: int,
    settings: EmbeddingCheckConfig,
    seed: int,
) -> Verdict:
    """Recall@``candidates`` of ``index`` against exact search over its own vectors, for at
    most ``settings.ann_queries`` of ``queries`` (Q, D)."""
    from models.index import ExactIndex

    if len(queries) > settings.ann_queries:
        rng = np.random.default_rng(seed)
        queries = queries[np.sort(rng.choice(len(queries), settings.ann_queries, replace=False))]
    k = min(candidates, len(index))
    oracle = ExactIndex(np.array(index.ids), index.reconstruct(index.ids))
    _, found = index.search(queries, k)
    _, exact = oracle.search(queries, k)
    return ann_health(found, exact, settings.ann_min_recall)
