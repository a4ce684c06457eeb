from __future__ import annotations

import json
import logging

import pytest

from infra.config import LoggingConfig
from infra.logs import configure_logging, get_logger, progress_enabled, track


def test_progress_is_quiet_in_ci_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    configure_logging(LoggingConfig(progress="auto"))
    assert not progress_enabled()
    configure_logging(LoggingConfig(progress="on"))
    assert progress_enabled()
    assert list(track(range(3), "counting", total=3)) == [0, 1, 2]
    configure_logging(LoggingConfig(progress="off"))
    assert not progress_enabled()


def test_json_logs_are_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LoggingConfig(format="json", level="INFO"))
    get_logger("rayrec.test").info("step.done", step="ingest", rows=3)
    get_logger("rayrec.test").debug("hidden")
    logging.getLogger("third.party").warning("plain stdlib record")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert (
        lines[0]["event"] == "step.done" and lines[0]["rows"] == 3 and lines[0]["level"] == "info"
    )
    assert lines[1]["event"] == "plain stdlib record"
    assert len(lines) == 2
    configure_logging(LoggingConfig())
