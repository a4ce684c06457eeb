"""Shared fixtures: real datasets when present, one Ray per session, tiny configs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.config import RayrecConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(
    os.environ.get("RAYREC_SHARED_DATASETS", REPO_ROOT.parent / "shared" / "datasets")
)


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets``; tests using it skip on a user's clone that lacks it."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(
            f"real datasets not found at {SHARED_DATASETS} (only on the project's machines)"
        )
    return SHARED_DATASETS


@pytest.fixture()
def tiny_config(tmp_path: Path) -> RayrecConfig:
    """The `tiny` preset with its workdir in a fresh temporary folder."""
    return load_config("tiny", [f"paths.workdir={tmp_path / 'workdir'}"], environ={})


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    from infra.config import RayConfig, RayrecConfig
    from infra.ray_runtime import ensure_ray
    from serving.app import ingress_environment

    # Serve apps in the session get the default ingress (serving.app.proxy), as users do.
    ingress_environment(RayrecConfig())
    ensure_ray(RayConfig(num_cpus=2, object_store_memory_mb=256))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_default_style_run(
    tmp_path_factory: pytest.TempPathFactory, ray_session: None
) -> RayrecConfig:
    """The tiny pipeline set up as the default preset runs it (retrieval split by time, its
    score a reranker input) up to the fine-tuned reranker, the index and the online store.

    Once per session, read-only for the modules that judge its outputs: each of its two
    Ray Train runs costs ~25 s of start-up alone. Untracked (no MLflow).
    """
    from pipelines.main import MAIN
    from pipelines.runner import run_pipeline

    workdir = tmp_path_factory.mktemp("tiny_default_style") / "wd"
    config = load_config(
        "tiny",
        [
            f"paths.workdir={workdir}",
            "models.split.kind=temporal",
            "models.ranker.retrieval_score=true",
        ],
        environ={},
    )
    for step in ("finetune_ranker", "index", "materialize"):
        run_pipeline(MAIN, config, until=step, track=False)
    return config
