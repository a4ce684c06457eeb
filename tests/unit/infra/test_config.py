from __future__ import annotations

from pathlib import Path

import pytest

from infra.config import PRESETS, RayrecConfig, load_config
from infra.errors import ConfigError


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads(preset: str) -> None:
    config = load_config(preset, environ={})
    assert isinstance(config, RayrecConfig)
    assert config.preset == preset


def test_tiny_is_smaller_than_default_is_smaller_than_large() -> None:
    sizes = [
        load_config(p, environ={}).simulator.world_size.impressions_per_day
        for p in ("tiny", "default", "large")
    ]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


def test_set_override_uses_the_yaml_key_path() -> None:
    config = load_config("tiny", ["simulator.n_users=123", "logging.level=DEBUG"], environ={})
    assert config.simulator.n_users == 123
    assert config.logging.level == "DEBUG"


def test_precedence_preset_then_env_then_set() -> None:
    env = {"RAYREC_SIMULATOR__N_USERS": "50", "RAYREC_SIMULATOR__N_DAYS": "3"}
    config = load_config("tiny", ["simulator.n_users=60"], environ=env)
    assert config.simulator.n_users == 60  # --set beats env
    assert config.simulator.n_days == 3  # env beats the preset (tiny says 5)


def test_single_level_rayrec_variables_are_not_config() -> None:
    assert load_config("tiny", environ={"RAYREC_DEBUG": "1"}).preset == "tiny"


@pytest.mark.parametrize(
    ("overrides", "environ", "expected"),
    [
        (["simulator.n_userz=5"], {}, "unknown config key 'simulator.n_userz' (from --set)"),
        ([], {"RAYREC_RAY__ADRESS": "x"}, "unknown config key 'ray.adress' (from environment)"),
        (["nosuchsection.key=1"], {}, "unknown config key 'nosuchsection'"),
    ],
)
def test_unknown_keys_are_named(
    overrides: list[str], environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides, environ=environ)
    assert expected in str(err.value)


def test_unknown_key_in_a_preset_file_names_the_file(tmp_path: Path) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("simulator:\n  n_items: 10\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"simulator.colour' \(from preset .*mine.yaml\)"):
        load_config(str(preset), environ={})


def test_invalid_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match="simulator.n_users"):
        load_config("tiny", ["simulator.n_users=-3"], environ={})


def test_malformed_set_is_rejected() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny", ["simulator.n_users"], environ={})


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="tiny, default, large"):
        load_config("huge", environ={})


def test_source_variant_is_chosen_by_kind() -> None:
    config = load_config("tiny", ["data.source={kind: movielens, path: /data/ml-100k}"], environ={})
    assert config.data.source.kind == "movielens"
    with pytest.raises(ConfigError, match="data.source"):
        load_config("tiny", ["data.source={kind: nosuch}"], environ={})


def test_section_hash_changes_only_with_its_section() -> None:
    base = load_config("tiny", environ={})
    other_sim = load_config("tiny", ["simulator.seed=99"], environ={})
    other_log = load_config("tiny", ["logging.level=DEBUG"], environ={})
    assert base.section_hash("simulator") != other_sim.section_hash("simulator")
    assert base.section_hash("simulator") == other_log.section_hash("simulator")
    assert base.section_hash() != other_log.section_hash()


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = load_config("default", ["simulator.n_users=77"], environ={})
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml())
    # The dump keeps `preset: default`, so a saved run config reloads identically.
    assert load_config(str(path), environ={}) == config
