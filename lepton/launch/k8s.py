"""``lepton k8s``: the manifests that run a job on Kubernetes, printed for ``kubectl apply -f -``.

Kubernetes is a placer here (design.md §10): it keeps one coordinator pod and N worker pods running;
membership, identity and recovery stay Lepton's. What is printed, for a run named NAME:

- a ConfigMap ``NAME-job`` with the job file, and a Secret ``NAME-token`` with a fresh run token;
- the coordinator as a Deployment (one replica, ``Recreate``: never two coordinators on one run, which
  object storage cannot lock) and a Service ``NAME-coordinator`` exposing its API and its rendezvous
  store. It runs ``lepton coordinator --resume-existing`` on the run directory in object storage, so a
  pod that is rescheduled resumes the run from the bucket alone; it advertises the Service's DNS name
  (in its URL and its TLS certificate) and its liveness and readiness probes are ``GET /healthz``;
- the workers as an Indexed Job (``completions`` = ``parallelism`` = N) with ``restartPolicy:
  OnFailure`` and a ``backoffLimit`` above zero: a worker whose container dies is restarted in place by
  the kubelet and rejoins at the next step boundary while the others train on; nothing restarts the
  set. A worker needs only ``--join RUN_DIR/join``, which the coordinator writes into the bucket (URL,
  token, the run's CA), and waits for it.

Resource requests come from the flags and the job's cluster section (a GPU per worker when
``cluster.device`` is cuda). Credentials for the object store come from a Secret of the user's
(``--env-secret``), as environment variables (``AWS_ACCESS_KEY_ID`` ...). No live cluster was used to
write or test this: the manifests are validated against the Kubernetes OpenAPI schemas
(``kubernetes-validate``, tests/test_k8s.py).
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import yaml

from ..errors import LeptonError
from ..spec import JobSpec

API_PORT, STORE_PORT = 7000, 7001
JOB_MOUNT, TOKEN_MOUNT = "/etc/lepton/job", "/etc/lepton/token"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


def run_name(job: JobSpec, name: str | None) -> str:
    """A DNS-1123 label for the run's objects (at most 40 characters: their suffixes must fit in 63)."""
    base = name or re.sub(r"[^a-z0-9-]+", "-", job.name.lower()).strip("-") or "lepton"
    if len(base) > 40 or not _NAME.match(base):
        raise LeptonError(
            f"--name {base!r}: a Kubernetes name is lower-case letters, digits and '-', at most 40"
            " characters, starting and ending with a letter or digit"
        )
    return base


def _check(workers: int, image: str, storage: str, namespace: str, cpus: str, memory: str) -> None:
    if not image:
        raise LeptonError("--image: give the container image that has lepton installed (and the job's code)")
    if workers < 1:
        raise LeptonError(f"--workers {workers}: must be at least 1")
    if "://" not in storage:
        raise LeptonError(
            f"--storage {storage!r}: give an object-storage URL (s3://bucket/prefix); pods share no disk"
        )
    if not _NAME.match(namespace):
        raise LeptonError(f"--namespace {namespace!r}: not a Kubernetes namespace name")
    for flag, value in (("--cpus", cpus), ("--memory", memory)):
        if not _QUANTITY.match(value):
            raise LeptonError(f"{flag} {value!r}: not a Kubernetes quantity (e.g. 2, 500m, 4Gi)")


