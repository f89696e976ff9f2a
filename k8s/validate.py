#!/usr/bin/env python3
"""Validate cnnbatch's Kubernetes manifests offline: `python -m k8s.validate [PATH ...]` (make validate-k8s).

PATH, a manifest or a directory (default k8s/): each YAML file, and the output of each kustomization under it
when kustomize or kubectl is installed. Schemas: core kinds strictly with kubernetes-validate (Kubernetes
1.30); KubeRay kinds with jsonschema against the CRDs in ../shared/kuberay-crds (or $CNNBATCH_KUBERAY_CRDS),
unknown fields refused, skipped with a printed reason when absent. Then the project's policies, which neither
the API server nor the KubeRay operator checks: Ray token auth on every cluster, the dashboard inside it; GPU
worker groups request, limit and tolerate nvidia.com/gpu; no work on the head; /dev/shm in memory; RayJobs
end and run `python -m jobs.*`; the "restricted" Pod Security Standard; no credentials; valid cron schedules
(cronsim) whose runs cannot overlap. Prints `file:Kind/name: message` per problem; exit status 1 if any.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import subprocess
import sys
import zoneinfo
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import cronsim
import jsonschema
import kubernetes_validate
import yaml

K8S_DIR = Path(__file__).resolve().parent
KUBERNETES_VERSION = "1.30"
CRD_DIR_ENV = "CNNBATCH_KUBERAY_CRDS"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
GPU = "nvidia.com/gpu"
JOBS = ("extract", "train", "finetune", "predict")
ENTRYPOINT = re.compile(rf"python -m jobs\.({'|'.join(JOBS)})(\s|$)")
# Env names whose values are credentials; *_FILE and *_PATH name files, not secrets.
SECRET_ENV = re.compile(r"^(?!.*_(FILE|PATH)$).*(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY"
                        r"|CREDENTIALS?$)")
CRON_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
               "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
UTC_ZONES = {"UTC", "Etc/UTC", "Etc/GMT", "GMT", "Etc/Universal", "Universal", "Etc/Zulu", "Zulu"}
Validators = Mapping[str, Any]


def dig(node: Any, path: str) -> Any:
    """node[a][b]... for path "a.b...", None where a key is missing or a value is not a mapping."""
    for key in path.split("."):
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


def crd_dir() -> Path:
    return Path(os.environ.get(CRD_DIR_ENV) or K8S_DIR.parents[1] / "shared" / "kuberay-crds")


def refuse_unknown_fields(schema: Any) -> Any:
    """`additionalProperties: false` wherever `properties` are listed: CRD schemas let misspelt fields pass."""
    if isinstance(schema, list):
        return [refuse_unknown_fields(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: refuse_unknown_fields(value) for key, value in schema.items()}
    if "properties" in strict and not strict.get("x-kubernetes-preserve-unknown-fields"):
        strict.setdefault("additionalProperties", False)  # maps (additionalProperties given) stay open
    return strict


def kuberay_validators(directory: Path | None = None) -> Validators | None:
    """One jsonschema validator per KubeRay kind from its CRD's v1 schema; None when the CRDs are absent."""
    directory = (directory or crd_dir()).resolve()
    return _load_crds(directory) if directory.is_dir() else None


@functools.lru_cache(maxsize=4)
def _load_crds(directory: Path) -> Validators:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
    validators = {}
    for kind, filename in CRD_FILES.items():
        crd = yaml.load((directory / filename).read_text(encoding="utf-8"), Loader=loader)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        validators[kind] = jsonschema.Draft7Validator(refuse_unknown_fields(version["schema"]["openAPIV3Schema"]))
    return validators


def _located(error: Any) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    return f"{where}: {error.message}" if where else error.message


def core_schema_problems(obj: Mapping[str, Any]) -> list[str]:
    """kubernetes-validate in strict mode (it reports the first error it finds)."""
    try:
        kubernetes_validate.validate(dict(obj), KUBERNETES_VERSION, strict=True)
    except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as error:
        return [_located(error) if hasattr(error, "absolute_path") else error.message]
    return []


