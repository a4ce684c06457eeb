"""The step runner: skip, resume, atomic publish, lock, MLflow tracking.

Toy steps keep these tests about the runner; the real DAG runs in e2e.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from filelock import FileLock
from mlflow.tracking import MlflowClient

from infra.config import RayrecConfig, load_config
from infra.errors import PipelineLockedError, StepFailedError
from pipelines.dag import Pipeline
from pipelines.runner import published, run_pipeline
from pipelines.step import Step, StepContext, StepResult

CALLS: list[str] = []


def _numbers(ctx: StepContext) -> StepResult:
    CALLS.append("numbers")
    n = ctx.config.simulator.n_users
    ctx.output.join("numbers.txt").write_text_atomic("\n".join(str(i) for i in range(n)))
    return StepResult(row_counts={"numbers": n})


def _squares(ctx: StepContext) -> StepResult:
    CALLS.append("squares")
    numbers = ctx.input_path("numbers").join("numbers.txt").read_text().split()
    ctx.output.join("squares.txt").write_text_atomic("\n".join(str(int(x) ** 2) for x in numbers))
    return StepResult(
        row_counts={"squares": len(numbers)}, metrics={"max_square": float(int(numbers[-1]) ** 2)}
    )


def _failing_squares(ctx: StepContext) -> StepResult:
    ctx.output.join("squares.txt").write_text_atomic("0\n1\n")  # half written...
    raise OSError("disk full")  # ...then the crash


NUMBERS = Step("numbers", _numbers, "write 0..n-1", config_keys=("simulator.n_users",))
SQUARES = Step("squares", _squares, "square them", inputs=("numbers",))
TOY = Pipeline("toy", (NUMBERS, SQUARES))


@pytest.fixture()
def config(tmp_path: Path, mlflow_uri: str) -> RayrecConfig:
    return load_config(
        "tiny",
        [
            f"paths.workdir={tmp_path / 'wd'}",
            "simulator.n_users=5",
            f"mlflow.tracking_uri={mlflow_uri}",
        ],
        environ={},
    )


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One SQLite store per module: creating its schema costs seconds.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _with(config: RayrecConfig, *overrides: str) -> RayrecConfig:
    return load_config(
        "tiny",
        [
            f"paths.workdir={config.paths.workdir}",
            f"mlflow.tracking_uri={config.mlflow.tracking_uri}",
            *overrides,
        ],
        environ={},
    )


def test_rerun_with_same_inputs_is_skipped_and_content_is_identical(config: RayrecConfig) -> None:
    CALLS.clear()
    first = run_pipeline(TOY, config, track=False)
    assert [s.status for s in first.steps] == ["ran", "ran"]
    hash_before = published(config, "squares").manifest["content_hash"]  # type: ignore[union-attr]
    second = run_pipeline(TOY, config, track=False)
    assert [s.status for s in second.steps] == ["skipped", "skipped"]
    assert CALLS == ["numbers", "squares"]
    forced = run_pipeline(TOY, config, force=True, track=False)
    assert [s.status for s in forced.steps] == ["ran", "ran"]
    assert published(config, "squares").manifest["content_hash"] == hash_before  # type: ignore[union-attr]


def test_config_change_reruns_only_what_it_affects(config: RayrecConfig) -> None:
    run_pipeline(TOY, config, track=False)
    unrelated = run_pipeline(
        TOY, _with(config, "simulator.n_users=5", "logging.level=DEBUG"), track=False
    )
    assert [s.status for s in unrelated.steps] == ["skipped", "skipped"]
    changed = run_pipeline(TOY, _with(config, "simulator.n_users=7"), track=False)
    assert [s.status for s in changed.steps] == ["ran", "ran"]
    assert changed.step("squares").row_counts == {"squares": 7}


def test_until_runs_only_the_needed_steps(config: RayrecConfig) -> None:
    record = run_pipeline(TOY, config, until="numbers", track=False)
    assert [s.name for s in record.steps] == ["numbers"]
    assert published(config, "squares") is None


def test_crash_mid_step_keeps_the_previous_output_and_a_rerun_resumes(config: RayrecConfig) -> None:
    run_pipeline(TOY, config, track=False)
    good = published(config, "squares")
    assert good is not None
    broken = Pipeline(
        "toy", (NUMBERS, Step("squares", _failing_squares, "crashes", inputs=("numbers",)))
    )
    with pytest.raises(
        StepFailedError, match="squares failed, nothing published: OSError: disk full"
    ):
        run_pipeline(broken, _with(config, "simulator.n_users=6"), track=False)
    # numbers (n=6) was published; squares still points at the good n=5 version.
    assert published(config, "squares") == good
    assert good.path.join("squares.txt").read_text().split() == ["0", "1", "4", "9", "16"]
    staging = [
        p
        for p in Path(config.paths.workdir, "steps", "squares").iterdir()
        if p.name.startswith(".staging")
    ]
    assert staging == []
    CALLS.clear()
    resumed = run_pipeline(TOY, _with(config, "simulator.n_users=6"), track=False)
    assert [s.status for s in resumed.steps] == ["skipped", "ran"]
    assert CALLS == ["squares"]


def test_a_second_run_on_the_same_workdir_is_refused(config: RayrecConfig) -> None:
    lock = FileLock(Path(config.paths.workdir) / ".locks" / "toy.lock")
    Path(config.paths.workdir, ".locks").mkdir(parents=True)
    with lock, pytest.raises(PipelineLockedError, match="another run of pipeline 'toy'"):
        run_pipeline(TOY, config, track=False)
    assert published(config, "numbers") is None


def test_run_is_tracked_as_a_parent_with_one_child_per_step(config: RayrecConfig) -> None:
    record = run_pipeline(TOY, config, track=True)
    client = MlflowClient(config.mlflow.tracking_uri)
    parent = client.get_run(record.mlflow_run_id)
    assert parent.data.params["config_hash"] == record.config_hash[:12]
    assert parent.data.tags["rayrec.code_version"] == record.code_version
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{record.mlflow_run_id}'",
    )
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"numbers", "squares"}
    assert by_name["squares"].data.metrics["rows_squares"] == 5
    assert by_name["squares"].data.metrics["max_square"] == 16
    artifacts = {a.path for a in client.list_artifacts(record.mlflow_run_id)}
    assert {"config.yaml", "run_record.json"} <= artifacts


def test_a_failed_step_marks_parent_and_child_failed(config: RayrecConfig) -> None:
    broken = Pipeline(
        "toy", (NUMBERS, Step("squares", _failing_squares, "crashes", inputs=("numbers",)))
    )
    with pytest.raises(StepFailedError):
        run_pipeline(broken, config, track=True)
    client = MlflowClient(config.mlflow.tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("rayrec").experiment_id],
        order_by=["attributes.start_time DESC"],
        max_results=3,
    )
    statuses = {r.info.run_name.split("-")[0]: r.info.status for r in runs}
    assert statuses["squares"] == "FAILED"
    assert statuses["toy"] == "FAILED"
    assert statuses["numbers"] == "FINISHED"


def test_run_records_are_written(config: RayrecConfig) -> None:
    from pipelines.runner import list_runs

    record = run_pipeline(TOY, config, track=False)
    runs = list_runs(config)
    assert runs[0]["run_id"] == record.run_id
    assert runs[0]["status"] == "succeeded"
    assert runs[0]["steps"][0]["row_counts"] == {"numbers": 5}


def test_cycles_and_unknown_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown step"):
        Pipeline("bad", (Step("a", _numbers, "", inputs=("zzz",)),))
    with pytest.raises(ValueError, match="cycle"):
        Pipeline(
            "bad", (Step("a", _numbers, "", inputs=("b",)), Step("b", _numbers, "", inputs=("a",)))
        )
