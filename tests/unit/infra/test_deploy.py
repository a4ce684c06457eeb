"""infra/deploy: the Dockerfiles, the compose file and the KubeRay manifests, parsed and checked.

Nothing here needs Docker, Kubernetes or a running Ray: the files are read as
YAML/text, the Serve config is rebuilt through Serve's own builder call, and
the CronJobs' submit script runs under bash with a stand-in ``ray``.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from packaging.requirements import Requirement

from infra.config import RayrecConfig, load_config
from pipelines import deploy
from pipelines.cli import main
from serving.bundle import ModelSources

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "infra" / "deploy"
K8S = DEPLOY / "k8s"


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return deploy.render("default")


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict[str, Any]]]:
    return {name: list(yaml.safe_load_all((K8S / name).read_text())) for name in deploy.MANIFESTS}


@pytest.fixture(scope="module")
def cluster_config() -> RayrecConfig:
    """The default preset as the pods see it (their ConfigMap's environment)."""
    return load_config("default", environ=deploy.DEFAULT_ENV)


def _pin(name: str) -> Requirement:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return next(r for r in map(Requirement, project["dependencies"]) if r.name == name)


def _dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), flags=re.M))


# --------------------------------------------------------------------------- generated = committed


def test_committed_manifests_are_the_default_render(rendered: dict[str, str]) -> None:
    assert sorted(rendered) == sorted(deploy.MANIFESTS)
    for name, text in rendered.items():
        assert (K8S / name).read_text() == text, f"{name}: run `rayrec deploy render`"
    assert sorted(p.name for p in K8S.iterdir()) == sorted(deploy.MANIFESTS)


def test_cli_render_writes_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    assert main(["deploy", "render", "--out", str(out)]) == 0
    assert main(["deploy", "render", "--out", str(out), "--check"]) == 0
    for name in deploy.MANIFESTS:
        assert (out / name).read_text() == (K8S / name).read_text()
    (out / "cronjobs.yaml").write_text("# edited by hand\n")
    assert main(["deploy", "render", "--out", str(out), "--check"]) == 1


