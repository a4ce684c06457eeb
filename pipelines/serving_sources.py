"""Where the request path finds the pipeline's models: :class:`serving.bundle.ModelSources`.

Serving may not import ``pipelines`` (it reads plain folders); this is the
pipeline side of that hand-over, from either of two places
(``serving.models_from``):

- ``champion`` (default): the MLflow registry's ``@champion`` of the
  retrieval model (its pyfunc carries the two-tower, the index and the
  feature spec) and of the reranker (model and its spec), downloaded once per
  version into ``<workdir>/serving/models/``;
- ``published``: the published step versions of the workdir (no tracking
  needed: tests, ``--no-track`` runs). The reranker is the fine-tuned one
  when ``finetune_ranker`` published a model (it beat the base on the newest
  days), else ``train_ranker``'s, as :mod:`pipelines.steps.two_stage` judges
  it; both read the spec saved beside ``train_ranker``'s model.

The static attribute tables (users, items) are data, not models: always the
workdir's published ``validate`` output.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from features.feature_spec import SPEC_FILE
from infra.config import RayrecConfig
from infra.errors import RayrecError
from infra.storage import StoragePath
from pipelines.runner import published
from serving.bundle import ModelSources

CHAMPION = "champion"


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


def serving_sources(config: RayrecConfig) -> ModelSources:
    """The sources ``serving.models_from`` names (:class:`NotServable` when absent)."""
    if config.serving.models_from == "published":
        return published_sources(config)
    return champion_sources(config)


def champion_sources(config: RayrecConfig) -> ModelSources:
    """The ``@champion`` versions of the retrieval and ranker models in the MLflow registry."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from infra.tracking import tracking_uri

    uri = tracking_uri(config.mlflow, StoragePath.from_uri(config.paths.workdir))
    client = MlflowClient(uri, registry_uri=uri)
    cache = StoragePath.from_uri(config.paths.workdir).local_path() / "serving" / "models"

    def download(name: str) -> tuple[dict[str, Path], str]:
        try:
            version = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException as exc:
            raise NotServable(
                f"no {name}@{CHAMPION} in the MLflow registry ({uri}): run the pipeline with tracking"
            ) from exc
        folder = cache / f"{name}-v{version.version}"
        if not (folder / "DOWNLOADED").exists():
            mlflow.set_tracking_uri(uri)
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version.version}", dst_path=str(folder)
            )
            StoragePath.from_uri(str(folder / "DOWNLOADED")).write_text_atomic(str(version.version))
        return _pyfunc_artifacts(folder), f"{name}/v{version.version}"

    retrieval, retrieval_version = download(config.models.retrieval.registered_model)
    ranker, ranker_version = download(config.models.ranker.registered_model)
    for needed, have, name in (
        (("model", "index"), retrieval, config.models.retrieval.registered_model),
        (("model", "feature_spec"), ranker, config.models.ranker.registered_model),
    ):
        missing = [a for a in needed if a not in have]
        if missing:
            raise NotServable(f"{name}@{CHAMPION} lacks artifact(s) {missing}: register it again")
    tables, _ = _published_folder(config, "validate")
    return ModelSources(
        two_tower=retrieval["model"],
        index=retrieval["index"],
        reranker=ranker["model"],
        reranker_spec=ranker["feature_spec"],
        users=tables / "users.parquet",
        items=tables / "items.parquet",
        versions={
            "two_tower": retrieval_version,
            "index": retrieval_version,
            "reranker": ranker_version,
        },
    )


def _pyfunc_artifacts(folder: Path) -> dict[str, Path]:
    """The artifacts of a downloaded pyfunc model, by the names they were logged under."""
    mlmodel = next(folder.rglob("MLmodel"), None)
    if mlmodel is None:
        raise NotServable(f"{folder}: no MLmodel file in the downloaded model")
    flavor = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"]
    return {
        name: mlmodel.parent / entry["path"] for name, entry in flavor.get("artifacts", {}).items()
    }


def _published_folder(config: RayrecConfig, step: str) -> tuple[Path, str]:
    current = published(config, step)
    path = current.path.local_path() if current is not None else None
    if current is None or path is None or not path.exists():
        raise NotServable(f"no published {step} output: run it")
    return path, current.version
