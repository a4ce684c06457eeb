"""``simulator.scale``: the size knob multiplies the world once, and only once.

Numbers by hand from the tiny preset (300 users, 200 items, 2,000 impressions a
day in slates of 5, so 400 requests a day) and the default one (20,000 users,
5,000 items, 60,000 impressions a day).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from features.simulator import ClickLogSimulator
from infra.config import RayrecConfig, WorldSize, load_config
from infra.errors import ConfigError


def test_scale_one_is_the_base_world() -> None:
    simulator = load_config("default", environ={}).simulator
    assert simulator.scale == 1.0
    assert simulator.world_size == WorldSize(
        n_users=20_000, n_items=5_000, impressions_per_day=60_000
    )


def test_scale_multiplies_users_items_and_impressions() -> None:
    simulator = load_config("default", ["simulator.scale=15"], environ={}).simulator
    assert simulator.world_size == WorldSize(
        n_users=300_000, n_items=75_000, impressions_per_day=900_000
    )
    # The base fields keep what was asked: the knob is the one place the factor lives.
    assert (simulator.n_users, simulator.n_items) == (20_000, 5_000)


def test_scale_two_doubles_the_world_the_simulator_builds() -> None:
    base = ClickLogSimulator(load_config("tiny", environ={}).simulator, threads=1)
    doubled = ClickLogSimulator(
        load_config("tiny", ["simulator.scale=2"], environ={}).simulator, threads=1
    )
    assert (base.users.height, base.items.height) == (300, 200)
    assert (doubled.users.height, doubled.items.height) == (600, 400)
    assert (base.traffic.requests_per_day, doubled.traffic.requests_per_day) == (400, 800)
    # Day 0's impressions: one row per shown slot, requests x slate size.
    one_day = [
        sum(
            chunk.filter(chunk["event_type"] == "impression").height
            for chunk in sim.iter_event_chunks([0])
        )
        for sim in (base, doubled)
    ]
    assert one_day == [400 * 5, 800 * 5]
    # Users drawn for traffic come from the whole scaled population.
    assert int(doubled.traffic.day_schedule(0).users.max()) >= 300


def test_fractional_scale_shrinks_the_default_world() -> None:
    simulator = load_config("default", ["simulator.scale=0.05"], environ={}).simulator
    assert simulator.world_size == WorldSize(n_users=1_000, n_items=250, impressions_per_day=3_000)
    assert simulator.n_initial_items == 200  # 80% of the scaled catalogue is live on day 0


def test_dump_and_reload_does_not_scale_twice(tmp_path: Path) -> None:
    config = load_config("default", ["simulator.scale=4"], environ={})
    # As tracking logs it and later steps reload it ...
    reloaded = RayrecConfig.model_validate_json(config.model_dump_json())
    assert reloaded.simulator.scale == 4.0
    assert reloaded.simulator.world_size == config.simulator.world_size
    assert reloaded.simulator.world_size.n_users == 80_000
    # ... and as a resolved YAML used as a preset file.
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(config.to_yaml())
    again = load_config(str(dumped), environ={})
    assert again.simulator.world_size == config.simulator.world_size
    assert again.section_hash("simulator") == config.section_hash("simulator")


def test_scale_changes_the_simulator_fingerprint() -> None:
    # Ingest's fingerprint hashes the simulator section: a new scale is a new log.
    one = load_config("tiny", environ={})
    two = load_config("tiny", ["simulator.scale=2"], environ={})
    assert one.section_hash("simulator") != two.section_hash("simulator")


@pytest.mark.parametrize("value", ["0", "-1"])
def test_scale_must_be_positive(value: str) -> None:
    with pytest.raises(ConfigError, match="simulator.scale"):
        load_config("tiny", [f"simulator.scale={value}"], environ={})


def test_environment_spelling_sets_the_scale() -> None:
    config = load_config("tiny", environ={"RAYREC_SIMULATOR__SCALE": "3"})
    assert config.simulator.world_size.n_users == 900


def test_checks_use_the_scaled_catalogue() -> None:
    # tiny at 0.05: 10 items, 8 live on day 0, fewer than its candidate pool of 15.
    with pytest.raises(ConfigError, match="candidate_pool 15 exceeds the 8 items"):
        load_config("tiny", ["simulator.scale=0.05"], environ={})
