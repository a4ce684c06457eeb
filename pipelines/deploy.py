"""KubeRay manifests rendered from the config: ``rayrec deploy render``.

What is derived from the config is rendered, never hand-copied, so the
cluster cannot drift from it; ``infra/deploy/k8s/`` holds the render of the
``default`` preset and a test re-renders it and compares byte for byte.

- ``base.yaml``: the ConfigMap of ``RAYREC_…`` variables every pod reads
  (tracking server, Redis online store, SMTP relay: the backends of the
  compose file, by the same service names) and the shared workdir claim.
- ``raycluster.yaml``: the standing batch cluster (head, CPU and GPU worker
  groups, autoscaling) the scheduled jobs are submitted to.
- ``rayservice.yaml``: the online API; ``serveConfigV2`` is what ``serve
  build`` writes for :func:`pipelines.serve_app.build` (the deployments'
  options from :func:`serving.app.build_app`, the HTTP options from
  ``serving.app``).
- ``rayjob.yaml``: the main pipeline, once, on a cluster of its own that goes
  away after it (``kubectl create -f``: a fresh name per run).
- ``cronjobs.yaml``: one Kubernetes CronJob per ``schedule.jobs`` entry, each
  running ``rayrec schedule fire <job>`` for its slot, which submits ``rayrec
  <command>`` to the batch cluster as a Ray Job (:mod:`pipelines.schedule`).

Why Kubernetes CronJobs and not KubeRay's RayCronJob: RayCronJob is alpha
(KubeRay >= 1.6, behind a feature gate) and has no concurrency policy,
starting deadline or time zone, which carry ``rayrec schedule``'s rules:
``startingDeadlineSeconds = schedule.misfire_grace_s`` (a missed slot runs
once, if recent enough), ``timeZone = schedule.timezone``, no overlapping
pods; ``fire`` adds the rest (ids, the in-flight check, the history).

The pipeline's steps hand each other local folders (and serving reads model
folders by path), so every pod mounts one ReadWriteMany volume at the same
path; tracking and artifacts go to the MLflow server.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import ray
import yaml

from infra.config import RayrecConfig, ScheduledJob, load_config
from infra.errors import ConfigError
from serving.app import HAPROXY_FLAG

MANIFESTS = ("base.yaml", "raycluster.yaml", "rayservice.yaml", "rayjob.yaml", "cronjobs.yaml")
ENV_CONFIG_MAP = "rayrec-env"
SECRETS = "rayrec-secrets"
# Ray's image runs as user `ray` (uid 1000, group `users`, gid 100).
RAY_UID, RAY_GID = 1000, 100

# Backends by the compose file's service names; in Kubernetes, Services of these
# names in the namespace (or edit them here / with --env). Every name must be a
# config key: the render loads the config with exactly this environment.
DEFAULT_ENV: dict[str, str] = {
    "RAYREC_PATHS__WORKDIR": "/home/ray/workdir",
    "RAYREC_MLFLOW__TRACKING_URI": "http://mlflow:5000",
    # Artifacts through the tracking server's proxy (it alone holds the S3
    # credentials); a local path would be invisible to the server and other pods.
    "RAYREC_MLFLOW__ARTIFACT_LOCATION": "mlflow-artifacts:/rayrec",
    "RAYREC_FEATURES__ONLINE_STORE__KIND": "redis",
    "RAYREC_FEATURES__ONLINE_STORE__URL": "redis://redis:6379/0",
    "RAYREC_MONITORING__ALERTS__SMTP__HOST": "smtp",
    "RAYREC_MONITORING__ALERTS__SMTP__PORT": "25",
    # Serve's proxy must listen on the pod's address, not loopback.
    "RAYREC_SERVING__APP__HOST": "0.0.0.0",
    "RAYREC_LOGGING__FORMAT": "json",
}


@dataclass(frozen=True)
class WorkerGroup:
    """One KubeRay worker group; requests equal limits (Ray schedules by what it was given)."""

    name: str
    min_replicas: int
    max_replicas: int
    cpus: int
    memory_gi: int
    gpus: int = 0


@dataclass(frozen=True)
class ClusterShape:
    # The head runs GCS, the dashboard and job drivers; num-cpus 0 keeps tasks off it.
    head_cpus: int = 2
    head_memory_gi: int = 8
    workers: tuple[WorkerGroup, ...] = ()
    # Seconds an idle worker is kept before the autoscaler removes it.
    idle_timeout_s: int = 300


BATCH = ClusterShape(
    workers=(
        # The default preset's tuning runs trials of 2 CPUs: 4 per pod fits two.
        WorkerGroup("cpu", min_replicas=1, max_replicas=4, cpus=4, memory_gi=16),
        # Scaled from zero only when a task asks for a GPU (models.*.use_gpu).
        WorkerGroup("gpu", min_replicas=0, max_replicas=2, cpus=8, memory_gi=32, gpus=1),
    )
)
# Two replicas of one CPU each (serving.app.num_replicas x num_cpus) per pod.
SERVE = ClusterShape(
    workers=(WorkerGroup("cpu", min_replicas=1, max_replicas=4, cpus=2, memory_gi=8),)
)


@dataclass(frozen=True)
class DeploySpec:
    """What the manifests need beyond the config: images, names, sizes."""

    image_repository: str = "rayrec"
    # None: the installed rayrec version (the Dockerfile's tag: <version>-cpu / -gpu).
    image_tag: str | None = None
    cluster_name: str = "rayrec"
    service_name: str = "rayrec-serve"
    job_name: str = "rayrec-main"
    workdir_claim: str = "rayrec-workdir"
    workdir_size: str = "100Gi"
    # None: the cluster's default StorageClass, which must offer ReadWriteMany.
    storage_class: str | None = None
    env: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ENV))
    batch: ClusterShape = BATCH
    serve: ClusterShape = SERVE

    def image(self, gpu: bool = False) -> str:
        tag = self.image_tag or package_version("rayrec")
        return f"{self.image_repository}:{tag}-{'gpu' if gpu else 'cpu'}"

    @property
    def workdir(self) -> str:
        return self.env["RAYREC_PATHS__WORKDIR"]

    @property
    def jobs_address(self) -> str:
        # KubeRay names the head's Service <cluster>-head-svc; 8265 is the Jobs API.
        return f"http://{self.cluster_name}-head-svc:8265"


def render(
    preset: str = "default",
    overrides: Sequence[str] = (),
    spec: DeploySpec | None = None,
    revision: int = 0,
) -> dict[str, str]:
    """The manifests (file name -> YAML text) for ``preset`` with ``overrides``.

    The config is loaded with the pods' environment (``spec.env``) and nothing
    from this shell's, so the same inputs always give the same files.
    ``revision``: the Serve app's (see :func:`serve_config`).
    """
    spec = spec or DeploySpec()
    config = load_config(preset, overrides, environ=spec.env)
    header = (
        f"# Generated by `rayrec deploy render` (preset {preset}): do not edit, render again.\n"
    )
    docs = {
        "base.yaml": [_config_map(config, spec), _workdir_claim(spec)],
        "raycluster.yaml": [_ray_cluster(spec)],
        "rayservice.yaml": [_ray_service(config, spec, preset, overrides, revision)],
        "rayjob.yaml": [_ray_job(spec, preset, overrides)],
        "cronjobs.yaml": [
            _cron_job(config, spec, name, job, preset, overrides)
            for name, job in config.schedule.jobs.items()
        ],
    }
    return {name: header + _dump(items) for name, items in docs.items()}


def write(files: Mapping[str, str], out: Path) -> list[Path]:
    """Write the rendered ``files`` into ``out`` (created); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        written.append(path)
    return written


