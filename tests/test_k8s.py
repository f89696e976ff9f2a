"""The Kubernetes side: the manifests in k8s/ pass k8s/validate.py, which refuses each policy's breach (a real
manifest, one mutation), and the manifests, the Dockerfile and the nightly launcher agree with each other.
KubeRay schema checks need ../shared/kuberay-crds; no TensorFlow, no Ray."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s import validate

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
STAGES = ("extract", "train", "finetune", "predict")
EXTRACT, INTERACTIVE = K8S / "extract" / "rayjob.yaml", K8S / "interactive" / "raycluster.yaml"
CRONJOB, RAYCRONJOB = K8S / "nightly-predict-cronjob.yaml", K8S / "raycronjob" / "raycronjob.yaml"
NIGHTLY, LAUNCHER = K8S / "nightly-predict-rayjob.yaml", K8S / "nightly-predict-launch.sh"
GPU = "nvidia.com/gpu"


def load_one(path: Path, kind: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in validate.load_documents(path) if kind is None or d["kind"] == kind]
    return doc


def config_values() -> dict[str, str]:
    (generator,) = load_one(K8S / "config" / "kustomization.yaml")["configMapGenerator"]
    return dict(literal.split("=", 1) for literal in generator["literals"])


def images(node: Any) -> set[str]:
    if isinstance(node, list):
        return set().union(*map(images, node))
    if not isinstance(node, dict):
        return set()
    found = {c["image"] for key in ("containers", "initContainers") for c in node.get(key, [])}
    return found.union(*map(images, node.values()))


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    if validate.kustomize_command() is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    return {d.relative_to(K8S).as_posix(): validate.render(d) for d in validate.kustomizations(K8S)}


def test_every_manifest_and_kustomize_output_passes(capsys: pytest.CaptureFixture[str]) -> None:
    if not validate.crd_dir().is_dir():
        pytest.skip("../shared is absent")
    assert validate.validate_tree(K8S) == []
    assert validate.main([]) == 0, capsys.readouterr().out


def test_without_the_crds_the_rest_still_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert validate.validate_tree(K8S, tmp_path / "absent") == []
    monkeypatch.setenv(validate.CRD_DIR_ENV, str(tmp_path / "absent"))
    assert validate.main([str(EXTRACT)]) == 0
    assert "KubeRay CRD schema checks skipped" in capsys.readouterr().out
    (broken := tmp_path / "cronjob.yaml").write_text(CRONJOB.read_text("utf-8").replace("Forbid", "Allow"), "utf-8")
    assert validate.main([str(broken)]) == 1
    out = capsys.readouterr().out
    assert f"{broken}:CronJob/cnnbatch-nightly-predict: spec.concurrencyPolicy must be Forbid" in out


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


def _head(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]


def _launcher(cron_job: dict[str, Any]) -> dict[str, Any]:
    return cron_job["spec"]["jobTemplate"]["spec"]["template"]["spec"]


BREACHES: list[tuple[str, Path, Callable[[dict[str, Any]], Any], str]] = [
    ("GPU request", EXTRACT, lambda j: _worker(j)["containers"][0]["resources"]["requests"].pop(GPU),
     "requests must include nvidia.com/gpu (GPU worker group)"),
    ("GPU limit", EXTRACT, lambda j: _worker(j)["containers"][0]["resources"]["limits"].pop(GPU),
     "limits must include nvidia.com/gpu (GPU worker group)"),
    ("GPU toleration", EXTRACT, lambda j: _worker(j).pop("tolerations"), "tolerate the nvidia.com/gpu taint"),
    ("no GPU group", EXTRACT, lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"].clear(),
     "needs a GPU worker group"),
    ("token auth (RayJob)", EXTRACT, lambda j: j["spec"]["rayClusterSpec"].pop("authOptions"),
     "authOptions.mode must be token (Ray token authentication"),
    ("token auth (RayCluster)", INTERACTIVE, lambda c: c["spec"]["authOptions"].update(mode="disabled"),
     "authOptions.mode must be token (Ray token authentication"),
    ("dashboard outside", INTERACTIVE, lambda c: c["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
     "the dashboard stays inside the cluster"),
    ("work on the head", EXTRACT, lambda j: _head(j)["rayStartParams"].update({"num-cpus": "4"}),
     'num-cpus must be "0"'),
    ("object store on disk", EXTRACT, lambda j: _worker(j)["volumes"][0]["emptyDir"].pop("medium"),
     "/dev/shm from an emptyDir with medium: Memory"),
    ("cluster kept", EXTRACT, lambda j: j["spec"].update(shutdownAfterJobFinishes=False),
     "shutdownAfterJobFinishes must be true"),
    ("no deadline", EXTRACT, lambda j: j["spec"].pop("activeDeadlineSeconds"), "activeDeadlineSeconds must be set"),
    ("not a job", EXTRACT, lambda j: j["spec"].update(entrypoint="python train.py"), "must run python -m jobs."),
    ("root", EXTRACT, lambda j: _head(j)["template"]["spec"]["securityContext"].pop("runAsNonRoot"),
     "runAsNonRoot must be true"),
    ("seccomp", EXTRACT, lambda j: _worker(j)["securityContext"].pop("seccompProfile"),
     "seccompProfile.type must be RuntimeDefault"),
    ("privilege escalation", CRONJOB, lambda c: _launcher(c)["containers"][0]["securityContext"].update(
        allowPrivilegeEscalation=True), "allowPrivilegeEscalation must be false"),
    ("capabilities", CRONJOB, lambda c: _launcher(c)["containers"][0]["securityContext"].pop("capabilities"),
     "capabilities.drop must include ALL"),
    ("host network", CRONJOB, lambda c: _launcher(c).update(hostNetwork=True), "hostNetwork must not be set"),
    ("inline credentials", EXTRACT, lambda j: _worker(j)["containers"][0].update(
        env=[{"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-real-key"}]), "no credentials in k8s/"),
    ("a Secret", K8S / "config" / "serviceaccount.yaml", lambda s: s.update(kind="Secret"), "no Secrets in k8s/"),
    ("overlapping CronJob", CRONJOB, lambda c: c["spec"].update(concurrencyPolicy="Allow"),
     "concurrencyPolicy must be Forbid"),
    ("bad cron", CRONJOB, lambda c: c["spec"].update(schedule="30 25 * * *"), "not a valid cron schedule"),
    ("cron fields", RAYCRONJOB, lambda c: c["spec"].update(schedule="30 2 * *"), "not a 5-field cron schedule"),
    ("time zone", RAYCRONJOB, lambda c: c["spec"].update(timeZone="Mars/Olympus"), "spec.schedule/timeZone"),
    ("overlapping RayCronJob", RAYCRONJOB, lambda c: c["spec"].update(schedule="0 */4 * * *"),
     "shorter than the schedule's shortest interval (14400 s)"),
    ("cron macro", RAYCRONJOB, lambda c: c["spec"].update(schedule="@hourly"), "shortest interval (3600 s)"),
    ("daylight saving", RAYCRONJOB, lambda c: c["spec"].update(schedule="0 */7 * * *", timeZone="Europe/Paris"),
     "shortest interval (7200 s)"),  # 0, 7, 14, 21 h: 3 h from 21 to 0, less an hour outside UTC
    ("core schema", CRONJOB, lambda c: c["spec"].update(schedul="30 2 * * *"), "'schedul' was unexpected"),
    ("RayJob metadata", EXTRACT, lambda j: j["metadata"].update(lables={}), "'lables' was unexpected"),
]
SCHEMA_BREACHES = [  # against the KubeRay CRDs
    ("unknown field", EXTRACT, lambda j: j["spec"].update(shutdownAfterJobFinished=True),
     "'shutdownAfterJobFinished' was unexpected"),
    ("type", EXTRACT, lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="four"),
     "workerGroupSpecs[0].replicas: 'four' is not of type 'integer'"),
    ("enum", INTERACTIVE, lambda c: c["spec"]["authOptions"].update(mode="password"), "'password' is not one of"),
]


@pytest.mark.parametrize(("path", "mutate", "expected"), [c[1:] for c in BREACHES + SCHEMA_BREACHES],
                         ids=[c[0] for c in BREACHES + SCHEMA_BREACHES])
def test_each_breach_is_refused_naming_the_policy(path: Path, mutate: Callable[[dict[str, Any]], Any],
                                                  expected: str) -> None:
    crds = validate.kuberay_validators()
    if crds is None and expected in {case[3] for case in SCHEMA_BREACHES}:
        pytest.skip("../shared is absent")
    (doc,) = validate.load_documents(path)[:1]
    assert validate.object_problems(doc, crds) == [], "the unmutated manifest must pass"
    mutate(broken := copy.deepcopy(doc))
    messages = validate.object_problems(broken, crds)
    assert any(expected in message for message in messages), messages


def test_kustomizations_list_every_file(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert set(rendered) == {".", *STAGES, "interactive", "raycronjob"}
    listed = set()
    for path in K8S.rglob("kustomization.yaml"):
        kustomization = load_one(path)
        entries = kustomization.get("resources", []) + [entry.rpartition("=")[2] for generator in kustomization.get(
            "configMapGenerator", []) for entry in generator.get("files", [])]
        listed |= {(path.parent / entry).resolve() for entry in entries}
    files = {p.resolve() for p in K8S.rglob("*") if p.suffix in (".yaml", ".sh") and p.name != "kustomization.yaml"}
    assert files <= listed, sorted(map(str, files - listed))


def test_settings_come_from_the_config_component(rendered: dict[str, list[dict[str, Any]]]) -> None:
    config, docs = config_values(), [doc for docs in rendered.values() for doc in docs]
    assert images(docs) == {config["CNNBATCH_IMAGE"], "docker.io/alpine/k8s:1.33.0"}  # + the launcher's kubectl
    crons = [d["spec"] for d in docs if d["kind"] in ("CronJob", "RayCronJob")]
    assert {(c["schedule"], c["timeZone"]) for c in crons} == {
        (config["CNNBATCH_NIGHTLY_SCHEDULE"], config["CNNBATCH_NIGHTLY_TIME_ZONE"])}
    assert {d["metadata"].get("namespace") for d in docs} == {load_one(K8S / "config" / "kustomization.yaml")[
        "namespace"]}
    holders = [p.relative_to(K8S).as_posix() for p in sorted(K8S.rglob("*.yaml"))
               if re.search(r"\b(s3|gs)://", p.read_text(encoding="utf-8"))]
    assert holders == ["config/kustomization.yaml"], "bucket paths are written in one place only"


def _gpus(spec: dict[str, Any]) -> tuple[dict[str, Any], int]:
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    return group, int(group["template"]["spec"]["containers"][0]["resources"]["limits"][GPU])


def test_clusters_are_sized_as_their_entrypoints_say() -> None:
    for stage in STAGES:
        job = load_one(K8S / stage / "rayjob.yaml", "RayJob")
        assert job["metadata"]["name"] == f"cnnbatch-{stage}"
        assert job["spec"]["entrypoint"].startswith(f"python -m jobs.{stage} ")
    group, gpus = _gpus(load_one(K8S / "train" / "rayjob.yaml")["spec"])
    assert group["replicas"] == group["maxReplicas"] == 1 and gpus == 1
    # Fine-tuning mirrors the model over one node's GPUs (MultiWorkerMirroredStrategy is out of scope).
    spec = load_one(K8S / "finetune" / "rayjob.yaml")["spec"]
    group, gpus = _gpus(spec)
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (0, 1, 1)
    assert gpus > 1 and re.search(r"--gpus (\d+)", spec["entrypoint"]).group(1) == str(gpus)
    for path in [EXTRACT, K8S / "predict" / "rayjob.yaml", NIGHTLY]:
        spec = load_one(path)["spec"]
        group, gpus = _gpus(spec)
        workers = int(re.search(r"--workers (\d+)", spec["entrypoint"]).group(1))
        per_worker = float(re.search(r"--gpus-per-worker ([\d.]+)", spec["entrypoint"]).group(1))
        assert workers * per_worker == group["replicas"] * gpus, path


JOB_FLAGS = {  # ../shared/CONTRACT.md, the flags that take a value
    "extract": {"--input", "--output", "--backbone", "--weights", "--image-size", "--batch-size", "--shard-size",
                "--workers", "--gpus-per-worker", "--precision"},
    "train": {"--features", "--output", "--head", "--epochs", "--validation-split"},
    "finetune": {"--input", "--model", "--output", "--trainable-from", "--epochs", "--learning-rate", "--optimizer",
                 "--momentum", "--batch-size", "--validation-split", "--seed", "--gpus"},
    "predict": {"--input", "--model", "--output", "--top-k", "--workers", "--gpus-per-worker", "--precision"},
}
JOB_SPECS = {**{stage: K8S / stage / "rayjob.yaml" for stage in STAGES}, "nightly": NIGHTLY, "raycron": RAYCRONJOB}


@pytest.mark.parametrize("name", sorted(JOB_SPECS))
def test_entrypoint_expands_to_the_job_cli(name: str, tmp_path: Path) -> None:
    """The submitter runs `bash -ce "ray job submit ... -- <entrypoint>"` with cnnbatch-config as its env; here
    `ray` is a stub that prints the argv it receives."""
    doc = load_one(JOB_SPECS[name])
    spec = doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]
    (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
    assert {"configMapRef": {"name": "cnnbatch-config"}} in submitter["envFrom"]
    stub = tmp_path / "ray"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n", encoding="utf-8")
    stub.chmod(0o755)
    entrypoint, config = " ".join(spec["entrypoint"].split()), config_values()
    result = subprocess.run(["bash", "-ce", f"ray job submit -- {entrypoint} ;"], capture_output=True, text=True,
                            env={"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", **config}, check=False)
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    python, dash_m, module, *arguments = argv[3:]
    assert argv[:3] == ["job", "submit", "--"] and [python, dash_m] == ["python", "-m"]
    assert set(arguments[0::2]) <= JOB_FLAGS[module.removeprefix("jobs.")], arguments
    assert len(arguments) % 2 == 0 and all(arguments[1::2]) and "$" not in " ".join(arguments)
    used = re.findall(r"\$\{(\w+)", entrypoint)
    assert used and all(config[variable] in arguments for variable in used)


def test_the_nightly_variants_and_the_launcher_agree() -> None:
    text = yaml.safe_dump(load_one(NIGHTLY)["spec"]).replace("__CNNBATCH_IMAGE__", "cnnbatch")
    assert yaml.safe_load(text) == load_one(RAYCRONJOB)["spec"]["jobTemplate"]
    script = LAUNCHER.read_text(encoding="utf-8")
    placeholders = set(re.findall(r"__[A-Z_]+__", yaml.safe_dump(load_one(NIGHTLY))))
    assert placeholders and placeholders == set(re.findall(r"s\|(__[A-Z_]+__)\|", script))
    (rule,) = load_one(K8S / "nightly-predict-rbac.yaml", "Role")["rules"]
    assert (rule["apiGroups"], rule["resources"]) == (["ray.io"], ["rayjobs"])
    assert set(rule["verbs"]) == set(re.findall(r"\bkubectl (\w+)", script)) <= {"create", "get", "list", "watch"}


def dockerfile() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    lines = [line.rstrip() for line in (REPO / "Dockerfile").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    for instruction in re.split(r"(?<!\\)\n", "\n".join(lines)):
        keyword, _, arguments = " ".join(instruction.replace("\\\n", " ").split()).partition(" ")
        yield keyword.upper(), arguments


def test_image_is_pinned_non_root_and_matches_the_manifests() -> None:
    instructions = list(dockerfile())
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    for base in [a.split()[0] for k, a in instructions if k == "FROM"]:
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], base)
        assert "@sha256:" in image or re.search(r":\d+\.\d+\.\d+", image), f"base image {image} is not pinned"
    user = [a for k, a in instructions if k == "USER"][-1].split(":")[0]
    assert user == str(_head(load_one(EXTRACT))["template"]["spec"]["securityContext"]["runAsUser"]) != "0"
    secret = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY|CREDENTIALS", re.IGNORECASE)
    names = [n for k, a in instructions if k in ("ENV", "ARG") for n in re.findall(r"(\w+)=", a) or a.split()[:1]]
    assert names and not [name for name in names if secret.search(name)]
    installs = " ".join(a for k, a in instructions if k == "RUN" and "pip install" in a)
    assert '".[gpu,s3,gcs]"' in installs and '"ray[default]==${RAY_VERSION}"' in installs
    versions = {v for p in K8S.rglob("*.yaml") for v in re.findall(r"rayVersion: \"([\d.]+)\"", p.read_text("utf-8"))}
    assert versions == {args["RAY_VERSION"]}
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "start from nothing so that no local .env, credentials or data is sent"
    copied = [p for k, a in instructions if k == "COPY" and not a.startswith("--from") for p in a.split()[:-1]]
    assert sorted(copied) == sorted(line[1:].rstrip("/") for line in ignore if line.startswith("!"))


FAKE_KUBECTL = """#!/bin/sh
case "$1" in
  create) cat > "$STATE/created.yaml"; echo "rayjob.ray.io/cnnbatch-nightly-predict-x7k2q" ;;
  get) case "$*" in
      *activeDeadlineSeconds*) echo 21600 ;;
      *jobDeploymentStatus*) head -n 1 "$STATE/s"; tail -n +2 "$STATE/s" > "$STATE/r"; mv "$STATE/r" "$STATE/s" ;;
      *reason*) echo "AppFailed: job failed" ;;
    esac ;;
  *) echo "unexpected kubectl $*" >&2; exit 2 ;;
