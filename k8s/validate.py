#!/usr/bin/env python3
"""Validate cnnbatch's Kubernetes manifests offline.

    python k8s/validate.py [PATH ...]

A PATH is a manifest or a directory (default: the k8s/ directory holding this script). Every YAML file is
checked on its own (kustomization files aside), and every kustomization directory is also rendered with
`kustomize build` or `kubectl kustomize`, when one of them is installed, and its output checked: that is
what `kubectl apply -k` sends, image, schedule and namespace filled in.

- Core kinds: strict schema validation (unknown fields refused) with kubernetes-validate, which ships the
  schemas, for Kubernetes KUBERNETES_VERSION, the oldest version the manifests support.
- KubeRay kinds (RayCluster, RayJob, RayCronJob): jsonschema against the KubeRay CRDs in
  ../shared/kuberay-crds beside the checkout (or $CNNBATCH_KUBERAY_CRDS), with unknown fields refused;
  skipped with a printed reason when that directory is absent. The object metadata, which the CRDs leave
  open, is checked strictly as ObjectMeta.
- The checks the KubeRay operator makes beyond its schema: name lengths and DNS-1035, rayClusterSpec or
  clusterSelector, token auth needing rayVersion >= 2.52.0, replica bounds, deadlines.
- Project rules: every GPU worker group requests and limits nvidia.com/gpu and tolerates its taint; RayJobs
  end (shutdownAfterJobFinishes, ttlSecondsAfterFinished, activeDeadlineSeconds) and run `python -m jobs.*`;
  the head takes no work (num-cpus "0"); Ray pods keep the object store in a memory-backed /dev/shm;
  Ray token auth is on and the dashboard stays inside the cluster; pods meet the "restricted" Pod Security
  Standard; no credentials inline; schedules cannot overlap themselves (CronJob concurrencyPolicy Forbid,
  RayCronJob deadline shorter than its schedule's period).

Prints one line per problem, `file:Kind/name: message`, and exits with status 1 if there is any.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import re
import shutil
import subprocess
import sys
import zoneinfo
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

Manifest = dict[str, Any]

KUBERNETES_VERSION = "1.30"
KUBERAY_GROUP = "ray.io"
KUBERAY_CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
CRD_DIR_ENV = "CNNBATCH_KUBERAY_CRDS"
# KubeRay v1.7.0, ray-operator/controllers/ray/utils/constant.go: MaxRayClusterNameLength and the two
# derived from it, so that the names KubeRay builds from them stay valid.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}
GENERATED_SUFFIX_LENGTH = 5  # what the API server appends to metadata.generateName
MIN_TOKEN_AUTH_RAY_VERSION = (2, 52, 0)
GPU = "nvidia.com/gpu"
STAGE_ENTRYPOINT = re.compile(r"python -m jobs\.(extract|train|predict)(\s|$)")
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# Env names whose values are credentials; *_FILE and *_PATH name files, not secrets.
SECRET_ENV_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY|CREDENTIALS?$")
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
UTC_ZONES = {"UTC", "Etc/UTC", "Etc/GMT", "GMT", "Etc/Universal", "Universal", "Etc/Zulu", "Zulu"}


@dataclass(frozen=True)
class Problem:
    source: str
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.subject}: {self.message}"


# --------------------------------------------------------------------------------------------- schemas


def default_crd_dir() -> Path:
    """$CNNBATCH_KUBERAY_CRDS, else shared/kuberay-crds in the directory that holds the checkout."""
    configured = os.environ.get(CRD_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"


def refuse_unknown_fields(schema: Any) -> Any:
    """A copy of an OpenAPI schema with `additionalProperties: false` wherever `properties` are listed.

    CRD schemas leave unknown fields allowed (the API server prunes them silently), which would let a
    misspelt field pass; maps (`additionalProperties` given) and preserve-unknown-fields nodes stay open.
    """
    if isinstance(schema, list):
        return [refuse_unknown_fields(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: refuse_unknown_fields(value) for key, value in schema.items()}
    if ("properties" in strict and "additionalProperties" not in strict
            and not strict.get("x-kubernetes-preserve-unknown-fields")):
        strict["additionalProperties"] = False
    return strict


@functools.lru_cache(maxsize=4)
def load_crd_validators(crd_dir: Path) -> dict[str, jsonschema.protocols.Validator]:
    """One validator per KubeRay kind, from the `v1` schema of its CRD. Raises OSError/ValueError."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
    validators = {}
    for kind, filename in KUBERAY_CRD_FILES.items():
        with open(crd_dir / filename, encoding="utf-8") as stream:
            crd = yaml.load(stream, Loader=loader)
        versions = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        if not versions:
            raise ValueError(f"{filename} has no v1 version")
        schema = refuse_unknown_fields(versions[0]["schema"]["openAPIV3Schema"])
        validators[kind] = jsonschema.Draft7Validator(schema)
    return validators


