"""The Evidently workspace every monitor run adds its reports to, and the UI that browses it.

One local :class:`evidently.ui.workspace.Workspace` per workdir
(``<workdir>/monitoring/evidently_workspace``), one project per monitor
(``rayrec <monitor>``), one run per report of a window (named
``<check> <window key>``; a rerun of a window replaces its runs). ``rayrec
monitor ui`` serves it with Evidently's own UI on ``monitoring.ui_port``
(8700: Serve and Evidently both default to 8000), on 127.0.0.1 unless told
otherwise, with Evidently's telemetry off (``DO_NOT_TRACK``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.logs import get_logger

if TYPE_CHECKING:
    from evidently.core.report import Snapshot

log = get_logger(__name__)

WORKSPACE_FOLDER = "evidently_workspace"
TELEMETRY_OFF = {"DO_NOT_TRACK": "1"}


def workspace_path(workdir: str | os.PathLike[str]) -> Path:
    return Path(workdir) / "monitoring" / WORKSPACE_FOLDER


def _project(workspace: Any, name: str) -> Any:
    found = [p for p in workspace.search_project(name) if p.name == name]
    if found:
        return found[0]
    project = workspace.create_project(name, description=f"rayrec drift reports of {name}")
    project.save()
    return project


def add_reports(
    folder: Path, monitor: str, window_key: str, snapshots: dict[str, Snapshot]
) -> list[str]:
    """Add each ``{check: snapshot}`` to the monitor's project as ``<check> <window_key>``,
    replacing the runs a previous run of the same window added; the run ids."""
    os.environ.update(TELEMETRY_OFF)
    from evidently.ui.workspace import Workspace

    folder.mkdir(parents=True, exist_ok=True)
    workspace = Workspace(str(folder))
    project = _project(workspace, f"rayrec {monitor}")
    names = {f"{check} {window_key}": snapshot for check, snapshot in snapshots.items()}
    for run in workspace.list_runs(project.id):
        metadata = workspace.get_run(project.id, run)
        if metadata is not None and metadata.name in names:
            workspace.delete_run(project.id, run)
    ids = []
    for name, snapshot in names.items():
        ref = workspace.add_run(project.id, snapshot, include_data=False, name=name)
        ids.append(str(ref.id))
    log.info("monitor.workspace", project=project.name, runs=len(ids), window=window_key)
    return ids


def serve_ui(folder: Path, host: str, port: int) -> None:
    """Evidently's UI over ``folder`` on ``host:port``, in the foreground (Ctrl-C stops it)."""
    os.environ.update(TELEMETRY_OFF)
    from evidently.ui.service.app import get_config, run

    folder.mkdir(parents=True, exist_ok=True)
    run(get_config(host=host, port=port, workspace=str(folder)))
