"""Shared fixtures: small sample images, a weights file the tests save themselves, and one real local Ray cluster.

Unit tests use none of the heavy fixtures. Integration tests take ``ray_cluster`` (a real local cluster with two
CPUs, shared by the module) and small images (VGG16 accepts 32 px), so the whole suite runs on two cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TEST_IMAGE_SIZE = 32  # VGG16's smallest input: keeps CPU inference fast


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/train/<class>/*`` (6 per class) and ``<root>/holdout/<class>/*`` (2 per class), 48 px."""
    from cnnbatch.sample import write_sample

    root = tmp_path_factory.mktemp("sample")
    return write_sample(root, per_class=6, size=48, holdout_per_class=2)


@pytest.fixture(scope="session")
def vgg16_weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VGG16 notop weights file saved by the test session itself (no download)."""
    import keras

    from cnnbatch.backbones import get_backbone

    keras.utils.set_random_seed(7)
    model = get_backbone("vgg16").build(TEST_IMAGE_SIZE, weights=None)
    path = tmp_path_factory.mktemp("weights") / "vgg16_notop.weights.h5"
    model.save_weights(path)
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    """One real local Ray cluster per test module (two CPUs, as on this machine)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             configure_logging=False)
    yield ray
    ray.shutdown()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cnnbatch ARGS`` in a fresh process (its own Ray cluster unless RAY_ADDRESS is set)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "cnnbatch", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or REPO)


# --- S3: moto's server on 127.0.0.1 over real HTTP -------------------------------------------------------------

# Fake, but distinctive: tests grep logs, outputs and metadata for them and must never find them.
FAKE_AWS_KEY_ID = "AKIACNNBATCHFAKE0042"
FAKE_AWS_SECRET = "cnnbatch/FAKE+secret/do-not-print-4f2a9c"


class S3Server:
    """A running moto S3 server and the standard ``AWS_*`` environment that reaches it."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": FAKE_AWS_KEY_ID,
                    "AWS_SECRET_ACCESS_KEY": FAKE_AWS_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}

    def new_bucket(self, prefix: str = "cnnbatch") -> str:
        """Create a fresh bucket (through the server, with the fake credentials) and return its name."""
        import uuid

        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=FAKE_AWS_KEY_ID,
                     aws_secret_access_key=FAKE_AWS_SECRET, region_name="us-east-1").create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    """moto's ``ThreadedMotoServer`` on a free port of 127.0.0.1 (real HTTP, not an in-process mock)."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield S3Server(f"http://127.0.0.1:{port}")
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """``s3_server`` with its ``AWS_*`` variables set in this process (and fsspec's cached clients dropped)."""
    import s3fs

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()