def pod_problems(where: str, pod: Mapping[str, Any]) -> list[str]:
    """The "restricted" Pod Security Standard, and no credentials written into the env."""
    context = pod.get("securityContext") or {}
    broken = {f"{where}.{key} must not be set": pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC")}
    broken[f"{where}.securityContext.runAsNonRoot must be true, runAsUser not 0"] = (
        context.get("runAsNonRoot") is not True or context.get("runAsUser") == 0)
    broken[f"{where}.securityContext.seccompProfile.type must be RuntimeDefault"] = dig(
        context, "seccompProfile.type") not in ("RuntimeDefault", "Localhost")
    secrets = []
    for field in ("initContainers", "containers"):
        for index, container in enumerate(pod.get(field) or []):
            at, security = f"{where}.{field}[{index}]", container.get("securityContext") or {}
            broken[f"{at}.securityContext.allowPrivilegeEscalation must be false, privileged unset"] = (
                security.get("allowPrivilegeEscalation") is not False or security.get("privileged"))
            broken[f"{at}.securityContext.capabilities.drop must include ALL, runAsUser not be 0"] = (
                "ALL" not in (dig(security, "capabilities.drop") or []) or security.get("runAsUser") == 0)
            secrets += [f"{at}.env {env['name']} has an inline value: no credentials in k8s/, reference a Secret or "
                        "the platform's identity" for env in container.get("env") or []
                        if "value" in env and SECRET_ENV.search(env["name"].upper())]
    return [f"{message} (restricted pod security)" for message, bad in broken.items() if bad] + secrets


def group_problems(where: str, group: Mapping[str, Any], *, head: bool) -> tuple[bool, list[str]]:
    """Whether a Ray head or worker group holds GPUs, and what it misses."""
    pod = dig(group, "template.spec") or {}
    container = (pod.get("containers") or [{}])[0]
    problems = pod_problems(f"{where}.template.spec", pod)
    in_memory = {v.get("name") for v in pod.get("volumes") or [] if dig(v, "emptyDir.medium") == "Memory"}
    if not any(m.get("mountPath") == "/dev/shm" and m.get("name") in in_memory for m in container.get(
            "volumeMounts") or []):
        problems.append(f"{where}: the Ray container must mount /dev/shm from an emptyDir with medium: Memory "
                        "(Ray's object store)")
    if head and str(dig(group, "rayStartParams.num-cpus")) != "0":
        problems.append(f'{where}.rayStartParams.num-cpus must be "0" so that no task or actor lands on the head')
    requests, limits = ((dig(container, f"resources.{field}") or {}).get(GPU) for field in ("requests", "limits"))
    tolerations = pod.get("tolerations") or []
    if head or not (requests or limits or dig(group, "rayStartParams.num-gpus") or dig(group, "resources.GPU")
                    or any(t.get("key") == GPU for t in tolerations)):
        return False, problems
    at = f"{where}.template.spec.containers[0].resources"
    problems += [f"{at}.{field} must include {GPU} (GPU worker group)"
                 for field, value in (("requests", requests), ("limits", limits)) if value is None]
    if not any(t.get("key") == GPU or (t.get("operator") == "Exists" and not t.get("key")) for t in tolerations):
        problems.append(f"{where}.template.spec.tolerations must tolerate the {GPU} taint (GPU worker group)")
    return True, problems


def cluster_problems(where: str, spec: Mapping[str, Any]) -> list[str]:
    problems = [] if dig(spec, "authOptions.mode") == "token" else [
        f"{where}.authOptions.mode must be token (Ray token authentication wherever a head is defined)"]
    head = spec.get("headGroupSpec") or {}
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append(f"{where}.headGroupSpec: serviceType must be ClusterIP and enableIngress unset: the dashboard "
                        "stays inside the cluster")
    problems += group_problems(f"{where}.headGroupSpec", head, head=True)[1]
    workers = [group_problems(f"{where}.workerGroupSpecs[{index}]", group, head=False)
               for index, group in enumerate(spec.get("workerGroupSpecs") or [])]
    problems += [problem for _, found in workers for problem in found]
    return problems + ([] if any(is_gpu for is_gpu, _ in workers) else [
        f"{where}.workerGroupSpecs needs a GPU worker group ({GPU})"])


def job_problems(where: str, spec: Mapping[str, Any]) -> list[str]:
    problems = [] if spec.get("shutdownAfterJobFinishes") is True else [
        f"{where}.shutdownAfterJobFinishes must be true so that the Ray cluster goes away"]
    problems += [f"{where}.{key} must be set so that a finished or stuck job ends"
                 for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds") if spec.get(key) is None]
    if not ENTRYPOINT.match(" ".join(str(spec.get("entrypoint", "")).split())):
        problems.append(f"{where}.entrypoint must run python -m jobs.<{'|'.join(JOBS)}>")
    if spec.get("submitterPodTemplate"):
        problems += pod_problems(f"{where}.submitterPodTemplate.spec", dig(spec, "submitterPodTemplate.spec") or {})
    return problems + (cluster_problems(f"{where}.rayClusterSpec", spec["rayClusterSpec"])
                       if spec.get("rayClusterSpec") else [])


def cron_runs(schedule: str, days: int = 62) -> list[datetime]:
    """The runs of a standard 5-field cron schedule over `days` days from 2024-01-01. Raises ValueError."""
    text = CRON_MACROS.get(schedule.strip().lower(), schedule.strip())
    if len(text.split()) != 5:
        raise ValueError(f"{schedule!r} is not a 5-field cron schedule")
    start = datetime(2024, 1, 1)
    try:  # CronSim yields the runs after its start
        runs = cronsim.CronSim(text, start - timedelta(minutes=1))
        return list(itertools.takewhile(lambda t: t < start + timedelta(days=days), runs))
    except cronsim.CronSimError as error:
        raise ValueError(f"{schedule!r} is not a valid cron schedule: {error}") from error


def schedule_problems(spec: Mapping[str, Any], deadline: Any = None) -> list[str]:
    """A valid schedule and time zone; with `deadline` (RayCronJob, no concurrencyPolicy), runs that cannot
    overlap: the deadline shorter than the shortest interval (less an hour for daylight saving outside UTC)."""
    zone = spec.get("timeZone")
    try:
        if zone is not None and zoneinfo.available_timezones():  # without a zone database, none can be checked
            zoneinfo.ZoneInfo(str(zone))
        runs = cron_runs(str(spec.get("schedule", "")))
    except (ValueError, zoneinfo.ZoneInfoNotFoundError) as error:
        return [f"spec.schedule/timeZone: {error}"]
    gaps = [(b - a).total_seconds() - (0 if zone in UTC_ZONES else 3600) for a, b in itertools.pairwise(runs)]
    if isinstance(deadline, int) and gaps and deadline >= min(gaps):
        return [f"spec.jobTemplate.activeDeadlineSeconds ({deadline}) must be shorter than the schedule's shortest "
                f"interval ({min(gaps):.0f} s): no overlap, and RayCronJob has no concurrencyPolicy"]
    return []


def object_problems(obj: Mapping[str, Any], validators: Validators | None) -> list[str]:
    """Every problem with one Kubernetes object (schema, then project policies)."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if str(obj.get("apiVersion", "")).startswith("ray.io/"):
        if kind not in CRD_FILES:
            return [f"{kind} is not a KubeRay kind this project uses ({', '.join(CRD_FILES)})"]
        problems = [_located(e) for e in validators[kind].iter_errors(obj)] if validators else []
        # The CRDs leave metadata open: check it strictly as ObjectMeta.
        problems += core_schema_problems({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata")})
        if kind == "RayCluster":
            return problems + cluster_problems("spec", spec)
        if kind == "RayJob":
            return problems + job_problems("spec", spec)
        template = spec.get("jobTemplate") or {}
        return problems + schedule_problems(spec, template.get("activeDeadlineSeconds")) + job_problems(
            "spec.jobTemplate", template)
    problems = core_schema_problems(obj)
    if kind == "Secret":
        problems.append("no Secrets in k8s/: create them in the cluster and reference them")
    elif kind == "Ingress" or (kind == "Service" and spec.get("type") in ("LoadBalancer", "NodePort")):
        problems.append("no Ingress, LoadBalancer or NodePort: the Ray dashboard and services stay inside the cluster")
    elif kind == "CronJob":
        if spec.get("concurrencyPolicy") != "Forbid":
            problems.append("spec.concurrencyPolicy must be Forbid so that a run never overlaps the previous one")
        problems += schedule_problems(spec)
    path = {"Pod": "spec", "CronJob": "spec.jobTemplate.spec.template.spec"}.get(kind, "spec.template.spec")
    if kind in ("Pod", "CronJob", "Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        problems += pod_problems(path, dig(obj, path) or {})
    return problems


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def kustomize_command() -> list[str] | None:
    """`kustomize build`, else `kubectl kustomize`, else None."""
    return next(([*c] for c in (("kustomize", "build"), ("kubectl", "kustomize")) if shutil.which(c[0])), None)


def kustomizations(root: Path) -> list[Path]:
    """The directories under root that kustomize builds (a kustomization.yaml that is not a Component)."""
    return [path.parent for path in sorted(root.rglob("kustomization.yaml"))
            if load_documents(path)[0].get("kind") != "Component"]


def render(directory: Path) -> list[dict[str, Any]]:
    """What `kubectl apply -k directory` sends. Raises RuntimeError (kustomize failed or missing)."""
    command = kustomize_command()
    if command is None:
        raise RuntimeError("neither kustomize nor kubectl is installed")
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {' '.join(result.stderr.split())}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def subject(doc: Mapping[str, Any]) -> str:
    """Kind/name of a manifest (Kind/prefix* for a generateName)."""
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind', '?')}/{meta.get('name') or str(meta.get('generateName', '?')) + '*'}"


def validate_documents(docs: Sequence[Any], source: str, validators: Validators | None) -> list[str]:
    lines = []
    for doc in docs:
        messages = object_problems(doc, validators) if isinstance(doc, Mapping) else ["not a mapping"]
        lines += [f"{source}:{subject(doc) if isinstance(doc, Mapping) else '-'}: {m}" for m in messages]
    return lines


def validate_tree(root: Path = K8S_DIR, crds: Path | None = None) -> list[str]:
    """Problems, one line each, with the manifests at root (a file or a directory) and, when kustomize or
    kubectl is installed, with the output of every kustomization under it. KubeRay schemas from `crds`
    (default ../shared/kuberay-crds), skipped when absent."""
    validators, problems = kuberay_validators(crds), []
    files = [root] if root.is_file() else [
        p for p in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]) if p.name != "kustomization.yaml"]
    sources = [(str(path), functools.partial(load_documents, path)) for path in files] + [
        (f"{directory}[kustomize]", functools.partial(render, directory))
        for directory in (kustomizations(root) if root.is_dir() and kustomize_command() else [])]
    for source, load in sources:
        try:
            problems += validate_documents(load(), source, validators)
        except (OSError, RuntimeError, subprocess.TimeoutExpired, yaml.YAMLError) as error:
            problems.append(f"{source}:-: {' '.join(str(error).split())}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)] or [K8S_DIR]
    if kuberay_validators() is None:
        print(f"KubeRay CRD schema checks skipped: {crd_dir()} is absent (../shared is absent; or set {CRD_DIR_ENV})")
    if kustomize_command() is None:
        print("kustomize output not checked: neither kustomize nor kubectl is installed")
    problems = [line for path in paths for line in validate_tree(path)]
    for line in problems:
        print(line)
    print(f"{len(problems) or 'no'} problem(s) in {', '.join(map(str, paths))}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