def manifests(
    job: JobSpec,
    job_yaml: str,
    *,
    workers: int,
    image: str,
    storage: str,
    namespace: str = "default",
    name: str | None = None,
    cpus: str = "1",
    memory: str = "2Gi",
    env_secret: str | None = None,
    token: str | None = None,
) -> list[dict[str, Any]]:
    """The objects of the module docstring, in the order ``kubectl apply`` should create them."""
    _check(workers, image, storage, namespace, cpus, memory)
    name = run_name(job, name)
    run_dir = f"{storage.rstrip('/')}/{name}"
    host = f"{name}-coordinator.{namespace}.svc"
    labels = {"app.kubernetes.io/name": "lepton", "app.kubernetes.io/instance": name}
    meta = lambda kind: {"name": f"{name}-{kind}", "namespace": namespace, "labels": labels}  # noqa: E731
    env_from = [{"secretRef": {"name": env_secret}}] if env_secret else []
    requests = {"cpu": cpus, "memory": memory}
    limits: dict[str, Any] = {"memory": memory}
    if job.cluster.device == "cuda":
        limits["nvidia.com/gpu"] = 1
    coordinator_labels = {**labels, "app.kubernetes.io/component": "coordinator"}
    probe = {"httpGet": {"path": "/healthz", "port": API_PORT, "scheme": "HTTPS"}, "periodSeconds": 10}
    coordinator = {
        "name": "coordinator",
        "image": image,
        "command": [
            "lepton",
            "coordinator",
            f"{JOB_MOUNT}/job.yaml",
            "--run-dir",
            run_dir,
            "--resume-existing",
            "--bind",
            f"0.0.0.0:{API_PORT}",
            "--store-port",
            str(STORE_PORT),
            "--advertise",
            host,
            "--token-file",
            f"{TOKEN_MOUNT}/token",
            "--workers",
            str(workers),
        ],  # fmt: skip
        "ports": [
            {"name": "api", "containerPort": API_PORT},
            {"name": "store", "containerPort": STORE_PORT},
        ],
        "envFrom": env_from,
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
        "livenessProbe": {**probe, "initialDelaySeconds": 60, "failureThreshold": 6},
        "readinessProbe": {**probe, "initialDelaySeconds": 5},
        "volumeMounts": [
            {"name": "job", "mountPath": JOB_MOUNT, "readOnly": True},
            {"name": "token", "mountPath": TOKEN_MOUNT, "readOnly": True},
        ],
    }
    worker = {
        "name": "worker",
        "image": image,
        "command": ["lepton", "worker", "--join", f"{run_dir}/join", "--connect-timeout", "600"],
        "envFrom": env_from,
        "resources": {"requests": requests, "limits": limits},
    }
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("job"), "data": {"job.yaml": job_yaml}},
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta("token"),
            "type": "Opaque",
            "stringData": {"token": token or secrets.token_urlsafe(32)},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta("coordinator"),
            "spec": {
                "selector": coordinator_labels,
                "ports": [
                    {"name": "api", "port": API_PORT, "targetPort": "api"},
                    {"name": "store", "port": STORE_PORT, "targetPort": "store"},
                ],
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta("coordinator"),
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},  # the old pod gone before the new one starts
                "selector": {"matchLabels": coordinator_labels},
                "template": {
                    "metadata": {"labels": coordinator_labels},
                    "spec": {
                        "containers": [coordinator],
                        "volumes": [
                            {"name": "job", "configMap": {"name": f"{name}-job"}},
                            {
                                "name": "token",
                                "secret": {"secretName": f"{name}-token", "defaultMode": 0o400},
                            },
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": meta("workers"),
            "spec": {
                "completionMode": "Indexed",
                "completions": workers,
                "parallelism": workers,
                # each container death is restarted in place and counts here: room for several per
                # worker before the Job gives up (the run itself goes on with the others meanwhile)
                "backoffLimit": max(6, 3 * workers),
                "template": {
                    "metadata": {"labels": {**labels, "app.kubernetes.io/component": "worker"}},
                    "spec": {"restartPolicy": "OnFailure", "containers": [worker]},
                },
            },
        },
    ]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the job file in the ConfigMap) as literal blocks, and no anchors: the output
    is read by people and by tools that do not all resolve YAML aliases."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(
    str,
    lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None),
)


def render(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False)


def add_k8s_command(sub) -> None:
    """Register ``lepton k8s`` on the CLI's subparsers (dispatched through ``handler``)."""
    p = sub.add_parser("k8s", help="print Kubernetes manifests that run a job (kubectl apply -f -)")
    p.add_argument("job")
    p.add_argument("--workers", type=int, required=True, help="worker pods (an Indexed Job)")
    p.add_argument("--image", required=True, help="a container image with lepton (and the job's code)")
    p.add_argument("--storage", required=True, help="object-storage prefix for the run (s3://bucket/runs)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--name", help="the run's name (default: from the job's name)")
    p.add_argument("--cpus", default="1", help="CPU request of each worker (a quantity: 2, 500m)")
    p.add_argument("--memory", default="2Gi", help="memory request and limit of each worker")
    p.add_argument(
        "--env-secret", help="a Secret of yours whose keys become environment variables (AWS_* credentials)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(handler=cmd_k8s)


def cmd_k8s(a) -> int:
    import sys

    from .run import placed_job

    job = placed_job(a.job, a.overrides, max(1, a.workers), "the pods")  # --workers < 1: _check's line
    text = yaml.safe_dump(job.to_yaml_dict(), sort_keys=False)
    objects = manifests(
        job,
        text,
        workers=a.workers,
        image=a.image,
        storage=a.storage,
        namespace=a.namespace,
        name=a.name,
        cpus=a.cpus,
        memory=a.memory,
        env_secret=a.env_secret,
    )
    if job.data.path and "://" not in str(job.data.path):  # after the checks: bad flags stay one line
        print(
            f"lepton k8s: note: data.path {job.data.path} is a local path: the coordinator's pod reads it"
            " only if its image holds it there (an s3:// URL needs nothing more)",
            file=sys.stderr,
        )
    sys.stdout.write(render(objects))
    return 0
