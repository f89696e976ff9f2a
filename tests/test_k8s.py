"""The Kubernetes side: k8s/validate.py passes the real manifests and refuses broken ones, the manifests and
the Dockerfile agree with each other, and the nightly launcher script does what its CronJob relies on.

Broken manifests are built here from the real ones (deep copy + one mutation). Checks against the KubeRay
CRD schemas need ../shared/kuberay-crds and skip without it; everything else runs anywhere. No TensorFlow,
no Ray: this module runs in a few seconds.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
STAGES = ("extract", "train", "predict")
NIGHTLY_TEMPLATE = K8S / "nightly-predict-rayjob.yaml"
LAUNCHER = K8S / "nightly-predict-launch.sh"


def _load_validate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cnnbatch_k8s_validate", K8S / "validate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


validate = _load_validate()


def load(path: Path) -> list[dict[str, Any]]:
    return validate.load_yaml_documents(path)


def load_one(path: Path, kind: str | None = None) -> dict[str, Any]:
    docs = [d for d in load(path) if kind is None or d["kind"] == kind]
    assert len(docs) == 1, f"{path}: expected one {kind or 'document'}"
    return docs[0]


def config_values() -> dict[str, str]:
    """The literals of the cnnbatch-config ConfigMap in k8s/config, the one place for settings."""
    component = load_one(K8S / "config" / "kustomization.yaml")
    (generator,) = [g for g in component["configMapGenerator"] if g["name"] == "cnnbatch-config"]
    return dict(literal.split("=", 1) for literal in generator["literals"])


@pytest.fixture(scope="module")
def crds() -> dict[str, Any]:
    directory = validate.default_crd_dir()
    if not directory.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {directory} (../shared/kuberay-crds or ${validate.CRD_DIR_ENV})")
    return validate.load_crd_validators(directory.resolve())


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """What `kubectl apply -k` would send, per kustomization directory under k8s/ ("." for k8s/ itself)."""
    command = validate.kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed, so kustomize output cannot be rendered")
    return {directory.relative_to(K8S).as_posix(): validate.render_kustomization(directory, command)
            for directory in validate.discover([K8S])[1]}


# ------------------------------------------------------------------------------------- the real manifests


def test_validate_script_passes_the_repository(capsys: pytest.CaptureFixture[str]) -> None:
    assert validate.main([]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("path", sorted(p.relative_to(K8S).as_posix() for p in validate.discover([K8S])[0]))
def test_each_plain_manifest_is_valid_on_its_own(path: str, crds: dict[str, Any]) -> None:
    assert validate.validate_file(K8S / path, crds) == []


def test_kustomize_outputs_are_valid(rendered: dict[str, list[dict[str, Any]]], crds: dict[str, Any]) -> None:
    assert set(rendered) == {".", "extract", "train", "predict", "interactive", "raycronjob"}
    for directory, docs in rendered.items():
        source = f"{directory}[kustomize]"
        assert validate.validate_documents(docs, source, crds) == []
        assert validate.rendered_problems(docs, source, crds) == []


def container_images(node: Any) -> set[str]:
    """The image of every container and init container anywhere in a manifest."""
    images: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers"):
                images.update(container["image"] for container in value)
            images |= container_images(value)
    elif isinstance(node, list):
        for item in node:
            images |= container_images(item)
    return images


def test_settings_come_from_the_config_component(rendered: dict[str, list[dict[str, Any]]]) -> None:
    config = config_values()
    images, schedules, zones, namespaces = set(), set(), set(), set()
    for docs in rendered.values():
        for doc in docs:
            namespaces.add(doc["metadata"].get("namespace"))
            images |= container_images(doc)
            if doc["kind"] in ("CronJob", "RayCronJob"):
                schedules.add(doc["spec"]["schedule"])
                zones.add(doc["spec"]["timeZone"])
    # The launcher's own image is not cnnbatch's; the nightly template's placeholder is filled at run time
    # from the same ConfigMap (test_launcher_creates_the_rayjob_and_waits_for_success).
    assert images == {config["CNNBATCH_IMAGE"], "docker.io/alpine/k8s:1.33.0"}
    assert schedules == {config["CNNBATCH_NIGHTLY_SCHEDULE"]}
    assert zones == {config["CNNBATCH_NIGHTLY_TIME_ZONE"]}
    assert namespaces == {load_one(K8S / "config" / "kustomization.yaml")["namespace"]}


def test_bucket_paths_are_written_in_one_place_only() -> None:
    holders = [p.relative_to(K8S).as_posix() for p in sorted(K8S.rglob("*.yaml"))
               if re.search(r"\b(s3|gs)://", p.read_text(encoding="utf-8"))]
    assert holders == ["config/kustomization.yaml"]


def test_every_stage_has_its_rayjob() -> None:
    for stage in STAGES:
        job = load_one(K8S / stage / "rayjob.yaml", "RayJob")
        assert job["metadata"]["name"] == f"cnnbatch-{stage}"
        assert job["spec"]["entrypoint"].startswith(f"python -m jobs.{stage} ")
        assert load_one(K8S / stage / "kustomization.yaml")["resources"] == ["rayjob.yaml"]


def test_training_cluster_is_one_gpu_worker() -> None:
    (group,) = load_one(K8S / "train" / "rayjob.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["maxReplicas"] == 1
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_workers_flag_matches_the_gpus_of_the_worker_group() -> None:
    for path in [K8S / "extract" / "rayjob.yaml", K8S / "predict" / "rayjob.yaml", NIGHTLY_TEMPLATE]:
        spec = load_one(path)["spec"]
        (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
        gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        workers = int(re.search(r"--workers (\d+)", spec["entrypoint"]).group(1))
        per_worker = float(re.search(r"--gpus-per-worker ([\d.]+)", spec["entrypoint"]).group(1))
        assert workers * per_worker == group["replicas"] * gpus, path


# The job CLI of ../shared/CONTRACT.md (--precision from the performance issue): what an entrypoint may pass.
JOB_FLAGS = {
    "extract": {"--input", "--output", "--backbone", "--weights", "--image-size", "--batch-size", "--shard-size",
                "--workers", "--gpus-per-worker", "--precision"},
    "train": {"--features", "--output", "--head", "--epochs", "--validation-split"},
    "predict": {"--input", "--model", "--output", "--top-k", "--workers", "--gpus-per-worker", "--precision"},
}
RAYJOB_SPECS = {
    **{stage: K8S / stage / "rayjob.yaml" for stage in STAGES},
    "nightly template": NIGHTLY_TEMPLATE,
    "raycronjob": K8S / "raycronjob" / "raycronjob.yaml",
}


def _job_spec(path: Path) -> dict[str, Any]:
    doc = load_one(path)
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


@pytest.mark.parametrize("name", sorted(RAYJOB_SPECS))
def test_entrypoint_expands_to_the_job_cli(name: str, tmp_path: Path) -> None:
    """KubeRay's submitter runs `bash -ce "... ray job submit ... -- <entrypoint> ..."` with the pod's env; here
    the env is k8s/config's ConfigMap and `ray` a stub that prints the argv it receives."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash to expand the entrypoint with")
    entrypoint = " ".join(_job_spec(RAYJOB_SPECS[name])["entrypoint"].split())
    stub = tmp_path / "ray"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n", encoding="utf-8")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    config = config_values()
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}", **config}
    result = subprocess.run([bash, "-ce", "--", f"ray job submit --address http://head:8265 -- {entrypoint} ;"],
                            env=env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    assert argv[:5] == ["job", "submit", "--address", "http://head:8265", "--"]
    python, dash_m, module, *arguments = argv[5:]
    assert [python, dash_m] == ["python", "-m"] and module.startswith("jobs.")
    flags, values = arguments[0::2], arguments[1::2]
    assert set(flags) <= JOB_FLAGS[module.removeprefix("jobs.")], flags
    assert len(flags) == len(values) and all(values) and not any("$" in v for v in values)
    used = re.findall(r"\$\{(\w+)", entrypoint)
    assert used and all(config[variable] in values for variable in used)


def test_both_nightly_variants_run_the_same_job() -> None:
    template = load_one(NIGHTLY_TEMPLATE)["spec"]
    cron_job = load_one(K8S / "raycronjob" / "raycronjob.yaml")["spec"]["jobTemplate"]
    text = yaml.safe_dump(template).replace("__CNNBATCH_IMAGE__", "cnnbatch")
    assert yaml.safe_load(text) == cron_job


def test_launcher_role_grants_only_what_the_script_uses() -> None:
    role = load_one(K8S / "nightly-predict-rbac.yaml", "Role")
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert set(rule["verbs"]) <= {"create", "get", "list", "watch"}
    used = set(re.findall(r"\bkubectl (\w+)", LAUNCHER.read_text(encoding="utf-8")))
    assert used == set(rule["verbs"])


def test_launcher_fills_every_placeholder_of_the_template() -> None:
    placeholders = set(re.findall(r"__[A-Z_]+__", yaml.safe_dump(load_one(NIGHTLY_TEMPLATE))))
    substituted = set(re.findall(r"s\|(__[A-Z_]+__)\|", LAUNCHER.read_text(encoding="utf-8")))
    assert placeholders and placeholders == substituted


# ------------------------------------------------------------------------------------ broken manifests


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _worker_resources(job: dict[str, Any]) -> dict[str, Any]:
    return _worker(job)["template"]["spec"]["containers"][0]["resources"]


def _head(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]


Mutation = Callable[[dict[str, Any]], None]
EXTRACT = K8S / "extract" / "rayjob.yaml"
CRONJOB = K8S / "nightly-predict-cronjob.yaml"
RAYCRONJOB = K8S / "raycronjob" / "raycronjob.yaml"
INTERACTIVE = K8S / "interactive" / "raycluster.yaml"

# (id, manifest, mutation, expected message fragment): checks that need no CRD schema.
RULE_BREAKS: list[tuple[str, Path, Mutation, str]] = [
    ("missing GPU limit", EXTRACT, lambda j: _worker_resources(j)["limits"].pop("nvidia.com/gpu"),
     "limits must include nvidia.com/gpu"),
    ("missing GPU request", EXTRACT, lambda j: _worker_resources(j)["requests"].pop("nvidia.com/gpu"),
     "requests must include nvidia.com/gpu"),
    ("GPU requests differ from limits", EXTRACT,
     lambda j: _worker_resources(j)["limits"].update({"nvidia.com/gpu": "2"}), "must be equal"),
    ("no GPU toleration", EXTRACT, lambda j: _worker(j)["template"]["spec"].pop("tolerations"),
     "must tolerate the nvidia.com/gpu taint"),
    ("no GPU worker group", EXTRACT, lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"].clear(),
     "needs a GPU worker group"),
    ("over-long RayJob name", EXTRACT, lambda j: j["metadata"].update(name="cnnbatch-extract-" + "x" * 31),
     "KubeRay accepts at most 47 for a RayJob"),
    ("RayJob name not DNS-1035", EXTRACT, lambda j: j["metadata"].update(name="Cnnbatch_extract"),
     "DNS-1035"),
    ("over-long generateName", NIGHTLY_TEMPLATE, lambda j: j["metadata"].update(generateName="n" * 42 + "-"),
     "plus 5 generated characters is 48 characters; KubeRay accepts at most 47"),
    ("over-long RayCronJob name", RAYCRONJOB, lambda j: j["metadata"].update(name="cnnbatch-nightly-bulk-predictions"
                                                                             "-job"),
     "is 37 characters; KubeRay accepts at most 36 for a RayCronJob"),
    ("neither rayClusterSpec nor clusterSelector", EXTRACT, lambda j: j["spec"].pop("rayClusterSpec"),
     "one of rayClusterSpec or clusterSelector"),
    ("cluster kept after the job", EXTRACT, lambda j: j["spec"].update(shutdownAfterJobFinishes=False),
     "shutdownAfterJobFinishes must be true"),
    ("no TTL", EXTRACT, lambda j: j["spec"].pop("ttlSecondsAfterFinished"), "ttlSecondsAfterFinished must be set"),
    ("no deadline", EXTRACT, lambda j: j["spec"].pop("activeDeadlineSeconds"), "activeDeadlineSeconds must be set"),
    ("entrypoint not a stage", EXTRACT, lambda j: j["spec"].update(entrypoint="python train.py"),
     "entrypoint must run python -m jobs."),
    ("work on the head", EXTRACT, lambda j: _head(j)["rayStartParams"].update({"num-cpus": "4"}),
     'num-cpus must be "0"'),
    ("token auth off", EXTRACT, lambda j: j["spec"]["rayClusterSpec"].pop("authOptions"),
     "authOptions.mode must be token"),
    ("token auth without rayVersion", EXTRACT, lambda j: j["spec"]["rayClusterSpec"].pop("rayVersion"),
     "rayVersion is required with token auth"),
    ("token auth on an old Ray", EXTRACT, lambda j: j["spec"]["rayClusterSpec"].update(rayVersion="2.40.0"),
     "below 2.52.0"),
    ("dashboard on a LoadBalancer", INTERACTIVE,
     lambda c: c["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"), "serviceType must be ClusterIP"),
    ("dashboard behind an Ingress", INTERACTIVE, lambda c: c["spec"]["headGroupSpec"].update(enableIngress=True),
     "enableIngress must not be set"),
    ("object store on disk", EXTRACT, lambda j: _worker(j)["template"]["spec"]["volumes"][0]["emptyDir"].pop("medium"),
     "/dev/shm from an emptyDir with medium: Memory"),
    ("min above max replicas", INTERACTIVE, lambda c: c["spec"]["workerGroupSpecs"][0].update(minReplicas=5),
     "greater than maxReplicas"),
    ("inline credentials", EXTRACT, lambda j: _worker(j)["template"]["spec"]["containers"][0].update(
        env=[{"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-real-key"}]), "has an inline value"),
    ("root pod", EXTRACT, lambda j: _head(j)["template"]["spec"]["securityContext"].pop("runAsNonRoot"),
     "runAsNonRoot must be true"),
    ("privilege escalation", CRONJOB, lambda c: c["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
     ["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation must be false"),
    ("CronJob without Forbid", CRONJOB, lambda c: c["spec"].update(concurrencyPolicy="Allow"),
     "concurrencyPolicy must be Forbid"),
    ("CronJob with the default concurrency", CRONJOB, lambda c: c["spec"].pop("concurrencyPolicy"),
     "concurrencyPolicy must be Forbid"),
    ("invalid schedule", CRONJOB, lambda c: c["spec"].update(schedule="30 25 * * *"), "hour '25' is not in 0-23"),
    ("time zone in the schedule", RAYCRONJOB, lambda c: c["spec"].update(schedule="TZ=UTC 30 2 * * *"),
     "set the time zone in timeZone"),
    ("RayCronJob runs overlapping", RAYCRONJOB, lambda c: c["spec"].update(schedule="0 */4 * * *"),
     "must be shorter than the schedule's shortest interval (14400 s)"),
    # Core kinds go through kubernetes-validate, which ships its schemas: no CRD needed.
    ("unknown field in a CronJob", CRONJOB, lambda c: c["spec"].update(schedul="30 2 * * *"),
     "'schedul' was unexpected"),
    ("wrong type in a CronJob", CRONJOB, lambda c: c["spec"].update(successfulJobsHistoryLimit="3"),
     "successfulJobsHistoryLimit: '3' is not of type 'integer'"),
    ("unknown field in RayJob metadata", EXTRACT, lambda j: j["metadata"].update(lables={"a": "b"}),
     "'lables' was unexpected"),
]

# The same against the KubeRay CRD schemas.
SCHEMA_BREAKS: list[tuple[str, Path, Mutation, str]] = [
    ("unknown field in a worker's resources", EXTRACT, lambda j: _worker_resources(j).update(limts={"cpu": "1"}),
     "resources: Additional properties are not allowed ('limts' was unexpected)"),
    ("unknown field in a RayJob spec", EXTRACT, lambda j: j["spec"].update(shutdownAfterJobFinished=True),
     "'shutdownAfterJobFinished' was unexpected"),
    ("unknown top-level field", EXTRACT, lambda j: j.update(sepc={}), "'sepc' was unexpected"),
    ("wrong type for replicas", EXTRACT, lambda j: _worker(j).update(replicas="four"),
     "workerGroupSpecs[0].replicas: 'four' is not of type 'integer'"),
    ("wrong type for rayStartParams", EXTRACT, lambda j: _head(j)["rayStartParams"].update({"num-cpus": 0}),
     "rayStartParams.num-cpus: 0 is not of type 'string'"),
    ("unknown auth mode", EXTRACT, lambda j: j["spec"]["rayClusterSpec"]["authOptions"].update(mode="password"),
     "'password' is not one of ['disabled', 'token']"),
    ("unknown field in a RayCronJob", RAYCRONJOB, lambda c: c["spec"].update(concurrencyPolicy="Forbid"),
     "'concurrencyPolicy' was unexpected"),
    ("unknown field in a RayCluster pod", INTERACTIVE, lambda c: c["spec"]["headGroupSpec"]["template"]["spec"].update(
        serviceAcountName="cnnbatch"), "'serviceAcountName' was unexpected"),
]


def _broken(path: Path, mutate: Mutation) -> dict[str, Any]:
    (original,) = [d for d in load(path) if d["kind"] in ("RayJob", "RayCluster", "RayCronJob", "CronJob")]
    broken = copy.deepcopy(original)
    mutate(broken)
    return broken


@pytest.mark.parametrize(("path", "mutate", "expected"), [case[1:] for case in RULE_BREAKS],
                         ids=[case[0] for case in RULE_BREAKS])
def test_rule_violations_are_reported(path: Path, mutate: Mutation, expected: str) -> None:
    messages = validate.object_problems(_broken(path, mutate), None)
    assert any(expected in message for message in messages), messages


@pytest.mark.parametrize(("path", "mutate", "expected"), [case[1:] for case in SCHEMA_BREAKS],
                         ids=[case[0] for case in SCHEMA_BREAKS])
def test_schema_violations_are_reported(path: Path, mutate: Mutation, expected: str, crds: dict[str, Any]) -> None:
    messages = validate.object_problems(_broken(path, mutate), crds)
    assert any(expected in message for message in messages), messages


def test_unmutated_copies_pass(crds: dict[str, Any]) -> None:
    for path in {case[1] for case in RULE_BREAKS + SCHEMA_BREAKS}:
        assert validate.object_problems(_broken(path, lambda _: None), crds) == [], path


def test_an_undefined_entrypoint_variable_is_reported(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = copy.deepcopy(rendered["predict"])
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    job["spec"]["entrypoint"] += ' --top-k "${CNNBATCH_TOPK:?}"'
    problems = validate.rendered_problems(docs, "predict", None)
    assert [p.message for p in problems] == [
        "spec.entrypoint uses ${CNNBATCH_TOPK}, which the submitter container does not get (env or envFrom)"]


def test_main_prints_one_line_per_problem_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = load(CRONJOB)
    docs[0]["spec"]["concurrencyPolicy"] = "Replace"
    broken = tmp_path / "cronjob.yaml"
    broken.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
    assert validate.main([str(broken)]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("KubeRay CRD")]
    assert lines == [f"{broken}:CronJob/cnnbatch-nightly-predict: spec.concurrencyPolicy must be Forbid so that a run "
                     "never overlaps the previous one"]


def test_missing_crds_skip_the_schema_part_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(validate.CRD_DIR_ENV, str(tmp_path / "absent"))
    assert validate.main([str(EXTRACT)]) == 0
    assert f"KubeRay CRD schema checks skipped: {tmp_path / 'absent'} does not exist" in capsys.readouterr().out


def test_shortest_cron_interval() -> None:
    assert validate.shortest_cron_interval("30 2 * * *") == 86400
    assert validate.shortest_cron_interval("*/15 * * * *") == 900
    assert validate.shortest_cron_interval("0 9,17 * * mon-fri") == 8 * 3600
    assert validate.shortest_cron_interval("@weekly") == 7 * 86400
    assert validate.shortest_cron_interval("0 0 1 * *") >= 28 * 86400
    # Both day fields restricted: either may match (Monday 1 January 2024, then Tuesday the 2nd).
    assert validate.shortest_cron_interval("0 0 2 * mon") == 86400
    assert validate.shortest_cron_interval("0 0 30 2 *") is None  # never fires
    for bad in ("30 2 * *", "60 * * * *", "* * * * 7", "*/0 * * * *", "5-1 * * * *"):
        with pytest.raises(ValueError):
            validate.parse_cron(bad)


# ----------------------------------------------------------------------------------------------- image


def dockerfile_instructions() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    logical = ""
    for line in (REPO / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        logical += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, arguments = logical.strip().partition(" ")
            yield keyword.upper(), arguments.strip()
            logical = ""


def test_dockerfile_is_pinned_non_root_and_holds_no_secrets() -> None:
    instructions = list(dockerfile_instructions())
    args = {}
    for keyword, arguments in instructions:
        if keyword == "ARG" and "=" in arguments:
            name, _, default = arguments.partition("=")
            args.setdefault(name, default)
    bases = [arguments.split()[0] for keyword, arguments in instructions if keyword == "FROM"]
    assert bases
    for base in bases:
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], base)
        name, _, tag = image.partition(":")
        assert "@sha256:" in image or re.match(r"\d+\.\d+\.\d+", tag), f"base image {image} is not pinned"

    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users, "the image must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "USER must be a numeric non-root uid (runAsNonRoot checks it)"
    assert user == str(load_one(EXTRACT)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
                       ["securityContext"]["runAsUser"])

    secret = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY|CREDENTIALS", re.IGNORECASE)
    for keyword, arguments in instructions:
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", arguments) or [arguments.split()[0]]
            assert not [n for n in names if secret.search(n)], f"{keyword} {arguments}"
        assert not (keyword == "COPY" and re.search(r"\.(aws|ssh|config/gcloud)|\.env\b|credentials", arguments))


def test_image_ray_version_matches_the_manifests() -> None:
    instructions = list(dockerfile_instructions())
    versions = {arguments.partition("=")[2] for keyword, arguments in instructions
                if keyword == "ARG" and arguments.startswith("RAY_VERSION=")}
    assert len(versions) == 1
    (ray_version,) = versions
    installs = [arguments for keyword, arguments in instructions if keyword == "RUN" and "pip install" in arguments]
    assert any('"ray[default]==${RAY_VERSION}"' in run for run in installs)
    assert any('".[gpu,s3,gcs]"' in run for run in installs)

    manifest_versions = set()
    for path in validate.discover([K8S])[0]:
        for doc in load(path):
            manifest_versions.update(re.findall(r"rayVersion: '?\"?([\d.]+)", yaml.safe_dump(doc)))
    assert manifest_versions == {ray_version}


def test_dockerignore_allow_lists_the_build_inputs() -> None:
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "start from nothing so that no local file (.env, credentials, data) is sent"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    copied = []
    for keyword, arguments in dockerfile_instructions():
        if keyword == "COPY" and not arguments.startswith("--from"):
            copied += arguments.split()[:-1]
    assert sorted(copied) == sorted(allowed)
    assert all((REPO / path).exists() for path in allowed)


# ------------------------------------------------------------------------------------ nightly launcher

FAKE_KUBECTL = """#!/bin/sh
# Stands in for kubectl: records the created manifest, then answers status polls from $STATE/statuses.
case "$1" in
  create) cat > "$STATE/created.yaml"; echo "rayjob.ray.io/cnnbatch-nightly-predict-x7k2q" ;;
  get)
    case "$*" in
      *activeDeadlineSeconds*) echo 21600 ;;
      *jobDeploymentStatus*)
        head -n 1 "$STATE/statuses"; tail -n +2 "$STATE/statuses" > "$STATE/rest"; mv "$STATE/rest" "$STATE/statuses" ;;
      *reason*) echo "AppFailed: job failed" ;;
    esac ;;
  *) echo "unexpected kubectl $*" >&2; exit 2 ;;
esac
"""


def _run_launcher(tmp_path: Path, statuses: list[str]) -> subprocess.CompletedProcess[str]:
    shell = shutil.which("sh")
    if shell is None:
        pytest.skip("no POSIX shell to run the launcher with")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL, encoding="utf-8")
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "statuses").write_text("".join(f"{s}\n" for s in statuses), encoding="utf-8")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "STATE": str(tmp_path),
           "TEMPLATE": str(NIGHTLY_TEMPLATE), "POLL_SECONDS": "0",
           "CNNBATCH_IMAGE": "registry.example.com/ml/cnnbatch:9.9.9",
           "LAUNCHER_JOB_NAME": "cnnbatch-nightly-predict-29000000",
           "LAUNCHER_JOB_UID": "0b6c5a52-4c1e-4a6f-9b5e-8a1f2d3c4e5f"}
    return subprocess.run([shell, str(LAUNCHER)], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_launcher_creates_the_rayjob_and_waits_for_success(tmp_path: Path) -> None:
    result = _run_launcher(tmp_path, ["", "Initializing", "Running", "Running", "Complete"])
    assert result.returncode == 0, result.stderr
    assert "cnnbatch-nightly-predict-x7k2q: Complete" in result.stdout
    assert (tmp_path / "statuses").read_text(encoding="utf-8") == ""  # polled until the end, not before

    created = yaml.safe_load((tmp_path / "created.yaml").read_text(encoding="utf-8"))
    assert "__" not in yaml.safe_dump(created)
    assert created["metadata"]["ownerReferences"] == [{
        "apiVersion": "batch/v1", "kind": "Job", "name": "cnnbatch-nightly-predict-29000000",
        "uid": "0b6c5a52-4c1e-4a6f-9b5e-8a1f2d3c4e5f", "blockOwnerDeletion": False}]
    assert container_images(created) == {"registry.example.com/ml/cnnbatch:9.9.9"}
    assert validate.object_problems(created, None) == []


def test_launcher_fails_when_the_rayjob_fails(tmp_path: Path) -> None:
    result = _run_launcher(tmp_path, ["Running", "Failed"])
    assert result.returncode == 1
    assert "AppFailed: job failed" in result.stderr
    assert "cnnbatch-nightly-predict-x7k2q: Failed" in result.stderr
