"""``train`` as a Ray job: a real head started with ``ray start --head`` (token auth), ``ray job submit`` of
``python -m jobs.train`` from the repo, on features extracted in the test; and a fit placed on the node of a
two-node cluster that declares a (fake) GPU."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cnnbatch import modelio
from cnnbatch.modelio import load_model_folder

from ..conftest import REPO, TEST_IMAGE_SIZE, learnable, run_cli, write_features

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Head:
    gcs: str  # for ray.init / RAY_ADDRESS
    dashboard: str  # for ray job submit
    env: dict[str, str]  # token auth and the project's environment first on PATH


def stop_process_group(pgid: int, grace: float = 10.0) -> None:
    """Stop what this test's ``ray start`` launched (its own session), leaving any other Ray on the machine alone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head`` with RAY_AUTH_MODE=token, a private token and temp dir, on free ports; the project's
    ``.venv/bin`` first on PATH so that submitted entrypoints run the project's Python."""
    temp = tempfile.mkdtemp(prefix="cnb-ray-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    port, dashboard = free_port(), free_port()
    command = [str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
               "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--temp-dir", temp, "--include-dashboard", "true", "--disable-usage-stats"]
    starter = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = starter.communicate(timeout=120)
        assert starter.returncode == 0, out
        head = Head(gcs=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dashboard}", env=env)
        wait_for_job_api(head)
        yield head
    finally:
        stop_process_group(starter.pid)
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_job_api(head: Head, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run([str(BIN / "ray"), "job", "list", "--address", head.dashboard], env=head.env,
                                capture_output=True, text=True, timeout=60)
        if result.returncode == 0:
            return
        assert time.monotonic() < deadline, result.stdout + result.stderr
        time.sleep(1.0)


# What the job API answers while the head's job agent is not up yet (a loaded machine): the job was not submitted.
NO_AGENT_YET = "No available agent to submit job"


def submit_train(head: Head, *args: str, timeout: float = 400,
                 agent_wait: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``ray job submit --working-dir <repo> -- python -m jobs.train ARGS``, waiting for the job to end; a
    submission refused because the job agent is not up yet is made again until it is (Ray: "try again later")."""
    command = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", str(REPO), "--",
               "python", "-m", "jobs.train", *args]
    deadline = time.monotonic() + agent_wait
    while True:
        result = subprocess.run(command, env=head.env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if result.returncode == 0 or NO_AGENT_YET not in result.stdout + result.stderr \
                or time.monotonic() > deadline:
            return result
        time.sleep(2.0)


@pytest.fixture(scope="module")
def extracted(ray_head: Head, sample_root: Path, tmp_path_factory) -> Path:
    """Features of the sample images (random VGG16 at 32 px), extracted on the test's head."""
    output = tmp_path_factory.mktemp("job-features") / "features"
    result = run_cli("extract", "--input", str(sample_root / "train"), "--output", str(output), "--weights", "random",
                     "--image-size", str(TEST_IMAGE_SIZE), "--shard-size", "7",
                     env={**ray_head.env, "RAY_ADDRESS": ray_head.gcs})
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def test_submitted_job_writes_a_complete_model_from_extracted_features(ray_head: Head, extracted: Path,
                                                                       tmp_path: Path) -> None:
    model = tmp_path / "model"
    result = submit_train(ray_head, "--features", str(extracted), "--output", str(model), "--epochs", "5")
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-4000:]
    assert "succeeded" in logs and "cnnbatch train: 3 classes, 15 training / 3 validation rows" in logs
    assert {p.name for p in model.iterdir()} == set(modelio.MODEL_FILES) - {modelio.BACKBONE_FILE}
    info, head = load_model_folder(str(model))
    assert (info.backbone, info.image_size, info.feature_dim) == ("vgg16", TEST_IMAGE_SIZE, 512)
    assert info.weights.kind == "random" and info.labels == ("checks", "dots", "stripes")
    assert head.output_shape == (None, 3)
    metrics = json.loads((model / modelio.METRICS_FILE).read_text())
    assert metrics["rows"]["total"] == 18 and metrics["fit"]["node_id"]
    assert metrics["features"] == [{"uri": str(extracted), "files": 3, "rows": 18, "complete": True}]


def test_submitted_job_learns_a_learnable_feature_set(ray_head: Head, tmp_path: Path) -> None:
    x, labels = learnable(80, 64, seed=5)
    features = write_features(tmp_path / "features", x, labels, parts=3)
    model = tmp_path / "model"
    result = submit_train(ray_head, "--features", str(features), "--output", str(model))  # the defaults
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    metrics = json.loads((model / modelio.METRICS_FILE).read_text())
    assert metrics["validation"]["rows"] == 24
    assert metrics["validation"]["accuracy"] >= 0.95, metrics["validation"]
    assert min(c["recall"] for c in metrics["validation"]["per_class"].values()) >= 0.75


def test_submitted_job_refusing_mixed_features_fails(ray_head: Head, tmp_path: Path) -> None:
    x, labels = learnable(4, 8)
    first = write_features(tmp_path / "a", x, labels)
    second = write_features(tmp_path / "b", x, labels, backbone="inceptionv3")
    result = submit_train(ray_head, "--features", str(first), str(second), "--output", str(tmp_path / "model"))
    logs = result.stdout + result.stderr
    assert result.returncode != 0
    assert "cnnbatch train: error: feature sets differ in backbone" in logs
    assert not (tmp_path / "model").exists()


# Run in a fresh interpreter: Ray caches its auth mode per process, so a cluster with its own token cannot share
# the test process with the other modules' clusters.
PLACEMENT_SCRIPT = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from cnnbatch.train import TrainConfig, run_train

features, output, temp, port, agent_ports = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "num_gpus": 0, "gcs_server_port": port, "include_dashboard": False, "temp_dir": temp,
    "dashboard_agent_listen_port": int(agent_ports[0])})
try:
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1, dashboard_agent_listen_port=int(agent_ports[1]))
    ray.init(address=cluster.address, logging_level="WARNING", configure_logging=False)
    summary = run_train(TrainConfig(features=(features,), output=output, epochs=3, hidden_units=32))
    print(json.dumps({"fit_node": summary.node_id, "gpu_node": gpu_node.node_id,
                      "head_node": cluster.head_node.node_id, "resources": ray.cluster_resources()}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_fit_lands_on_the_node_with_a_gpu(tmp_path: Path) -> None:
    """A CPU-only head plus a node declaring one (fake) GPU: the fit asks for a GPU, so it runs on that node."""
    x, labels = learnable(20, 8)
    features = write_features(tmp_path / "features", x, labels)
    temp = tempfile.mkdtemp(prefix="cnb-gpu-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    try:
        result = subprocess.run(
            [sys.executable, "-c", PLACEMENT_SCRIPT, str(features), str(tmp_path / "model"), temp, str(free_port()),
             str(free_port()), str(free_port())],
            env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-4000:]
    placed = json.loads(result.stdout.strip().splitlines()[-1])
    assert placed["resources"].get("GPU") == 1.0
    assert placed["fit_node"] == placed["gpu_node"] != placed["head_node"]
    metrics = json.loads((tmp_path / "model" / modelio.METRICS_FILE).read_text())
    assert metrics["fit"]["node_id"] == placed["gpu_node"]
    assert metrics["config"]["gpus"] is None  # chosen by the cluster, not by a flag