def drifted(files: Mapping[str, str], out: Path) -> list[str]:
    """The names in ``files`` whose copy in ``out`` is missing or different."""
    return [
        name
        for name, text in files.items()
        if not (out / name).is_file() or (out / name).read_text() != text
    ]


# --------------------------------------------------------------------------- Serve


def serve_config(
    config: RayrecConfig, preset: str, overrides: Sequence[str] = (), revision: int = 0
) -> dict[str, Any]:
    """What ``serve build`` writes for the app builder, as a dict (a ``ServeDeploySchema``).

    ``serve build`` itself takes only an import path of a built Application,
    not a builder with args, so this does what it does (build the app here,
    turn each deployment into its schema) with :func:`serving.app.build_app`.
    No Ray needs to run. The deployments' ``user_config`` is left out: it is
    the models, which :func:`pipelines.serve_app.build` resolves on the
    cluster at build time (a value here would override that). Serve (and
    KubeRay) rebuild the app only when import path, runtime env or ``args``
    change: ``revision`` bumps the args to load a new champion.
    """
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    from pipelines.serve_app import IMPORT_PATH, ServeAppArgs
    from serving.app import build_app
    from serving.service import ServedModels

    app = config.serving.app
    built = build_serve_app(build_app(config, ServedModels.of(None, 0)), name=app.name)
    deployments = [_deployment_schema(deployment) for deployment in built.deployments]
    args = ServeAppArgs(preset=preset, overrides=tuple(overrides), revision=revision)
    application = ServeApplicationSchema(
        name=app.name,
        route_prefix=app.route_prefix,
        import_path=IMPORT_PATH,
        args=args.model_dump(mode="json"),
        # The code is in the image: nothing to ship per deploy.
        runtime_env={},
        deployments=deployments,
    )
    deploy = {
        "proxy_location": "EveryNode",
        "http_options": {
            "host": app.host,
            "port": app.port,
            "request_timeout_s": app.request_timeout_s,
        },
        "applications": [application.model_dump(mode="json", exclude_unset=True)],
    }
    ServeDeploySchema.model_validate(deploy)
    return deploy


