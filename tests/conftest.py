"""Shared fixtures: real datasets when present, one Ray per session, tiny configs."""

from __future__ import annotations

import email
import email.policy
import os
import socket
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from infra.config import RayrecConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(
    os.environ.get("RAYREC_SHARED_DATASETS", REPO_ROOT.parent / "shared" / "datasets")
)


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets``; tests using it skip on a user's clone that lacks it."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(
            f"real datasets not found at {SHARED_DATASETS} (only on the project's machines)"
        )
    return SHARED_DATASETS


@pytest.fixture()
def tiny_config(tmp_path: Path) -> RayrecConfig:
    """The `tiny` preset with its workdir in a fresh temporary folder."""
    return load_config("tiny", [f"paths.workdir={tmp_path / 'workdir'}"], environ={})


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    from infra.config import RayConfig, RayrecConfig
    from infra.ray_runtime import ensure_ray
    from serving.app import ingress_environment

    # Serve apps in the session get the default ingress (serving.app.proxy), as users do.
    ingress_environment(RayrecConfig())
    ensure_ray(RayConfig(num_cpus=2, object_store_memory_mb=256))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_default_style_run(
    tmp_path_factory: pytest.TempPathFactory, ray_session: None
) -> RayrecConfig:
    """The tiny pipeline set up as the default preset runs it (retrieval split by time, its
    score a reranker input) up to the fine-tuned reranker, the index and the online store.

    Once per session, read-only for the modules that judge its outputs: each of its two
    Ray Train runs costs ~25 s of start-up alone. Untracked (no MLflow).
    """
    from pipelines.main import MAIN
    from pipelines.runner import run_pipeline

    workdir = tmp_path_factory.mktemp("tiny_default_style") / "wd"
    config = load_config(
        "tiny",
        [
            f"paths.workdir={workdir}",
            "models.split.kind=temporal",
            "models.ranker.retrieval_score=true",
        ],
        environ={},
    )
    for step in ("finetune_ranker", "index", "materialize"):
        run_pipeline(MAIN, config, until=step, track=False)
    return config


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function giving a free TCP port on 127.0.0.1, for servers a test starts
    (aiosmtpd's ``Controller(port=0)`` cannot find its own port; Serve needs one given)."""
    return _free_port


class SmtpInbox:
    """An aiosmtpd handler that keeps what arrived."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 Message accepted"

    @property
    def messages(self) -> list[EmailMessage]:
        return [
            email.message_from_bytes(env.original_content, policy=email.policy.default)
            for env in self.envelopes
        ]


class SmtpServer:
    """A started aiosmtpd ``controller``, its ``inbox`` and ``port``."""

    def __init__(self, controller: Any, inbox: SmtpInbox, port: int) -> None:
        self.controller, self.inbox, self.port = controller, inbox, port


@pytest.fixture()
def smtp_server(free_port: Callable[[], int]) -> Iterator[Callable[..., SmtpServer]]:
    """Starts real aiosmtpd servers on 127.0.0.1 (``port``, Controller keyword arguments:
    TLS, auth); stops them after the test."""
    from aiosmtpd.controller import Controller

    started: list[Any] = []

    def start(port: int | None = None, **kwargs: Any) -> SmtpServer:
        port = port or free_port()
        inbox = SmtpInbox()
        controller = Controller(inbox, hostname="127.0.0.1", port=port, **kwargs)
        server = SmtpServer(controller, inbox, port)
        controller.start()
        started.append(controller)
        return server

    yield start
    for controller in started:
        controller.stop()
