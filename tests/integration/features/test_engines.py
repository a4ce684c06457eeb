"""The ray engine gives the polars engine's outputs, exactly."""

from __future__ import annotations

import polars as pl
import pytest

from features.build import build_features
from features.dataset import read_events, read_table
from features.ray_engine import build_features_on_ray
from infra.config import RayrecConfig
from pipelines.main import MAIN
from pipelines.runner import published, run_pipeline


@pytest.fixture()
def validated(tiny_config: RayrecConfig):
    run_pipeline(MAIN, tiny_config, until="validate", track=False)
    current = published(tiny_config, "validate")
    assert current is not None
    return current.path


def test_ray_engine_equals_polars_engine(
    ray_session: None, validated, tiny_config: RayrecConfig
) -> None:
    users = read_table(validated.join("users.parquet"))
    items = read_table(validated.join("items.parquet"))
    config = tiny_config.features
    local = build_features(read_events(validated), users, items, config)
    # Three partitions: users and items of one partition never all share a block.
    distributed = build_features_on_ray(validated, users, items, config, partitions=3)
    assert local.prior == distributed.prior and local.as_of == distributed.as_of
    assert local.n_examples == distributed.n_examples
    assert local.examples.collect().equals(distributed.examples.collect())
    for name in (
        "user_buckets",
        "item_buckets",
        "latest_user",
        "latest_item",
        "history",
    ):
        ours, theirs = getattr(local, name), getattr(distributed, name)
        assert ours.columns == theirs.columns, name
        assert ours.equals(theirs), name
    assert local.spec == distributed.spec
    # Sketches: built per partition and merged equal one build over everything
    # (HLL estimates exactly, after canonicalisation; Count-Min counters add exactly).
    for name in ("user_diversity", "item_reach", "dau"):
        ours, theirs = getattr(local.sketches, name), getattr(distributed.sketches, name)
        estimate = next(c for c in ours.columns if c.endswith("_estimate"))
        assert ours.drop(estimate[: -len("_estimate")] + "_hll").equals(
            theirs.drop(estimate[: -len("_estimate")] + "_hll")
        ), name
    assert local.sketches.item_frequency.equals(distributed.sketches.item_frequency)
    assert (
        local.n_examples
        == pl.from_arrow(
            read_events(validated).filter(pl.col("event_type") == "impression").collect().to_arrow()
        ).height
    )


def test_features_step_on_the_ray_engine(ray_session: None, tiny_config: RayrecConfig) -> None:
    config = tiny_config.model_copy(
        update={"features": tiny_config.features.model_copy(update={"engine": "ray"})}
    )
    record = run_pipeline(MAIN, config, until="features", track=False)
    assert record.step("features").status == "ran"
    manifest = published(config, "features").manifest  # type: ignore[union-attr]
    assert manifest["engine"] == "ray"
    assert manifest["row_counts"]["examples"] > 0