def _deployment_schema(deployment: Any) -> dict[str, Any]:
    """The Serve config entry of a built deployment: the options the builder set.

    ``deployment_to_schema`` writes only options marked as set by the user, and
    :func:`serving.app.build_app` sets them through ``options(_internal=True)``
    (for its version), which marks none. So they are marked here: those that
    differ from a bare ``serve.deployment`` of the same class, and the actor
    options (the replica's resources) whenever given.
    """
    from ray import serve
    from ray.serve.deployment import deployment_to_schema
    from ray.serve.schema import DeploymentSchema

    bare = serve.deployment(name=deployment.name)(deployment.func_or_class)
    ours, theirs = deployment._deployment_config.model_dump(), bare._deployment_config.model_dump()
    chosen = {name for name in ours if ours[name] != theirs[name]}
    replica, default = deployment._replica_config, bare._replica_config
    for name in ("placement_group_bundles", "placement_group_strategy", "max_replicas_per_node"):
        if getattr(replica, name) != getattr(default, name):
            chosen.add(name)
    if deployment.ray_actor_options:
        chosen.add("ray_actor_options")
    # user_config is the models: pipelines.serve_app.build resolves them on the cluster.
    chosen = (chosen & set(DeploymentSchema.model_fields)) - {"user_config"}
    deployment._deployment_config.user_configured_option_names = chosen
    return deployment_to_schema(deployment).model_dump(mode="json", exclude_unset=True)


# --------------------------------------------------------------------------- manifests


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "rayrec", "app.kubernetes.io/component": component}


def _config_map(config: RayrecConfig, spec: DeploySpec) -> dict[str, Any]:
    data = dict(spec.env)
    # Serve reads its ingress from the environment of the Ray processes.
    data[HAPROXY_FLAG] = "1" if config.serving.app.proxy == "haproxy" else "0"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": ENV_CONFIG_MAP, "labels": _labels("config")},
        "data": data,
    }


def _workdir_claim(spec: DeploySpec) -> dict[str, Any]:
    claim: dict[str, Any] = {
        # Every pod of every cluster reads and writes it (NFS, EFS, Filestore, CephFS, ...).
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": spec.workdir_size}},
    }
    if spec.storage_class is not None:
        claim["storageClassName"] = spec.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": spec.workdir_claim, "labels": _labels("workdir")},
        "spec": claim,
    }


def _env() -> list[dict[str, Any]]:
    return [
        {
            "name": "RAYREC_MONITORING__ALERTS__SMTP__PASSWORD",
            "valueFrom": {
                "secretKeyRef": {"name": SECRETS, "key": "smtp-password", "optional": True}
            },
        }
    ]