def _path(parts: Sequence[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _schema_message(error: jsonschema.ValidationError) -> str:
    where = _path(list(error.absolute_path))
    return f"{where}: {error.message}" if where else error.message


def core_schema_errors(obj: Manifest, version: str = KUBERNETES_VERSION) -> list[str]:
    """kubernetes-validate in strict mode (it reports the first error it finds)."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [_schema_message(error)]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [error.message]
    return []


def metadata_errors(metadata: Any, version: str = KUBERNETES_VERSION) -> list[str]:
    """Strict ObjectMeta validation, borrowing the schema of a kind that has nothing else required."""
    return core_schema_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}, version)


# ------------------------------------------------------------------------------------------- helpers


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _quantity(value: Any) -> str | None:
    return None if value is None else str(value)


def _ray_version(text: str) -> tuple[int, ...] | None:
    match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?\S*", text)
    return tuple(int(part or 0) for part in match.groups()) if match else None


def _name_problems(kind: str, metadata: Mapping[str, Any]) -> list[str]:
    limit = MAX_NAME_LENGTH[kind]
    name, prefix = metadata.get("name"), metadata.get("generateName")
    if name:
        field, given, full, suffix = "metadata.name", str(name), str(name), ""
    elif prefix:
        # The names the API server generates from the prefix are all this long.
        field, given = "metadata.generateName", str(prefix)
        full = given + "x" * GENERATED_SUFFIX_LENGTH
        suffix = f" plus {GENERATED_SUFFIX_LENGTH} generated characters"
    else:
        return ["metadata.name or metadata.generateName is required"]
    problems = []
    if len(full) > limit:
        problems.append(f"{field} {given!r}{suffix} is {len(full)} characters; KubeRay accepts at most {limit} "
                        f"for a {kind}")
    if not DNS_1035_LABEL.fullmatch(full):
        problems.append(f"{field} {given!r} does not make a DNS-1035 label (lower-case letters, digits and '-', "
                        "starting with a letter and ending with a letter or digit)")
    return problems


# --------------------------------------------------------------------------------------------- pods


def _containers(pod_spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for field in ("initContainers", "containers"):
        for index, container in enumerate(_list(pod_spec.get(field))):
            yield f"{field}[{index}]", _mapping(container)


def _pod_security_problems(where: str, pod_spec: Mapping[str, Any]) -> list[str]:
    """The parts of the "restricted" Pod Security Standard that a manifest can get wrong."""
    problems = []
    context = _mapping(pod_spec.get("securityContext"))
    if context.get("runAsNonRoot") is not True:
        problems.append(f"{where}.securityContext.runAsNonRoot must be true")
    if context.get("runAsUser") == 0:
        problems.append(f"{where}.securityContext.runAsUser must not be 0")
    if _mapping(context.get("seccompProfile")).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{where}.securityContext.seccompProfile.type must be RuntimeDefault")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(key):
            problems.append(f"{where}.{key} must not be set")
    for path, container in _containers(pod_spec):
        security = _mapping(container.get("securityContext"))
        at = f"{where}.{path}.securityContext"
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}.allowPrivilegeEscalation must be false")
        if "ALL" not in _list(_mapping(security.get("capabilities")).get("drop")):
            problems.append(f"{at}.capabilities.drop must include ALL")
        if security.get("privileged"):
            problems.append(f"{at}.privileged must not be true")
        if security.get("runAsUser") == 0:
            problems.append(f"{at}.runAsUser must not be 0")
    return problems


def _inline_secret_problems(where: str, pod_spec: Mapping[str, Any]) -> list[str]:
    problems = []
    for path, container in _containers(pod_spec):
        for env in _list(container.get("env")):
            name = str(_mapping(env).get("name", ""))
            if ("value" in _mapping(env) and SECRET_ENV_NAME.search(name.upper())
                    and not name.upper().endswith(("_FILE", "_PATH"))):
                problems.append(f"{where}.{path}.env {name} has an inline value; reference a Secret "
                                "(valueFrom.secretKeyRef or envFrom.secretRef) or the platform's identity")
    return problems


def _pod_problems(where: str, pod_spec: Mapping[str, Any]) -> list[str]:
    return _pod_security_problems(where, pod_spec) + _inline_secret_problems(where, pod_spec)


def _mounts_memory_shm(pod_spec: Mapping[str, Any]) -> bool:
    volumes = {v.get("name"): v for v in map(_mapping, _list(pod_spec.get("volumes")))}
    containers = _list(pod_spec.get("containers"))
    if not containers:
        return False
    for mount in map(_mapping, _list(_mapping(containers[0]).get("volumeMounts"))):
        if mount.get("mountPath") == "/dev/shm":
            return _mapping(_mapping(volumes.get(mount.get("name"))).get("emptyDir")).get("medium") == "Memory"
    return False


# ------------------------------------------------------------------------------------------- KubeRay


def _ray_group_problems(where: str, group: Mapping[str, Any], *, head: bool) -> list[str]:
    pod_spec = _mapping(_mapping(group.get("template")).get("spec"))
    problems = _pod_problems(f"{where}.template.spec", pod_spec)
    if not _list(pod_spec.get("containers")):
        problems.append(f"{where}.template.spec.containers must hold the Ray container")
    params = _mapping(group.get("rayStartParams"))
    if any(params.get(key) for key in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
        problems.append(f"{where}: set resources either in rayStartParams or in resources, not both")
    if "labels" in params:
        problems.append(f"{where}.rayStartParams.labels is not supported; use {where}.labels")
    if not _mounts_memory_shm(pod_spec):
        problems.append(f"{where}: the Ray container must mount /dev/shm from an emptyDir with medium: Memory "
                        "(Ray's object store)")
    if head and str(params.get("num-cpus")) != "0":
        problems.append(f'{where}.rayStartParams.num-cpus must be "0" so that no task or actor lands on the head')
    return problems


def _gpu_problems(where: str, group: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Whether the worker group is a GPU group, and what it misses to be a sound one."""
    pod_spec = _mapping(_mapping(group.get("template")).get("spec"))
    containers = _list(pod_spec.get("containers"))
    resources = _mapping(_mapping(containers[0]).get("resources")) if containers else {}
    requests = _quantity(_mapping(resources.get("requests")).get(GPU))
    limits = _quantity(_mapping(resources.get("limits")).get(GPU))
    tolerations = [_mapping(t) for t in _list(pod_spec.get("tolerations"))]
    # A toleration of the GPU taint, or one with no key and operator Exists, which tolerates every taint.
    tolerates = any(t.get("key") == GPU or (t.get("operator") == "Exists" and not t.get("key")) for t in tolerations)
    declared = _mapping(group.get("rayStartParams")).get("num-gpus") or _mapping(group.get("resources")).get("GPU")
    is_gpu = bool(requests or limits or declared or any(t.get("key") == GPU for t in tolerations))
    if not is_gpu:
        return False, []
    at = f"{where}.template.spec.containers[0].resources"
    problems = []
    if requests is None:
        problems.append(f"{at}.requests must include {GPU}")
    if limits is None:
        problems.append(f"{at}.limits must include {GPU}")
    if requests is not None and limits is not None and requests != limits:
        problems.append(f"{at}: {GPU} requests ({requests}) and limits ({limits}) must be equal")
    if not tolerates:
        problems.append(f"{where}.template.spec.tolerations must tolerate the {GPU} taint of GPU nodes")
    return True, problems


def ray_cluster_spec_problems(where: str, spec: Mapping[str, Any]) -> list[str]:
    """What KubeRay checks in a RayClusterSpec beyond its schema, and the project's rules for one."""
    problems = []
    auth = _mapping(spec.get("authOptions"))
    if auth.get("mode") != "token":
        problems.append(f"{where}.authOptions.mode must be token (Ray token authentication)")
    else:
        version = _ray_version(str(spec.get("rayVersion", "")))
        if version is None:
            problems.append(f"{where}.rayVersion is required with token auth (KubeRay checks it is >= 2.52.0)")
        elif version < MIN_TOKEN_AUTH_RAY_VERSION:
            problems.append(f"{where}.rayVersion {spec.get('rayVersion')} is below 2.52.0, the first Ray with "
                            "token auth")

    head = _mapping(spec.get("headGroupSpec"))
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"{where}.headGroupSpec.serviceType must be ClusterIP: the dashboard stays inside the "
                        "cluster (kubectl port-forward)")
    if head.get("enableIngress"):
        problems.append(f"{where}.headGroupSpec.enableIngress must not be set: the dashboard stays inside the cluster")
    problems += _ray_group_problems(f"{where}.headGroupSpec", head, head=True)

    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    gpu_groups = 0
    for index, group in enumerate(map(_mapping, _list(spec.get("workerGroupSpecs")))):
        at = f"{where}.workerGroupSpecs[{index}]"
        problems += _ray_group_problems(at, group, head=False)
        low, high, replicas = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not autoscaling and (low is None or high is None):
            problems.append(f"{at}: minReplicas and maxReplicas are required without autoscaling")
        if isinstance(low, int) and isinstance(high, int) and low > high:
            problems.append(f"{at}: minReplicas {low} is greater than maxReplicas {high}")
        if (isinstance(replicas, int) and isinstance(low, int) and isinstance(high, int)
                and not low <= replicas <= high):
            problems.append(f"{at}: replicas {replicas} is outside [minReplicas, maxReplicas]; KubeRay would "
                            "clamp it")
        is_gpu, gpu_problems = _gpu_problems(at, group)
        gpu_groups += int(is_gpu)
        problems += gpu_problems
    if not gpu_groups:
        problems.append(f"{where}.workerGroupSpecs: needs a GPU worker group ({GPU} in requests and limits)")
    return problems


def ray_job_spec_problems(where: str, spec: Mapping[str, Any]) -> list[str]:
    """What KubeRay checks in a RayJobSpec beyond its schema, and the project's rules for one."""
    problems = []
    selector = _mapping(spec.get("clusterSelector"))
    if not spec.get("rayClusterSpec") and not selector:
        problems.append(f"{where}: one of rayClusterSpec or clusterSelector must be set")
    if selector and not selector.get("ray.io/cluster"):
        problems.append(f"{where}.clusterSelector must name the cluster under ray.io/cluster")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{where}.shutdownAfterJobFinishes must be true so that the Ray cluster goes away")
    ttl = spec.get("ttlSecondsAfterFinished")
    if ttl is None:
        problems.append(f"{where}.ttlSecondsAfterFinished must be set")
    elif isinstance(ttl, int) and ttl < 0:
        problems.append(f"{where}.ttlSecondsAfterFinished must not be negative")
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is None:
        problems.append(f"{where}.activeDeadlineSeconds must be set so that a stuck job ends")
    elif isinstance(deadline, int) and deadline <= 0:
        problems.append(f"{where}.activeDeadlineSeconds must be positive")
    if not STAGE_ENTRYPOINT.match(" ".join(str(spec.get("entrypoint", "")).split())):
        problems.append(f"{where}.entrypoint must run python -m jobs.extract, jobs.train or jobs.predict")
    if spec.get("submitterPodTemplate"):
        pod_spec = _mapping(_mapping(spec["submitterPodTemplate"]).get("spec"))
        problems += _pod_problems(f"{where}.submitterPodTemplate.spec", pod_spec)
    if spec.get("rayClusterSpec"):
        cluster = _mapping(spec["rayClusterSpec"])
        if _mapping(cluster.get("authOptions")).get("enableK8sTokenAuth"):
            problems.append(f"{where}.rayClusterSpec.authOptions.enableK8sTokenAuth is not supported for RayJobs")
        problems += ray_cluster_spec_problems(f"{where}.rayClusterSpec", cluster)
    return problems


# ---------------------------------------------------------------------------------------------- cron

_CRON_MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
_CRON_FIELDS = (  # (name, lowest, highest, names)
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {m: i for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)}),
    ("day of week", 0, 6, {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}),
)