esac
"""


@pytest.mark.parametrize("statuses", [["", "Initializing", "Running", "Complete"], ["Running", "Failed"]])
def test_launcher_creates_the_rayjob_and_waits_for_its_end(statuses: list[str], tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (kubectl := tmp_path / "bin" / "kubectl").write_text(FAKE_KUBECTL, encoding="utf-8")
    kubectl.chmod(0o755)
    (tmp_path / "s").write_text("".join(f"{s}\n" for s in statuses), encoding="utf-8")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "STATE": str(tmp_path),
           "TEMPLATE": str(NIGHTLY), "POLL_SECONDS": "0", "CNNBATCH_IMAGE": "registry.example.com/ml/cnnbatch:9.9.9",
           "LAUNCHER_JOB_NAME": "cnnbatch-nightly-predict-29000000", "LAUNCHER_JOB_UID": "0b6c5a52-4c1e-4a6f"}
    result = subprocess.run(["sh", str(LAUNCHER)], env=env, capture_output=True, text=True, timeout=60, check=False)
    final = statuses[-1]
    assert result.returncode == (final != "Complete"), result.stderr
    assert f"cnnbatch-nightly-predict-x7k2q: {final}" in (result.stdout + result.stderr)
    assert (tmp_path / "s").read_text(encoding="utf-8") == ""  # polled until the end, not before
    created = yaml.safe_load((tmp_path / "created.yaml").read_text(encoding="utf-8"))
    assert created["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "uid": env[
        "LAUNCHER_JOB_UID"], "name": env["LAUNCHER_JOB_NAME"], "blockOwnerDeletion": False}]
    assert images(created) == {env["CNNBATCH_IMAGE"]} and validate.object_problems(created, None) == []
    if final == "Failed":
        assert "AppFailed: job failed" in result.stderr