def _pod_spec(
    spec: DeploySpec,
    name: str,
    cpus: int,
    memory_gi: int,
    gpus: int = 0,
    ports: Sequence[tuple[str, int]] = (),
) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": str(cpus), "memory": f"{memory_gi}Gi"}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    container: dict[str, Any] = {
        "name": name,
        "image": spec.image(gpu=gpus > 0),
        "imagePullPolicy": "IfNotPresent",
        "envFrom": [{"configMapRef": {"name": ENV_CONFIG_MAP}}],
        "env": _env(),
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "volumeMounts": [
            {"name": "workdir", "mountPath": spec.workdir},
            # Ray's object store lives in shared memory; Docker's default 64 MB is too small.
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    if ports:
        container["ports"] = [{"name": port, "containerPort": number} for port, number in ports]
    pod: dict[str, Any] = {
        "securityContext": _security_context(),
        "containers": [container],
        "volumes": [
            _workdir_volume(spec),
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if gpus:
        # GPU nodes are usually tainted so that only GPU work lands there.
        pod["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return pod


def _security_context() -> dict[str, Any]:
    """The image's non-root user; the volume's files belong to the image's group, so that
    user can write them."""
    return {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID}


def _workdir_volume(spec: DeploySpec) -> dict[str, Any]:
    return {"name": "workdir", "persistentVolumeClaim": {"claimName": spec.workdir_claim}}


def _cluster_spec(
    spec: DeploySpec, shape: ClusterShape, serve_port: int | None = None
) -> dict[str, Any]:
    head_ports = [("gcs-server", 6379), ("dashboard", 8265), ("client", 10001)]
    # KubeRay routes the serve Service to the container port named "serve".
    serve = [("serve", serve_port)] if serve_port is not None else []
    groups = []
    for group in shape.workers:
        groups.append(
            {
                "groupName": group.name,
                "replicas": group.min_replicas,
                "minReplicas": group.min_replicas,
                "maxReplicas": group.max_replicas,
                # KubeRay passes the container's CPU, memory and GPU limits to `ray start`.
                "rayStartParams": {},
                "template": {
                    "spec": _pod_spec(
                        spec, "ray-worker", group.cpus, group.memory_gi, group.gpus, serve
                    )
                },
            }
        )
    return {
        "rayVersion": ray.__version__,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": shape.idle_timeout_s,
        },
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {
                "spec": _pod_spec(
                    spec,
                    "ray-head",
                    shape.head_cpus,
                    shape.head_memory_gi,
                    ports=head_ports + serve,
                )
            },
        },
        "workerGroupSpecs": groups,
    }


def _ray_cluster(spec: DeploySpec) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": spec.cluster_name, "labels": _labels("batch")},
        "spec": _cluster_spec(spec, spec.batch),
    }


def _ray_service(
    config: RayrecConfig, spec: DeploySpec, preset: str, overrides: Sequence[str], revision: int
) -> dict[str, Any]:
    serve = serve_config(config, preset, overrides, revision)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": spec.service_name, "labels": _labels("serve")},
        "spec": {
            # KubeRay takes the Serve config as one YAML string.
            "serveConfigV2": _Block(yaml.safe_dump(serve, sort_keys=False)),
            "rayClusterConfig": _cluster_spec(spec, spec.serve, config.serving.app.port),
        },
    }


def _ray_job(spec: DeploySpec, preset: str, overrides: Sequence[str]) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        # generateName: `kubectl create -f rayjob.yaml` starts one more run each time.
        "metadata": {"generateName": f"{spec.job_name}-", "labels": _labels("pipeline")},
        "spec": {
            "entrypoint": shlex.join(_command(["run"], preset, overrides)),
            "shutdownAfterJobFinishes": True,
            # The finished cluster stays an hour for its logs, then goes.
            "ttlSecondsAfterFinished": 3600,
            "rayClusterSpec": _cluster_spec(spec, spec.batch),
        },
    }