def _cron_field(text: str, name: str, low: int, high: int, names: Mapping[str, int]) -> tuple[frozenset[int], bool]:
    def number(token: str) -> int:
        value = names.get(token.lower()) if token.isalpha() else int(token) if token.isdigit() else None
        if value is None or not low <= value <= high:
            raise ValueError(f"{name} {token!r} is not in {low}-{high}")
        return value

    values: set[int] = set()
    unrestricted = False
    for part in text.split(","):
        span, slash, step_text = part.partition("/")
        if slash and not (step_text.isdigit() and int(step_text) > 0):
            raise ValueError(f"{name} step {step_text!r} is not a positive integer")
        step = int(step_text) if slash else 1
        if span in ("*", "?"):
            start, end = low, high
            unrestricted = unrestricted or not slash
        else:
            first, dash, last = span.partition("-")
            start = number(first)
            end = number(last) if dash else (high if slash else start)
            if end < start:
                raise ValueError(f"{name} range {span!r} runs backwards")
        values.update(range(start, end + 1, step))
    return frozenset(values), unrestricted


def parse_cron(schedule: str) -> tuple[tuple[frozenset[int], ...], bool, bool]:
    """The five fields' values of a standard cron schedule (as the CronJob and KubeRay controllers read it),
    and whether day-of-month and day-of-week are unrestricted. Raises ValueError."""
    text = _CRON_MACROS.get(schedule.strip().lower(), schedule.strip())
    if re.match(r"(CRON_)?TZ=", text):
        raise ValueError("set the time zone in timeZone, not in the schedule")
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(f"{schedule!r} has {len(fields)} fields, not 5")
    parsed = [_cron_field(field, *spec) for field, spec in zip(fields, _CRON_FIELDS, strict=True)]
    return tuple(values for values, _ in parsed), parsed[2][1], parsed[4][1]


