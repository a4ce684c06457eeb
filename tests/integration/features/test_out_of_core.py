"""The polars engine's build gives the same outputs in any number of entity partitions.

``build_features`` is one out-of-core path at every size (``features.partitions``,
``auto`` by the log's size); its examples are also checked against
:func:`build_training_frame` over the whole log in memory, the definition.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

import features.build
from features.build import (
    FeatureOutputs,
    build_features,
    build_features_out_of_core,
    partition_count,
    write_feature_outputs,
)
from features.dataset import read_events, read_table, write_events_by_date
from features.schemas import TS_DTYPE
from features.training_frame import build_training_frame, example_rows
from infra.config import FeaturesConfig, RayrecConfig, load_config
from infra.storage import StoragePath
from pipelines.cli import main
from pipelines.main import MAIN
from pipelines.runner import published, run_pipeline

IN_MEMORY_OUTPUTS = ("user_buckets", "item_buckets", "latest_user", "latest_item", "history")


def assert_same_outputs(ours: FeatureOutputs, theirs: FeatureOutputs) -> None:
    """Frames equal row for row, the same spec, the same sketch estimates."""
    assert ours.prior == theirs.prior and ours.as_of == theirs.as_of
    assert ours.n_examples == theirs.n_examples
    assert ours.examples.collect().equals(theirs.examples.collect())
    for name in IN_MEMORY_OUTPUTS:
        assert getattr(ours, name).equals(getattr(theirs, name)), name
    assert ours.spec == theirs.spec
    # HLLs merged day by day hold the registers of one build over everything: the
    # estimates agree exactly (the serialised bytes may not); Count-Min adds exactly.
    for name, blob in (
        ("user_diversity", "items_hll"),
        ("item_reach", "users_hll"),
        ("dau", "dau_hll"),
    ):
        mine, other = getattr(ours.sketches, name), getattr(theirs.sketches, name)
        assert mine.drop(blob).equals(other.drop(blob)), name
    assert ours.sketches.item_frequency.equals(theirs.sketches.item_frequency)


def with_partitions(config: FeaturesConfig, partitions: int) -> FeaturesConfig:
    return config.model_copy(update={"partitions": partitions})


def assert_examples_are_the_definition(
    outputs: FeatureOutputs,
    events: pl.LazyFrame,
    users: pl.DataFrame,
    items: pl.DataFrame,
    config: FeaturesConfig,
) -> None:
    """The examples equal :func:`build_training_frame` of every example row over the whole log."""
    definition = build_training_frame(
        example_rows(events).collect(), events, users, items, config, outputs.prior
    )
    assert outputs.examples.collect().equals(definition)


@pytest.fixture()
def validated(tiny_config: RayrecConfig) -> StoragePath:
    run_pipeline(MAIN, tiny_config, until="validate", track=False)
    current = published(tiny_config, "validate")
    assert current is not None
    return current.path


def test_out_of_core_equals_in_memory_and_leaves_only_the_examples(
    validated: StoragePath, tiny_config: RayrecConfig, tmp_path: Path
) -> None:
    users = read_table(validated.join("users.parquet"))
    items = read_table(validated.join("items.parquet"))
    config = tiny_config.features
    local = build_features(read_events(validated), users, items, config)
    out = StoragePath.from_uri(tmp_path / "out")
    partitioned = build_features_out_of_core(
        read_events(validated), users, items, with_partitions(config, 3), out
    )
    assert_same_outputs(local, partitioned)
    assert local.partitions == 1 and partitioned.partitions == 3
    assert_examples_are_the_definition(local, read_events(validated), users, items, config)
    # The spill folder is gone; the examples lie per UTC day as the in-memory writer lays them.
    assert [p.name for p in out.list_dir()] == ["examples"]
    reference = StoragePath.from_uri(tmp_path / "reference")
    write_events_by_date(local.examples.collect(), reference)
    relative = [f.path.removeprefix(reference.path) for f in reference.files()]
    assert [f.path.removeprefix(out.join("examples").path) for f in out.files()] == relative
    assert len(relative) > 1
    # Writing the outputs keeps the examples where the build put them.
    assert write_feature_outputs(partitioned, out)["examples"] == local.n_examples
    with pytest.raises(ValueError, match="built into"):
        write_feature_outputs(partitioned, StoragePath.from_uri(tmp_path / "elsewhere"))


START = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def hand_made_log() -> pl.DataFrame:
    """Two days, three users, four items; a duplicated impression; user 2 has no impression.

    With five partitions, some partitions are empty and user 2's partition has
    no impression (it still takes impressions, the whole log's choice, so it
    computes no rows the log does not learn from); the duplicated row gets
    the features of its twin and does not multiply in the key join.
    """
    h = dt.timedelta(hours=1)
    rows = [
        # ts, user, item, event_type, label, position, request_id, value
        (START + 10 * h, 0, 0, "impression", 1.0, 0, 0, None),
        (START + 10 * h, 0, 1, "impression", 0.0, 1, 0, None),
        (START + 10 * h, 0, 1, "impression", 0.0, 1, 0, None),
        (START + 12 * h, 1, 1, "impression", 1.0, 0, 1, None),
        (START + 12 * h, 1, 2, "impression", 0.0, 1, 1, None),
        (START + 13 * h, 2, 3, "click", 1.0, None, None, None),
        (START + 33 * h, 0, 2, "impression", 1.0, 0, 2, None),
        (START + 33 * h, 0, 3, "impression", 0.0, 1, 2, None),
        (START + 34 * h, 2, 0, "rating", 1.0, None, None, 4.0),
        (START + 47 * h, 1, 0, "impression", 0.0, 0, 3, None),
        (START + 47 * h, 1, 3, "impression", 1.0, 1, 3, None),
    ]
    columns = ["ts", "user_id", "item_id", "event_type", "label", "position", "request_id", "value"]
    frame = pl.DataFrame(rows, schema=columns, orient="row")
    return frame.select(
        pl.col("user_id").cast(pl.Int64),
        pl.col("item_id").cast(pl.Int64),
        pl.col("ts").cast(TS_DTYPE),
        pl.col("event_type").cast(pl.String),
        pl.col("label").cast(pl.Float64),
        pl.col("position").cast(pl.Int32),
        pl.col("request_id").cast(pl.Int64),
        pl.lit(None, pl.Float64).alias("propensity"),
        pl.col("value").cast(pl.Float64),
    )


def test_more_partitions_than_entities_with_a_duplicated_row(tmp_path: Path) -> None:
    data = StoragePath.from_uri(tmp_path / "data")
    write_events_by_date(hand_made_log(), data.join("events"))
    users = pl.DataFrame({"user_id": [0, 1, 2], "segment": ["a", "b", "a"]})
    items = pl.DataFrame(
        {"item_id": [0, 1, 2, 3], "category": ["x", "y", "x", "z"], "price": [1.0, 2.5, 3.0, 9.0]}
    )
    config = FeaturesConfig(windows_days=(1, 7), history_length=2)
    local = build_features(read_events(data), users, items, config)
    out = StoragePath.from_uri(tmp_path / "out")
    partitioned = build_features_out_of_core(
        read_events(data), users, items, with_partitions(config, 5), out
    )
    assert_same_outputs(local, partitioned)
    assert_examples_are_the_definition(local, read_events(data), users, items, config)
    examples = partitioned.examples.collect()
    assert examples.height == 9  # the impressions, the duplicate included
    assert examples.get_column("user_id").to_list() == [0, 0, 0, 1, 1, 0, 0, 1, 1]


def test_a_failed_build_leaves_no_spill_files(
    validated: StoragePath,
    tiny_config: RayrecConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    real = features.build.side_of_partition

    def fail_on_the_third_partition(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(features.build, "side_of_partition", fail_on_the_third_partition)
    out = StoragePath.from_uri(tmp_path / "out")
    with pytest.raises(RuntimeError, match="disk full"):
        build_features_out_of_core(
            read_events(validated),
            read_table(validated.join("users.parquet")),
            read_table(validated.join("items.parquet")),
            with_partitions(tiny_config.features, 3),
            out,
        )
    assert out.list_dir() == []


def test_cli_builds_out_of_core_and_publishes_what_the_in_memory_build_gives(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "workdir"
    argv = ["features", "build", "-p", "tiny", "--set", f"paths.workdir={workdir}"]
    assert main([*argv, "--set", "features.partitions=4"]) == 0
    config = load_config("tiny", [f"paths.workdir={workdir}"], environ={})
    current = published(config, "features")
    assert current is not None
    assert current.manifest["partitions"] == 4
    root = current.path
    assert not [p for p in root.list_dir() if p.name.startswith(".")]
    validated = published(config, "validate")
    assert validated is not None
    local = build_features(
        read_events(validated.path),
        read_table(validated.path.join("users.parquet")),
        read_table(validated.path.join("items.parquet")),
        config.features,
    )
    examples = pl.read_parquet(root.join("examples").path + "/**/*.parquet")
    assert examples.equals(local.examples.collect())
    assert current.manifest["row_counts"]["examples"] == local.n_examples


def test_auto_partitions_follow_the_log_size_and_give_the_same_outputs(
    validated: StoragePath, tiny_config: RayrecConfig, tmp_path: Path
) -> None:
    events = read_events(validated)
    n_events = events.select(pl.len()).collect().item()
    config = tiny_config.features
    assert config.partitions == "auto"
    assert partition_count(events, config) == 1  # tiny is far below the bound
    bound = n_events // 3 + 1  # three partitions' worth
    auto = config.model_copy(update={"events_per_partition": bound})
    assert partition_count(events, auto) == 3
    assert partition_count(events, with_partitions(auto, 2)) == 2  # a number wins
    users = read_table(validated.join("users.parquet"))
    items = read_table(validated.join("items.parquet"))
    single = build_features(events, users, items, with_partitions(config, 1))
    out = StoragePath.from_uri(tmp_path / "out")
    partitioned = build_features(events, users, items, auto, out)
    assert partitioned.partitions == 3 and partitioned.examples_at is not None
    assert_same_outputs(single, partitioned)


def test_the_step_at_auto_partitions_publishes_the_single_partition_build(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "workdir"
    overrides = [f"paths.workdir={workdir}", "features.events_per_partition=4000"]
    argv = ["features", "build", "-p", "tiny"] + [a for o in overrides for a in ("--set", o)]
    assert main(argv) == 0
    config = load_config("tiny", overrides, environ={})
    current, validated = published(config, "features"), published(config, "validate")
    assert current is not None and validated is not None
    events = read_events(validated.path)
    expected = -(-events.select(pl.len()).collect().item() // 4_000)
    assert expected > 1 and current.manifest["partitions"] == expected
    single = build_features(
        events,
        read_table(validated.path.join("users.parquet")),
        read_table(validated.path.join("items.parquet")),
        with_partitions(config.features, 1),
    )
    examples = pl.read_parquet(current.path.join("examples").path + "/**/*.parquet")
    assert examples.equals(single.examples.collect())
    assert current.manifest["row_counts"]["examples"] == single.n_examples