def test_render_follows_the_config() -> None:
    jobs = (
        "schedule.jobs={monitor: {command: [monitor, run], cron: '*/5 * * * *'}, "
        "retrain: {command: [run], cron: '0 3 * * 0', enabled: false}}"
    )
    files = deploy.render("tiny", [jobs])
    crons = {
        d["metadata"]["labels"]["rayrec/job"]: d for d in yaml.safe_load_all(files["cronjobs.yaml"])
    }
    assert set(crons) == {"monitor", "retrain"}
    assert crons["monitor"]["spec"]["schedule"] == "*/5 * * * *"
    assert crons["retrain"]["spec"]["suspend"] is True
    container = crons["monitor"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == [
        "rayrec", "schedule", "fire", "monitor", "--preset", "tiny", "--set", jobs
    ]  # fmt: skip
    serve = yaml.safe_load(yaml.safe_load(files["rayservice.yaml"])["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"] == {
        "preset": "tiny",
        "overrides": [jobs],
        "revision": 0,
    }


# --------------------------------------------------------------------------- KubeRay


def test_kinds_and_api_versions(manifests: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {name: [(d["apiVersion"], d["kind"]) for d in docs] for name, docs in manifests.items()}
    assert kinds["base.yaml"] == [("v1", "ConfigMap"), ("v1", "PersistentVolumeClaim")]
    assert kinds["raycluster.yaml"] == [("ray.io/v1", "RayCluster")]
    assert kinds["rayservice.yaml"] == [("ray.io/v1", "RayService")]
    assert kinds["rayjob.yaml"] == [("ray.io/v1", "RayJob")]
    assert set(kinds["cronjobs.yaml"]) == {("batch/v1", "CronJob")}


def _pods(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group, group spec, container) of the head and each worker group."""
    head = cluster["headGroupSpec"]
    groups = [("head", head, head["template"]["spec"]["containers"][0])]
    for group in cluster["workerGroupSpecs"]:
        groups.append((group["groupName"], group, group["template"]["spec"]["containers"][0]))
    return groups


def test_ray_cluster_has_cpu_and_gpu_worker_groups(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    cluster = manifests["raycluster.yaml"][0]["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {name: (group, container) for name, group, container in _pods(cluster)}
    assert set(groups) == {"head", "cpu", "gpu"}
    assert groups["head"][0]["rayStartParams"]["num-cpus"] == "0"
    for name in ("cpu", "gpu"):
        group, container = groups[name]
        assert "rayStartParams" in group
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits
        assert int(limits["cpu"]) >= 1 and limits["memory"].endswith("Gi")
    gpu_group, gpu = groups["gpu"]
    assert int(gpu["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    # GPU nodes cost money idle: scaled from zero when a task asks for a GPU.
    assert gpu_group["minReplicas"] == 0
    assert "nvidia.com/gpu" not in groups["cpu"][1]["resources"]["limits"]
    assert gpu["image"].endswith("-gpu") and groups["cpu"][1]["image"].endswith("-cpu")
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_group["template"]["spec"]["tolerations"])


def test_every_ray_pod_shares_the_workdir_and_env(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    claim = manifests["base.yaml"][1]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    clusters = [
        manifests["raycluster.yaml"][0]["spec"],
        manifests["rayservice.yaml"][0]["spec"]["rayClusterConfig"],
        manifests["rayjob.yaml"][0]["spec"]["rayClusterSpec"],
    ]
    for cluster in clusters:
        assert cluster["rayVersion"] == ray.__version__
        for _, group, container in _pods(cluster):
            pod = group["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert (
                volumes["workdir"]["persistentVolumeClaim"]["claimName"]
                == claim["metadata"]["name"]
            )
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert mounts["workdir"] == deploy.DEFAULT_ENV["RAYREC_PATHS__WORKDIR"]
            assert mounts["dshm"] == "/dev/shm"
            assert container["envFrom"] == [{"configMapRef": {"name": deploy.ENV_CONFIG_MAP}}]


def test_config_map_is_config(manifests: dict[str, list[dict[str, Any]]]) -> None:
    data = manifests["base.yaml"][0]["data"]
    assert all(isinstance(v, str) for v in data.values())
    config = load_config("default", environ=data)
    assert config.mlflow.tracking_uri == "http://mlflow:5000"
    assert config.features.online_store.kind == "redis"
    assert config.serving.app.host == "0.0.0.0"
    assert data["RAY_SERVE_ENABLE_HA_PROXY"] == (
        "1" if config.serving.app.proxy == "haproxy" else "0"
    )


def test_images_match_the_dockerfile_and_pins(manifests: dict[str, list[dict[str, Any]]]) -> None:
    args = _dockerfile_args(DEPLOY / "Dockerfile")
    # One Ray everywhere: the base image, pyproject's pin, the manifests; this venv
    # by minor version (pyproject's range lets a patch release in here first).
    assert _pin("ray").specifier.contains(args["RAY_VERSION"])
    assert args["RAY_VERSION"].split(".")[:2] == ray.__version__.split(".")[:2]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = set()
    for docs in manifests.values():
        images |= set(re.findall(r"image: (\S+)", yaml.safe_dump_all(docs)))
    assert images == {f"rayrec:{version}-cpu", f"rayrec:{version}-gpu"}


def test_ray_job_runs_the_main_pipeline(manifests: dict[str, list[dict[str, Any]]]) -> None:
    job = manifests["rayjob.yaml"][0]
    assert job["metadata"]["generateName"] == "rayrec-main-"
    assert shlex.split(job["spec"]["entrypoint"]) == ["rayrec", "run", "--preset", "default"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["rayClusterSpec"] == manifests["raycluster.yaml"][0]["spec"]


def test_one_cron_job_per_scheduled_job(
    manifests: dict[str, list[dict[str, Any]]], cluster_config: RayrecConfig
) -> None:
    schedule = cluster_config.schedule
    crons = {d["metadata"]["labels"]["rayrec/job"]: d for d in manifests["cronjobs.yaml"]}
    assert set(crons) == set(schedule.jobs)
    for name, job in schedule.jobs.items():
        cron = crons[name]
        assert cron["metadata"]["name"] == f"rayrec-{name}"
        spec = cron["spec"]
        assert spec["schedule"] == job.cron
        assert spec["timeZone"] == schedule.timezone
        assert spec["suspend"] is (not job.enabled)
        # rayrec schedule's rules: no overlap, one catch-up run within the grace.
        assert spec["concurrencyPolicy"] == "Forbid"
        assert spec["startingDeadlineSeconds"] == schedule.misfire_grace_s
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        (container,) = pod["containers"]
        assert container["args"] == ["rayrec", "schedule", "fire", name, "--preset", "default"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAYREC_SCHEDULE__JOBS_ADDRESS"] == "http://rayrec-head-svc:8265"
        assert container["envFrom"] == [{"configMapRef": {"name": deploy.ENV_CONFIG_MAP}}]
        assert container["volumeMounts"] == [
            {"name": "workdir", "mountPath": cluster_config.paths.workdir}
        ]


def test_cron_jobs_run_rayrec_commands(manifests: dict[str, list[dict[str, Any]]]) -> None:
    """What `rayrec schedule fire` submits from a CronJob's pod: `rayrec <command>`."""
    from pipelines.schedule import ConfigArgs, job_entrypoint

    for cron in manifests["cronjobs.yaml"]:
        (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        env = dict(manifests["base.yaml"][0]["data"])
        env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
        config = load_config("default", environ=env)
        job = config.schedule.jobs[container["args"][3]]
        address = env["RAYREC_SCHEDULE__JOBS_ADDRESS"]
        entrypoint = job_entrypoint(config, ConfigArgs("default", ()), job, address)
        assert shlex.split(entrypoint) == [
            "rayrec", *job.command, "--preset", "default",
            "--set", "paths.workdir=/home/ray/workdir",
        ]  # fmt: skip


def _fire(tmp_path: Path, job_name: str) -> list[str]:
    """Run a CronJob's container command with a `rayrec` that prints its arguments."""
    cron = next(yaml.safe_load_all((K8S / "cronjobs.yaml").read_text()))
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "rayrec").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    (fake / "rayrec").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "JOB_NAME": job_name}
    done = subprocess.run(
        [*container["command"], *container["args"]],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()


def test_cron_slot_becomes_the_logical_date(tmp_path: Path) -> None:
    import datetime as dt

    from pipelines.schedule import submission_id

    # CronJob Jobs are <cronjob>-<scheduled minute since the epoch>: 2026-12-07 02:00 UTC.
    slot = 1_796_608_800 // 60
    argv = _fire(tmp_path, f"rayrec-features-{slot}")
    assert argv[:5] == ["schedule", "fire", "features", "--preset", "default"]
    assert argv[5:7] == ["--scheduled", "--at"]
    at = dt.datetime.fromisoformat(argv[7])
    assert at == dt.datetime(2026, 12, 7, 2, 0, tzinfo=dt.UTC)
    assert submission_id("features", at, "UTC") == "features-2026-12-07T0200"
    # ... options the real command has.
    import typer

    from pipelines.cli import app

    fire = typer.main.get_command(app).commands["schedule"].commands["fire"]  # type: ignore[attr-defined]
    assert {"scheduled", "at", "preset"} <= {p.name for p in fire.params}
    # A Job made by hand from the CronJob fires for the current minute.
    assert _fire(tmp_path, "manual-run") == ["schedule", "fire", "features", "--preset", "default"]


# --------------------------------------------------------------------------- Serve


def _serve_config(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return yaml.safe_load(manifests["rayservice.yaml"][0]["spec"]["serveConfigV2"])


def test_serve_config_is_valid_and_follows_serving_app(
    manifests: dict[str, list[dict[str, Any]]], cluster_config: RayrecConfig
) -> None:
    from ray.serve.schema import ServeDeploySchema

    serve = _serve_config(manifests)
    ServeDeploySchema.model_validate(serve)
    app = cluster_config.serving.app
    assert serve["http_options"] == {
        "host": "0.0.0.0",
        "port": app.port,
        "request_timeout_s": app.request_timeout_s,
    }
    assert app.port != 8000
    (application,) = serve["applications"]
    assert application["name"] == app.name and application["route_prefix"] == app.route_prefix
    (deployment,) = application["deployments"]
    assert deployment == {
        "name": "Recommender",
        "num_replicas": app.num_replicas,
        "max_ongoing_requests": app.max_ongoing_requests,
        "max_queued_requests": app.max_queued_requests,
        "graceful_shutdown_timeout_s": 5.0,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 10.0,
        "ray_actor_options": {"num_cpus": app.num_cpus},
    }
    # The container port KubeRay's serve Service targets is the one Serve listens on.
    cluster = manifests["rayservice.yaml"][0]["spec"]["rayClusterConfig"]
    for _, _, container in _pods(cluster):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == app.port


def _build_as_serve_does(serve: dict[str, Any]) -> Any:
    """What the Serve controller does with the config: import, call the builder with args, build."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    (application,) = serve["applications"]
    builder = import_attr(application["import_path"])
    app = call_user_app_builder_with_args_if_necessary(builder, application["args"])
    return build_app(app, name=application["name"])


def test_serve_config_equals_what_the_builder_builds(
    manifests: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.serve.deployment import deployment_to_schema

    from pipelines import serve_app
    from pipelines.serving_sources import NotServable

    def nothing_yet(config: RayrecConfig) -> ModelSources:
        raise NotServable("no champion yet")

    monkeypatch.setattr(serve_app, "serving_sources", nothing_yet)
    for name, value in deploy.DEFAULT_ENV.items():
        monkeypatch.setenv(name, value)
    serve = _serve_config(manifests)
    built = _build_as_serve_does(serve)
    (declared,) = serve["applications"][0]["deployments"]
    (deployment,) = built.deployments
    assert deployment.name == declared["name"]
    # Every option the config declares is the builder's own value (none is an override).
    assert deployment.num_replicas == declared["num_replicas"]
    assert deployment.max_ongoing_requests == declared["max_ongoing_requests"]
    assert deployment.max_queued_requests == declared["max_queued_requests"]
    assert deployment.ray_actor_options == declared["ray_actor_options"]
    config = deployment._deployment_config
    for option in (
        "graceful_shutdown_timeout_s",
        "health_check_period_s",
        "health_check_timeout_s",
    ):
        assert getattr(config, option) == declared[option]
    # ... and the render is exactly serve build's schema of the built app, less the models.
    assert (
        deploy.serve_config(load_config("default", environ=deploy.DEFAULT_ENV), "default") == serve
    )
    assert "user_config" not in declared
    assert deployment.user_config == {"sources": None, "generation": 0}
    # The replicas are built from the pods' config (the ConfigMap applies on the cluster).
    (init_config,) = deployment.init_args
    assert init_config["serving"]["app"]["host"] == "0.0.0.0"
    assert deployment_to_schema(deployment).name == "Recommender"


def test_builder_starts_on_the_champion(
    manifests: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pipelines import serve_app

    sources = ModelSources(
        *(tmp_path / part for part in ("tt", "index", "rr", "spec.json", "u.pq", "i.pq")),
        versions={
            "two_tower": "rayrec-retrieval/v3",
            "index": "rayrec-retrieval/v3",
            "reranker": "r/v2",
        },
    )
    monkeypatch.setattr(serve_app, "serving_sources", lambda config: sources)
    (deployment,) = _build_as_serve_does(_serve_config(manifests)).deployments
    assert deployment.user_config["generation"] == 1
    assert deployment.user_config["sources"]["two_tower"] == str(tmp_path / "tt")
    assert deployment.user_config["sources"]["versions"]["reranker"] == "r/v2"


def test_builder_args_are_typed() -> None:
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from pipelines.serve_app import build

    with pytest.raises(ValueError, match="extra"):
        call_user_app_builder_with_args_if_necessary(build, {"preset": "default", "typo": 1})


# --------------------------------------------------------------------------- images


def test_dockerfile_variants_and_pins() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    args = _dockerfile_args(DEPLOY / "Dockerfile")
    (base,) = re.findall(r"^FROM (\S+)$", text, flags=re.M)
    assert base == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}"
    tag = base.replace("${RAY_VERSION}", args["RAY_VERSION"]).replace(
        "${PYTHON_TAG}", args["PYTHON_TAG"]
    )
    assert tag.replace("${VARIANT}", args["VARIANT"]) == "rayproject/ray:2.60.0-py311-cpu"
    assert tag.replace("${VARIANT}", "gpu") == "rayproject/ray:2.60.0-py311-gpu"
    # The Makefile's torch pin; the CPU wheel only for the cpu variant.
    makefile = (REPO / "Makefile").read_text()
    assert f"TORCH_SPEC ?= {args['TORCH_SPEC']}" in makefile
    assert args["TORCH_SPEC"] == "torch==2.13.0"
    assert 'if [ "${VARIANT}" = "cpu" ]; then index="--index-url ${TORCH_CPU_INDEX}"' in text
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and "root" not in users and users[-1] == "ray"
    assert "ray==${RAY_VERSION}" in text  # pip may not replace the base image's Ray
    assert 'CMD ["rayrec", "--help"]' in text


def test_mlflow_image_matches_the_client() -> None:
    # The server image and the rayrec image (the client) are built at one MLflow
    # version; this venv may hold a newer release of the same range, so it is
    # compared by major version only (MLflow keeps its REST API within a major).
    server = _dockerfile_args(DEPLOY / "mlflow.Dockerfile")["MLFLOW_VERSION"]
    client = _dockerfile_args(DEPLOY / "Dockerfile")["MLFLOW_VERSION"]
    assert server == client
    assert _pin("mlflow").specifier.contains(server)
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'echo "mlflow==${MLFLOW_VERSION}"; } > /home/ray/constraints.txt' in text
    import mlflow

    assert server.split(".")[0] == mlflow.__version__.split(".")[0]


def test_dockerignore_keeps_the_context_to_the_sources() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(
            fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns
        )

    for path in (".venv", ".git", "workdir", "workdir_bench", "benchmarks/results", "x.egg-info"):
        assert ignored(path), path
    # The Dockerfile copies these.
    for path in ("pyproject.toml", "README.md", "infra", "pipelines", "serving", "models"):
        assert not ignored(path), path


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _published(service: dict[str, Any]) -> list[int]:
    return [int(str(port).rsplit(":", 2)[-2]) for port in service.get("ports", [])]


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {
        "postgres",
        "minio",
        "minio-bucket",
        "mlflow",
        "redis",
        "mailpit",
        "rayrec-head",
    } <= set(services)
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    assert "mailpit" in services["mailpit"]["image"]
    assert "minio" in services["minio"]["image"]
    # Port 8000 is Serve's default and stays unused; every published port is loopback-only.
    for name, service in services.items():
        assert 8000 not in _published(service), name
        assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", [])), name
    head = services["rayrec-head"]
    assert head["image"] == deploy.DeploySpec().image()
    assert head["build"]["dockerfile"] == "infra/deploy/Dockerfile"
    assert (DEPLOY / head["build"]["context"] / head["build"]["dockerfile"]).is_file()
    assert "rayrec serve start" in head["command"][-1]
    assert services["rayrec-scheduler"]["command"] == ["rayrec", "schedule"]


def test_compose_mlflow_on_postgres_and_s3(compose: dict[str, Any]) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    services = compose["services"]
    mlflow = services["mlflow"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in mlflow["command"] if "=" in arg)
    store = flags["backend-store-uri"]
    assert store.startswith("postgresql+psycopg://mlflow:") and store.endswith(
        "@postgres:5432/mlflow"
    )
    bucket = flags["artifacts-destination"].removeprefix("s3://")
    assert f"local/{bucket}" in services["minio-bucket"]["command"][0]
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"
    # MLflow 3's host check must let the other containers in by service name.
    allowed = mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert is_allowed_host_header(allowed, "mlflow:5000")
    assert is_allowed_host_header(allowed, "127.0.0.1:5000")
    assert mlflow["image"].endswith(
        _dockerfile_args(DEPLOY / "mlflow.Dockerfile")["MLFLOW_VERSION"]
    )


def test_compose_env_is_rayrec_config(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = {k: str(v) for k, v in services["rayrec-head"]["environment"].items()}
    config = load_config("default", environ=env)
    host, port = config.mlflow.tracking_uri.removeprefix("http://").split(":")
    assert host in services and int(port) == 5000
    assert config.mlflow.artifact_location == "mlflow-artifacts:/rayrec"
    assert config.features.online_store.kind == "redis"
    assert config.features.online_store.url == "redis://redis:6379/0"
    smtp = config.monitoring.alerts.smtp
    assert smtp.host == "mailpit" and smtp.port == 1025 and smtp.recipients
    assert config.paths.workdir == "/home/ray/workdir"
    assert "workdir:/home/ray/workdir" in services["rayrec-head"]["volumes"]
    assert config.serving.app.port in _published(services["rayrec-head"])
    assert config.serving.app.host == "0.0.0.0"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and config.serving.app.proxy == "haproxy"
    assert env["RAY_ADDRESS"] == "127.0.0.1:6379"
    # The scheduler submits to the head's Jobs API and reads the same config.
    scheduler = {k: str(v) for k, v in services["rayrec-scheduler"]["environment"].items()}
    assert (
        load_config("default", environ=scheduler).schedule.jobs_address == "http://rayrec-head:8265"
    )
    # The k8s ConfigMap names the same backends, by the same service names where they exist.
    k8s = load_config("default", environ=deploy.DEFAULT_ENV)
    assert k8s.mlflow.tracking_uri == config.mlflow.tracking_uri
    assert k8s.features.online_store == config.features.online_store