def shortest_cron_interval(schedule: str, days: int = 62) -> int | None:
    """Seconds between the two closest runs of a schedule over `days` days (None: fewer than two runs).

    Wall-clock arithmetic: a daylight-saving change may shorten one interval by an hour."""
    (minutes, hours, days_of_month, months, days_of_week), dom_any, dow_any = parse_cron(schedule)
    times_of_day = sorted(h * 60 + m for h in hours for m in minutes)
    runs = []
    start = date(2024, 1, 1)
    for offset in range(days):
        day = start + timedelta(days=offset)
        dom, dow = day.day in days_of_month, day.isoweekday() % 7 in days_of_week
        # cron's rule: if either day field is unrestricted, both must match; otherwise either may.
        if day.month in months and ((dom and dow) if (dom_any or dow_any) else (dom or dow)):
            runs.extend(offset * 1440 + t for t in times_of_day)
    gaps = [later - earlier for earlier, later in itertools.pairwise(runs)]
    return min(gaps) * 60 if gaps else None


@functools.lru_cache(maxsize=1)
def _time_zone_database_present() -> bool:
    return bool(zoneinfo.available_timezones())


def _schedule_problems(where: str, spec: Mapping[str, Any]) -> list[str]:
    problems = []
    try:
        parse_cron(str(spec.get("schedule", "")))
    except ValueError as error:
        problems.append(f"{where}.schedule: {error}")
    zone = spec.get("timeZone")
    if zone is not None and _time_zone_database_present():  # without one, no zone could be checked
        try:
            zoneinfo.ZoneInfo(str(zone))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            problems.append(f"{where}.timeZone {zone!r} is not an IANA time zone")
    return problems


