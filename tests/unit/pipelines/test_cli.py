"""The CLI is a thin shell: help everywhere, one-line errors, non-zero exits."""

from __future__ import annotations

import pytest
import yaml

from pipelines.cli import main

COMMANDS = [
    [],
    ["run"],
    ["steps"],
    ["runs"],
    ["data"],
    ["data", "simulate"],
    ["data", "import"],
    ["data", "download"],
    ["data", "validate"],
    ["config", "show"],
    ["features"],
    ["features", "build"],
    ["features", "materialize"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "rayrec")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    assert "Usage: rayrec" in capsys.readouterr().out


def test_config_show_prints_the_resolved_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--preset", "tiny", "--set", "simulator.n_users=42"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["simulator"]["n_users"] == 42
    assert shown["preset"] == "tiny"


def test_unknown_key_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--set", "simulator.n_userz=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown config key 'simulator.n_userz' (from --set)"
    assert "Traceback" not in err


def test_unknown_step_is_named(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert (
        main(["run", "-p", "tiny", "--set", f"paths.workdir={tmp_path}", "--until", "nosuch"]) == 2
    )
    assert (
        "has no step 'nosuch'; steps: ingest, validate, summarize, features, train_retrieval, materialize"
        in capsys.readouterr().err
    )


def test_usage_errors_exit_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--no-such-flag"]) == 2
    assert "No such option" in capsys.readouterr().err
