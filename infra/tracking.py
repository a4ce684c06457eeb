"""MLflow set-up: SQLite plus a local artifact folder by default, any URI by config."""

from __future__ import annotations

import mlflow
from mlflow.tracking import MlflowClient

from infra.config import MlflowConfig
from infra.storage import StoragePath


def tracking_uri(config: MlflowConfig, workdir: StoragePath) -> str:
    """The configured URI, else SQLite in ``<workdir>/mlflow`` (no server needed)."""
    if config.tracking_uri:
        return config.tracking_uri
    if not workdir.is_local:
        raise ValueError("a remote workdir needs mlflow.tracking_uri set (no local SQLite there)")
    folder = workdir.local_path() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def artifact_location(config: MlflowConfig, workdir: StoragePath) -> str | None:
    if config.artifact_location:
        return config.artifact_location
    if workdir.is_local:
        return (workdir.local_path() / "mlflow" / "artifacts").as_uri()
    return None


def setup_mlflow(config: MlflowConfig, workdir: StoragePath) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    uri = tracking_uri(config, workdir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is None:
        experiment_id = client.create_experiment(
            config.experiment, artifact_location=artifact_location(config, workdir)
        )
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id
