"""Where the request path finds the pipeline's models: :class:`serving.bundle.ModelSources`
from the published step versions of a workdir.

Serving may not import ``pipelines`` (it reads plain folders); this is the
pipeline side of that hand-over. The reranker is the fine-tuned one when
``finetune_ranker`` published a model (it beat the base on the newest days),
else ``train_ranker``'s, as :mod:`pipelines.steps.two_stage` judges it; both
read the spec saved beside ``train_ranker``'s model.
"""

from __future__ import annotations

from pathlib import Path

from features.feature_spec import SPEC_FILE
from infra.config import RayrecConfig
from infra.errors import RayrecError
from pipelines.runner import published
from serving.bundle import ModelSources


class NotServable(RayrecError):
    """The workdir has not published what serving needs (names the step to run)."""


def published_sources(config: RayrecConfig) -> ModelSources:
    """The published models and tables of ``config``'s workdir (local), or :class:`NotServable`."""

    def folder(step: str, sub: str = "") -> tuple[Path, str]:
        current = published(config, step)
        path = current.path.local_path() / sub if current is not None else None
        if current is None or path is None or not path.exists():
            raise NotServable(f"no published {step} output{f' ({sub}/)' if sub else ''}: run it")
        return path, current.version

    two_tower, two_tower_version = folder("train_retrieval", "model")
    index, index_version = folder("index", "index")
    trained, trained_version = folder("train_ranker", "model")
    tables, _ = folder("validate")
    reranker, reranker_version = trained, trained_version
    finetuned = published(config, "finetune_ranker")
    if finetuned is not None and (finetuned.path.local_path() / "model").exists():
        reranker = finetuned.path.local_path() / "model"
        reranker_version = f"finetune_ranker/{finetuned.version}"
    else:
        reranker_version = f"train_ranker/{trained_version}"
    spec = trained / SPEC_FILE
    if not spec.exists():
        raise NotServable(f"{trained} has no {SPEC_FILE}: run train_ranker again")
    return ModelSources(
        two_tower=two_tower,
        index=index,
        reranker=reranker,
        reranker_spec=spec,
        users=tables / "users.parquet",
        items=tables / "items.parquet",
        versions={
            "two_tower": f"train_retrieval/{two_tower_version}",
            "index": f"index/{index_version}",
            "reranker": reranker_version,
        },
    )
