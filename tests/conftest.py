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

    from infra.config import RayConfig
    from infra.ray_runtime import ensure_ray

    ensure_ray(RayConfig(num_cpus=2, object_store_memory_mb=256))
    yield
    ray.shutdown()
