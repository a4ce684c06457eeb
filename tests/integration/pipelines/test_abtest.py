"""A/B simulation end to end: the serving path's trained models as arms, the CLI, MLflow."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from infra.config import RayrecConfig
from pipelines.abtest import AbTestSettings, run_abtest
from pipelines.cli import main

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def _torch_threads() -> Iterator[None]:
    """The serving path sets the process's torch threads: give the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _tracked_elsewhere(config: RayrecConfig, folder: Path) -> RayrecConfig:
    """The session's tiny run, models read from its published steps, MLflow in ``folder``
    (the shared workdir stays as the other modules expect it)."""
    return config.model_copy(
        update={
            "serving": config.serving.model_copy(update={"models_from": "published"}),
            "mlflow": config.mlflow.model_copy(
                update={
                    "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
                    "artifact_location": (folder / "artifacts").as_uri(),
                }
            ),
        }
    )


def test_retrieval_vs_reranked_on_the_trained_models(
    tiny_default_style_run: RayrecConfig, tmp_path: Path
) -> None:
    config = _tracked_elsewhere(tiny_default_style_run, tmp_path)
    settings = AbTestSettings(
        a="retrieval",
        b="reranked",
        users=config.simulator.world_size.n_users,
        days=3,
        requests_per_user_day=3.0,
        explore=0.5,
        candidates=20,
        bootstrap=200,
    )
    result, run_id = run_abtest(config, settings, track=True)
    record = result.to_dict()
    k = config.simulator.slate_size
    assert record["counts"]["impressions_a"] + record["counts"]["impressions_b"] == (
        record["counts"]["requests"] * k
    )
    for key in ("true_ctr_a", "true_ctr_b", "ab_ctr_a", "ab_ctr_b", "snips_ctr", "ips_ctr"):
        assert 0.0 < record[key] < 1.0, key
    assert record["ab_ci_low"] < record["ab_lift"] < record["ab_ci_high"]
    # reranked reorders retrieval's top `candidates`, which is A's exploration pool.
    assert record["ope_coverage"] == 1.0
    assert record["ope_matched_slots"] > 0

    assert run_id is not None
    client = MlflowClient(config.mlflow.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.params["abtest.a"] == "retrieval"
    assert run.data.metrics["true_lift"] == pytest.approx(record["true_lift"])
    artifacts = {a.path for a in client.list_artifacts(run_id, "abtest")}
    assert artifacts == {"abtest/daily_ctr.png", "abtest/bootstrap_lift.png", "abtest/abtest.json"}
    assert len(client.get_metric_history(run_id, "daily_ctr_a")) == 3
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


def test_cli_writes_the_record(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    code = main(
        [
            "abtest",
            "simulate",
            "--preset",
            "tiny",
            "--set",
            f"paths.workdir={tmp_path / 'wd'}",
            "--a",
            "popularity",
            "--b",
            "oracle",
            "--users",
            "300",
            "--days",
            "2",
            "--explore",
            "0.3",
            "--candidates",
            "15",
            "--no-track",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    record = json.loads(out.read_text())
    assert record["policy_b"] == "oracle" and record["true_lift"] > 0
    assert {"true_lift", "ab_lift", "ab_ci_low", "ab_ci_high", "ips_ctr", "snips_ctr"} <= set(
        record
    )
