"""Reranker search on a real local Ray and MLflow (SQLite): child runs, best trial, restore."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from infra.config import MlflowConfig, RankerConfig, RankerTuningConfig, SearchDimension
from infra.storage import StoragePath
from infra.tracking import setup_mlflow
from pipelines.ranker.data import ColumnSpec, RankerData, prepare_ranker_data
from pipelines.ranker.tuning import (
    TrialFault,
    TrialRow,
    TuningInterrupted,
    apply_sample,
    check_space,
    experiment_name,
    pareto_front,
    resume_tuning,
    tune_ranker,
)

EPOCHS = 3


def _data() -> RankerData:
    """2,000 clicks whose log-odds are a user bias + an item bias + 1.5·x: learnable in an epoch."""
    rng = np.random.default_rng(0)
    n, n_users, n_items = 2000, 40, 30
    users = rng.integers(0, n_users, n)
    items = rng.integers(0, n_items, n)
    x = rng.normal(size=n)
    logit = rng.normal(size=n_users)[users] + rng.normal(size=n_items)[items] + 1.5 * x
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    frame = pl.DataFrame({"user_id": users, "item_id": items, "x": x, "label": labels})
    spec = ColumnSpec(categorical=("user_id", "item_id"), numeric=("x",), user="user_id")
    return prepare_ranker_data(frame, spec, seed=0)


def _settings(trials: int, asha: bool) -> RankerConfig:
    space = {
        "learning_rate": SearchDimension(kind="loguniform", low=1e-3, high=1e-1),
        "embedding_dim": SearchDimension(kind="choice", values=(4, 8)),
        "finetune.lora_rank": SearchDimension(kind="choice", values=(2, 4)),
    }
    return RankerConfig(
        embedding_dim=4,
        n_experts=2,
        top_k=1,
        expert_hidden=(8,),
        expert_dim=8,
        batch_size=256,
        epochs=EPOCHS,
        # Patience >= epochs: only ASHA (when on) stops a trial early.
        patience=EPOCHS,
        tuning=RankerTuningConfig(
            enabled=True,
            trials=trials,
            max_concurrent=1,
            cpus_per_trial=1,
            asha=asha,
            grace_period=1,
            reduction_factor=2,
            space=space,
            seed=0,
        ),
    )


def _starts(markers: Path) -> dict[str, list[int]]:
    """Trial id -> the first epoch of each of its starts, in start order."""
    starts: dict[str, list[tuple[int, int]]] = {}
    for path in markers.glob("*.*"):  # not the flags "crashed", "interrupted"
        trial, ns = path.name.split(".")
        starts.setdefault(trial, []).append((int(ns), int(path.read_text())))
    return {trial: [epoch for _, epoch in sorted(s)] for trial, s in starts.items()}


def test_space_is_applied_and_invalid_spaces_are_refused() -> None:
    settings = _settings(trials=2, asha=True)
    sampled = apply_sample(settings, {"learning_rate": 0.02, "finetune": {"lora_rank": 4}})
    assert sampled.learning_rate == 0.02 and sampled.finetune.lora_rank == 4
    assert apply_sample(settings, {"finetune.lora_rank": 2}).finetune.lora_rank == 2
    bad = settings.model_copy(
        update={
            "tuning": settings.tuning.model_copy(
                update={"space": {"top_k": SearchDimension(kind="choice", values=(1, 4))}}
            )
        }
    )
    with pytest.raises(ValueError, match="top_k"):
        check_space(bad)
    fixed = settings.model_copy(
        update={
            "tuning": settings.tuning.model_copy(
                update={"space": {"epochs": SearchDimension(kind="int", low=1, high=4)}}
            )
        }
    )
    with pytest.raises(ValueError, match="epochs"):
        check_space(fixed)


def test_pareto_front_keeps_the_undominated_trials() -> None:
    def row(name: str, auc: float, seconds: float, memory: float) -> TrialRow:
        return TrialRow(name, {}, auc, 1, seconds, memory, "TERMINATED")

    a, b, c, d = (
        row("a", 0.80, 10, 100),
        row("b", 0.78, 5, 100),
        row("c", 0.77, 6, 100),
        (row("d", 0.76, 7, 50)),
    )
    # c is beaten by b on both; d is slower than b but lighter.
    assert [r.trial_id for r in pareto_front([a, b, c, d], costs=("training_s",))] == ["b", "a"]
    assert {r.trial_id for r in pareto_front([a, b, c, d])} == {"a", "b", "d"}


# Slow: every trial is a fresh Ray worker process (~10-20 s to start on a loaded 2-core machine).
@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_search_logs_child_runs_and_returns_the_best_trial(tmp_path: Path) -> None:
    data = _data()
    settings = _settings(trials=3, asha=True)
    experiment = setup_mlflow(
        MlflowConfig(experiment="tuning-test"), StoragePath.from_uri(tmp_path)
    )
    client = MlflowClient(mlflow.get_tracking_uri())
    with mlflow.start_run(experiment_id=experiment) as parent:
        result = tune_ranker(data, settings, tmp_path / "tune", parent.info.run_id)

    assert len(result.rows) == 3 and all(r.status == "TERMINATED" for r in result.rows)
    assert all(1 <= r.epochs <= EPOCHS and r.peak_memory_mb > 50 for r in result.rows)
    best = max(result.rows, key=lambda r: r.best_valid_auc)
    assert result.best_trial_id == best.trial_id
    assert result.best_valid_auc == best.best_valid_auc > 0.6
    assert result.best == apply_sample(settings, best.config)
    assert best in pareto_front(result.rows)

    children = client.search_runs(
        [experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.data.tags["rayrec.trial_id"] for r in children) == sorted(
        r.trial_id for r in result.rows
    )
    for child in children:
        row = next(r for r in result.rows if r.trial_id == child.data.tags["rayrec.trial_id"])
        assert float(child.data.params["learning_rate"]) == pytest.approx(
            row.config["learning_rate"]
        )
        assert "finetune.lora_rank" in child.data.params
        history = client.get_metric_history(child.info.run_id, "valid_auc")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(
            range(1, row.epochs + 1)
        )
    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id))
    saved = json.loads((artifacts / "tuning" / "best_config.json").read_text())
    assert saved["trial_id"] == result.best_trial_id
    assert RankerConfig.model_validate(saved["config"]) == result.best
    assert (artifacts / "tuning" / "auc_vs_seconds.png").stat().st_size > 1000


# Slow: every trial is a fresh Ray worker process (~10-20 s to start on a loaded 2-core machine).
@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_restore_reuses_finished_trials_and_resumes_the_interrupted_one(tmp_path: Path) -> None:
    data = _data()
    settings = _settings(trials=3, asha=False)
    # Trial 1 crashes after epoch 1 (Tune retries it from its checkpoint);
    # trial 2 then stops the whole search after its epoch 1, as Ctrl+C would.
    fault = TrialFault(
        marker_dir=tmp_path / "markers", crash_trial=1, interrupt_trial=2, driver_pid=os.getpid()
    )
    with pytest.raises(TuningInterrupted, match="resume_tuning"):
        tune_ranker(data, settings, tmp_path / "tune", fault=fault)
    before = _starts(fault.marker_dir)
    first = (fault.marker_dir / "crashed").read_text()
    second = (fault.marker_dir / "interrupted").read_text()
    assert before == {first: [1, 2], second: [1]}

    path = tmp_path / "tune" / experiment_name(settings, data)
    result = resume_tuning(path, data, fault=fault)
    after = _starts(fault.marker_dir)
    # The finished trial is not rerun; the interrupted one resumes at epoch 2
    # from its checkpoint; the rest of the budget (one trial) runs once.
    assert after[first] == [1, 2] and after[second] == [1, 2]
    assert sorted(after.values()) == [[1], [1, 2], [1, 2]]
    assert len(result.rows) == 3 and all(r.status == "TERMINATED" for r in result.rows)
    assert all(r.epochs == EPOCHS for r in result.rows)
    assert result.best_valid_auc == max(r.best_valid_auc for r in result.rows)

    # The same inputs again: the finished experiment is read back, nothing runs.
    again = tune_ranker(data, settings, tmp_path / "tune", fault=fault)
    assert _starts(fault.marker_dir) == after
    assert again.best_trial_id == result.best_trial_id