def ray_cron_job_problems(spec: Mapping[str, Any]) -> list[str]:
    schedule_problems = _schedule_problems("spec", spec)
    template = _mapping(spec.get("jobTemplate"))
    problems = schedule_problems + ray_job_spec_problems("spec.jobTemplate", template)
    deadline = template.get("activeDeadlineSeconds")
    if schedule_problems or not isinstance(deadline, int):
        return problems
    # KubeRay 1.7's RayCronJob creates a RayJob at every tick whatever still runs: the deadline is what
    # keeps a run from overlapping the next.
    period = shortest_cron_interval(str(spec["schedule"]))
    if period is not None and spec.get("timeZone") not in UTC_ZONES:
        period -= 3600  # a daylight-saving change can shorten one interval by an hour
    if period is not None and deadline >= period:
        problems.append(f"spec.jobTemplate.activeDeadlineSeconds ({deadline}) must be shorter than the schedule's "
                        f"shortest interval ({period} s): RayCronJob has no concurrencyPolicy, so a longer run "
                        "would overlap the next")
    return problems


# -------------------------------------------------------------------------------------------- objects


def _pod_spec_of(obj: Manifest) -> tuple[str, Mapping[str, Any]] | None:
    spec = _mapping(obj.get("spec"))
    kind = obj.get("kind")
    if kind == "Pod":
        return "spec", spec
    if kind == "CronJob":
        return ("spec.jobTemplate.spec.template.spec",
                _mapping(_mapping(_mapping(_mapping(spec.get("jobTemplate")).get("spec")).get("template")).get("spec")))
    if kind in ("Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        return "spec.template.spec", _mapping(_mapping(spec.get("template")).get("spec"))
    return None


def object_problems(obj: Manifest, crd_validators: Mapping[str, Any] | None,
                    version: str = KUBERNETES_VERSION) -> list[str]:
    """Every problem with one Kubernetes object, as messages without the file and object name."""
    kind, api_version = obj.get("kind"), str(obj.get("apiVersion", ""))
    if not kind or not api_version:
        return ["apiVersion and kind are required"]
    spec = _mapping(obj.get("spec"))
    if api_version.split("/")[0] == KUBERAY_GROUP:
        if kind not in KUBERAY_CRD_FILES:
            return [f"{kind} is not a KubeRay kind this project uses ({', '.join(KUBERAY_CRD_FILES)})"]
        problems = []
        if crd_validators is not None:
            problems += [_schema_message(e) for e in sorted(
                crd_validators[kind].iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])]
        problems += metadata_errors(obj.get("metadata", {}), version)
        problems += _name_problems(kind, _mapping(obj.get("metadata")))
        if kind == "RayCluster":
            problems += ray_cluster_spec_problems("spec", spec)
        elif kind == "RayJob":
            problems += ray_job_spec_problems("spec", spec)
        else:
            problems += ray_cron_job_problems(spec)
        return problems

    problems = core_schema_errors(obj, version)
    if kind == "Secret":
        problems.append("Secrets do not belong in k8s/: create them in the cluster and reference them")
    elif kind == "Ingress":
        problems.append("no Ingress: the Ray dashboard and services stay inside the cluster")
    elif kind == "Service" and spec.get("type") in ("LoadBalancer", "NodePort"):
        problems.append(f"spec.type {spec['type']} exposes the service outside the cluster")
    elif kind == "CronJob":
        if spec.get("concurrencyPolicy") != "Forbid":
            problems.append("spec.concurrencyPolicy must be Forbid so that a run never overlaps the previous one")
        problems += _schedule_problems("spec", spec)
    pod = _pod_spec_of(obj)
    if pod is not None:
        problems += _pod_problems(*pod)
    return problems