# The CronJob's Job is named <cronjob>-<scheduled time in minutes since the epoch>:
# that slot becomes `rayrec schedule fire --scheduled --at`, so the Ray Job gets the
# in-process scheduler's submission id <job>-<logical date> (a second submission of
# one slot is refused) and the same overlap check and history (a scheduled slot). A
# Job made by hand (`kubectl create job --from=cronjob/...`) is a manual fire for the
# current minute.
FIRE_SCRIPT = """\
set -euo pipefail
slot="${JOB_NAME##*-}"
case "$slot" in
  ''|*[!0-9]*) exec "$@" ;;
  *) exec "$@" --scheduled --at "$(date -u -d "@$((slot * 60))" +%Y-%m-%dT%H:%M:%S+00:00)" ;;
esac
"""


def _cron_job(
    config: RayrecConfig,
    spec: DeploySpec,
    name: str,
    job: ScheduledJob,
    preset: str,
    overrides: Sequence[str],
) -> dict[str, Any]:
    """A CronJob whose pod runs ``rayrec schedule fire <name>`` for its slot.

    ``fire`` submits ``rayrec <command> --preset … --set …`` (the scheduler's
    :func:`pipelines.schedule.job_entrypoint`) to the batch cluster's Jobs API
    and returns: the run itself is a Ray Job on the cluster, and the slot is
    skipped (recorded in the history) while an earlier run of the job is in
    flight. The pod fails only when the submission did.
    """
    resource = f"{spec.cluster_name}-{_dns_label(name)}"
    # CronJob names are limited to 52 characters (its Jobs add an 11-character suffix).
    if len(resource) > 52:
        raise ConfigError(f"schedule.jobs.{name}: CronJob name {resource!r} is over 52 characters")
    container = {
        "name": "fire",
        "image": spec.image(),
        "imagePullPolicy": "IfNotPresent",
        "command": ["/bin/bash", "-c", _Block(FIRE_SCRIPT), "fire"],
        "args": _command(["schedule", "fire", name], preset, overrides),
        # The config the cluster's runs read, and the workdir the schedule's history is in.
        "envFrom": [{"configMapRef": {"name": ENV_CONFIG_MAP}}],
        "env": [
            {
                "name": "JOB_NAME",
                "valueFrom": {
                    "fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}
                },
            },
            {
                "name": "RAYREC_SCHEDULE__JOBS_ADDRESS",
                "value": config.schedule.jobs_address or spec.jobs_address,
            },
        ],
        # Submitting is all it does: the work runs on the cluster.
        "resources": {
            "requests": {"cpu": "250m", "memory": "1Gi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
        "volumeMounts": [{"name": "workdir", "mountPath": spec.workdir}],
    }
    labels = {**_labels("schedule"), "rayrec/job": name}
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": resource, "labels": labels},
        "spec": {
            "schedule": job.cron,
            "timeZone": config.schedule.timezone,
            # The submitting pods never overlap; fire itself skips a slot while the
            # job's previous Ray Job still runs.
            "concurrencyPolicy": "Forbid",
            # A slot missed (controller down) runs once if at most this late: one catch-up.
            "startingDeadlineSeconds": config.schedule.misfire_grace_s,
            "suspend": not job.enabled,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "spec": {
                    # One try per slot: a failed submission shows as a failed Job, and
                    # the next slot (or a manual fire) runs the job again.
                    "backoffLimit": 0,
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "restartPolicy": "Never",
                            "securityContext": _security_context(),
                            "containers": [container],
                            "volumes": [_workdir_volume(spec)],
                        },
                    },
                }
            },
        },
    }


def _command(command: Sequence[str], preset: str, overrides: Sequence[str]) -> list[str]:
    """``rayrec <command>`` with the preset and overrides the manifests were rendered for."""
    return ["rayrec", *command, "--preset", preset, *_sets(overrides)]


def _sets(overrides: Sequence[str]) -> list[str]:
    return [part for item in overrides for part in ("--set", item)]


def _dns_label(name: str) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not label:
        raise ConfigError(f"schedule.jobs: {name!r} gives no Kubernetes name")
    return label


# --------------------------------------------------------------------------- YAML


class _Block(str):
    """A string written as a YAML literal block (``|``): scripts and embedded YAML stay readable."""


class _Dumper(yaml.SafeDumper):
    pass


def _block(dumper: yaml.SafeDumper, data: _Block) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(data), style="|")


_Dumper.add_representer(_Block, _block)


def _dump(docs: Sequence[Mapping[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=1000)
