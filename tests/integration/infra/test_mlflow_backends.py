"""MLflow set-up against real backends: SQLite (default) and PostgreSQL on 127.0.0.1."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from infra.config import MlflowConfig
from infra.storage import StoragePath
from infra.tracking import setup_mlflow, tracking_uri

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


def test_default_is_sqlite_in_the_workdir_with_local_artifacts(tmp_path: Path) -> None:
    workdir = StoragePath.from_uri(tmp_path)
    assert tracking_uri(MlflowConfig(), workdir) == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    experiment_id = setup_mlflow(MlflowConfig(experiment="sqlite-test"), workdir)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metric("answer", 42.0)
        mlflow.log_text("hello", "note.txt")
    client = MlflowClient(tracking_uri(MlflowConfig(), workdir))
    assert client.get_run(run.info.run_id).data.metrics["answer"] == 42.0
    assert (tmp_path / "mlflow" / "artifacts").is_dir()
    assert any((tmp_path / "mlflow" / "artifacts").rglob("note.txt"))


@pytest.fixture()
def postgres_uri() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL, dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL reachable on 127.0.0.1:5432 ({str(exc).strip()})")
    name = f"rayrec_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


@pytest.mark.postgres
def test_a_run_logs_to_postgresql(postgres_uri: str, tmp_path: Path) -> None:
    config = MlflowConfig(
        tracking_uri=postgres_uri,
        artifact_location=(tmp_path / "artifacts").as_uri(),
        experiment="pg",
    )
    experiment_id = setup_mlflow(config, StoragePath.from_uri(tmp_path))
    with mlflow.start_run(experiment_id=experiment_id, run_name="pg-run") as run:
        mlflow.log_param("backend", "postgresql")
        for step in range(3):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    client = MlflowClient(postgres_uri)
    stored = client.get_run(run.info.run_id)
    assert stored.data.params["backend"] == "postgresql"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [
        1.0,
        0.5,
        1.0 / 3,
    ]
    assert stored.info.artifact_uri.startswith((tmp_path / "artifacts").as_uri())