def subject_of(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return "-"
    metadata = _mapping(obj.get("metadata"))
    name = metadata.get("name") or (f"{metadata['generateName']}*" if metadata.get("generateName") else "?")
    return f"{obj.get('kind', '?')}/{name}"


def _entrypoint_variables(spec: Mapping[str, Any]) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", str(spec.get("entrypoint", ""))))


def _submitter_environment(spec: Mapping[str, Any], config_maps: Mapping[str, set[str]]) -> set[str] | None:
    """Env names the submitter container gets; None when it loads a ConfigMap that is not in the output."""
    containers = _list(_mapping(_mapping(spec.get("submitterPodTemplate")).get("spec")).get("containers"))
    if not containers:
        return set()
    container = _mapping(containers[0])
    names = {str(_mapping(env).get("name")) for env in _list(container.get("env"))}
    for source in map(_mapping, _list(container.get("envFrom"))):
        reference = _mapping(source.get("configMapRef"))
        if reference:
            if reference.get("name") not in config_maps:
                return None
            names |= {str(source.get("prefix", "")) + key for key in config_maps[reference["name"]]}
    return names


def rendered_problems(docs: Sequence[Any], source: str, crd_validators: Mapping[str, Any] | None,
                      version: str = KUBERNETES_VERSION) -> list[Problem]:
    """Checks that need a whole kustomize output: each entrypoint's ${VARS} exist in what the submitter
    loads, and manifests packed into its ConfigMaps (the nightly RayJob template) are valid."""
    problems = []
    config_maps = {str(_mapping(d.get("metadata")).get("name")): set(_mapping(d.get("data")))
                   for d in docs if isinstance(d, Mapping) and d.get("kind") == "ConfigMap"}
    jobs: list[tuple[str, Mapping[str, Any], str]] = []
    for doc in docs:
        if not isinstance(doc, Mapping):
            continue
        if doc.get("kind") == "RayJob":
            jobs.append((subject_of(doc), _mapping(doc.get("spec")), "spec"))
        elif doc.get("kind") == "RayCronJob":
            jobs.append((subject_of(doc), _mapping(_mapping(doc.get("spec")).get("jobTemplate")), "spec.jobTemplate"))
        elif doc.get("kind") == "ConfigMap":
            for key, text in _mapping(doc.get("data")).items():
                if not key.endswith((".yaml", ".yml")):
                    continue
                inner = f"{source}[{subject_of(doc)} {key}]"
                try:
                    packed = [d for d in yaml.safe_load_all(str(text)) if d is not None]
                except yaml.YAMLError as error:
                    problems.append(Problem(inner, "-", f"YAML: {error}"))
                    continue
                problems += validate_documents(packed, inner, crd_validators, version)
                jobs += [(subject_of(d), _mapping(d.get("spec")), "spec")
                         for d in packed if isinstance(d, Mapping) and d.get("kind") == "RayJob"]
    for subject, spec, where in jobs:
        available = _submitter_environment(spec, config_maps)
        if available is None:
            continue
        for name in sorted(_entrypoint_variables(spec) - available):
            problems.append(Problem(source, subject, f"{where}.entrypoint uses ${{{name}}}, which the submitter "
                                    "container does not get (env or envFrom)"))
    return problems


def validate_documents(docs: Sequence[Any], source: str, crd_validators: Mapping[str, Any] | None,
                       version: str = KUBERNETES_VERSION) -> list[Problem]:
    problems = []
    for index, doc in enumerate(docs):
        if not isinstance(doc, Mapping):
            problems.append(Problem(source, "-", f"document {index + 1} is not a mapping"))
            continue
        subject = subject_of(doc)
        problems += [Problem(source, subject, message)
                     for message in object_problems(dict(doc), crd_validators, version)]
    return problems


def load_yaml_documents(path: Path) -> list[Any]:
    with open(path, encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def validate_file(path: Path, crd_validators: Mapping[str, Any] | None,
                  version: str = KUBERNETES_VERSION) -> list[Problem]:
    source = _display(path)
    try:
        docs = load_yaml_documents(path)
    except (OSError, yaml.YAMLError) as error:
        return [Problem(source, "-", f"cannot read: {error}")]
    return validate_documents(docs, source, crd_validators, version)


# ------------------------------------------------------------------------------------------ kustomize


def kustomize_command() -> list[str] | None:
    """`kustomize build`, else kubectl's built-in `kubectl kustomize`; None when neither is installed."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render_kustomization(directory: Path, command: Sequence[str]) -> list[Any]:
    """The objects `kubectl apply -k directory` would send. Raises RuntimeError when kustomize fails."""
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise RuntimeError(f"{' '.join(command)} failed: {message}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def _is_kustomization(directory: Path) -> bool:
    """A directory kustomize can build: it has a kustomization file that is not a Component."""
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            try:
                return _mapping(yaml.safe_load(path.read_text(encoding="utf-8"))).get("kind") != "Component"
            except yaml.YAMLError:
                return True  # let kustomize report it
    return False


def discover(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """The manifest files and kustomization directories under `paths`."""
    files: list[Path] = []
    directories: list[Path] = []
    for path in paths:
        if path.is_dir():
            for candidate in sorted([*path.rglob("*.yaml"), *path.rglob("*.yml")]):
                if candidate.name not in KUSTOMIZATION_FILES:
                    files.append(candidate)
            directories += [d for d in sorted({path, *(p for p in path.rglob("*") if p.is_dir())})
                            if _is_kustomization(d)]
        elif path.name in KUSTOMIZATION_FILES:
            if _is_kustomization(path.parent):
                directories.append(path.parent)
        else:
            files.append(path)
    return files, directories


# ----------------------------------------------------------------------------------------------- main


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_kuberay_schemas(crd_dir: Path | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """(validators, None), or (None, why the KubeRay schema checks are skipped). Raises on unreadable CRDs."""
    crd_dir = crd_dir or default_crd_dir()
    if not crd_dir.is_dir():
        return None, (f"KubeRay CRD schema checks skipped: {crd_dir} does not exist (set {CRD_DIR_ENV} to "
                      "a directory holding ray.io_rayclusters.yaml, ray.io_rayjobs.yaml and ray.io_raycronjobs.yaml)")
    return load_crd_validators(crd_dir.resolve()), None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path, help="manifests or directories (default: k8s/)")
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION,
                        help=f"validate core kinds for this Kubernetes version (default: {KUBERNETES_VERSION})")
    args = parser.parse_args(argv)
    paths = args.paths or [Path(__file__).resolve().parent]
    version = args.kubernetes_version
    try:
        core_schema_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe"}}, version)
    except Exception:  # kubernetes-validate raises its own, unexported error for versions it lacks
        parser.error(f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for Kubernetes {version}")

    problems: list[Problem] = []
    try:
        validators, skipped = load_kuberay_schemas()
    except (OSError, ValueError, KeyError, yaml.YAMLError) as error:
        validators, skipped = None, None
        problems.append(Problem(str(default_crd_dir()), "CRDs", f"cannot load the KubeRay CRDs: {error}"))
    if skipped:
        print(skipped)

    files, directories = discover(paths)
    for path in files:
        problems += validate_file(path, validators, version)

    command = kustomize_command()
    if directories and command is None:
        print("kustomize output not checked: neither kustomize nor kubectl is installed")
    rendered = 0
    for directory in directories if command else []:
        source = f"{_display(directory)}[kustomize]"
        try:
            docs = render_kustomization(directory, command)
        except (RuntimeError, subprocess.TimeoutExpired, yaml.YAMLError) as error:
            problems.append(Problem(source, "-", str(error)))
            continue
        rendered += 1
        problems += validate_documents(docs, source, validators, version)
        problems += rendered_problems(docs, source, validators, version)

    for problem in problems:
        print(problem)
    outcome = f"{len(problems)} problem{'s' * (len(problems) != 1)}" if problems else "no problems"
    print(f"{len(files)} files and {rendered} kustomize outputs checked: {outcome}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
