"""Shared fixtures and helpers: small sample images, a weights file the tests save themselves, feature datasets
written with the real writer, and moto's S3 server.

Unit tests (``tests/test_<module>.py``, one file per module of cnnbatch/) start no Ray: :func:`_no_ray_in_unit_tests`
makes any ``ray.init`` outside ``tests/integration/`` fail. Integration tests (``tests/integration/``: Ray clusters,
the CLI in a subprocess, whole jobs end to end) take ``ray_cluster`` from ``tests/integration/conftest.py`` and
small images (VGG16 accepts 32 px), so the whole suite runs on two cores.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from cnnbatch.shards import Shard

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TEST_IMAGE_SIZE = 32  # VGG16's smallest input: keeps CPU inference fast
INTEGRATION = Path(__file__).resolve().parent / "integration"


# --- the fast lane starts no Ray ---------------------------------------------------------------------------------

def is_integration(item: pytest.Item) -> bool:
    return Path(str(item.path)).resolve().is_relative_to(INTEGRATION)


@pytest.fixture(autouse=True)
def _no_ray_in_unit_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit test that reaches ``ray.init`` (directly, or through a job's driver) fails here, naming the remedy:
    ``make test-fast`` must never start a cluster."""
    if is_integration(request.node):
        return
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} called ray.init: unit tests start no Ray. Test the function "
                             "below the driver, or move the test to tests/integration/ (it then gets the "
                             "ray_cluster fixture and the integration mark)")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/train/<class>/*`` (6 per class) and ``<root>/holdout/<class>/*`` (2 per class), 48 px."""
    from cnnbatch.sample import write_sample

    root = tmp_path_factory.mktemp("sample")
    return write_sample(root, per_class=6, size=48, holdout_per_class=2)


@pytest.fixture(scope="session")
def smallest_model():
    """``smallest_model(name)``: the backbone built without weights at its smallest input size, once a session
    (InceptionV3 takes seconds to build; the registry's tests only read its shapes)."""
    from functools import cache

    from cnnbatch.backbones import get_backbone

    @cache
    def build(name: str):
        backbone = get_backbone(name)
        return backbone.build(backbone.min_input_size, weights=None)

    return build


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


# --- feature datasets as cnnbatch extract writes them -------------------------------------------------------------

CLASSES = ("cat", "dog", "fox")


def feature_metadata(dim: int, **overrides) -> dict:
    """Schema metadata shaped as cnnbatch extract writes it."""
    metadata = {"kind": "features", "backbone": "vgg16", "dim": dim,
                "weights": {"kind": "random", "uri": None, "sha256": None, "seed": 1337}, "image_size": 32,
                "preprocessing": "keras.applications.vgg16.preprocess_input(caffe:BGR,mean-subtract)",
                "decode": "pillow-bilinear-exif-draft2-v1", "precision": "float32"}
    metadata.update(overrides)
    return metadata


def learnable(rows_per_class: int, dim: int, seed: int = 0, scale: float = 50.0,
              offset: float = 100.0) -> tuple[np.ndarray, list[str]]:
    """Separable classes on a large offset and scale, so an unnormalised head would struggle."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (len(CLASSES), dim))
    x = np.concatenate([centres[c] + rng.normal(0, 0.35, (rows_per_class, dim)) for c in range(len(CLASSES))])
    labels = [label for label in CLASSES for _ in range(rows_per_class)]
    return (x * scale + offset).astype(np.float32), labels


def write_features(root: Path, x: np.ndarray, labels: list[str | None], parts: int = 3, prefix: str = "img",
                   row_group_rows: int | None = None, success: bool = True, **metadata) -> Path:
    """A feature dataset as extract writes it: part files, schema metadata, ``_SUCCESS``."""
    import pyarrow.parquet as pq

    from cnnbatch.extract import embeddings_table, feature_schema
    from cnnbatch.output import SUCCESS_FILE
    from cnnbatch.parquetio import table_to_parquet_bytes

    root.mkdir(parents=True, exist_ok=True)
    schema = feature_schema(x.shape[1], feature_metadata(x.shape[1], **metadata))
    keys = [f"{prefix}/{label}/{i:05d}.jpg" for i, label in enumerate(labels)]
    for part, rows in enumerate(np.array_split(np.arange(len(labels)), parts)):
        table = embeddings_table([keys[i] for i in rows], [labels[i] for i in rows], x[rows], schema)
        path = root / f"part-{part:06d}.parquet"
        if row_group_rows:
            pq.write_table(table, path, row_group_size=row_group_rows)
        else:
            path.write_bytes(table_to_parquet_bytes(table))
    if success:
        (root / SUCCESS_FILE).write_text("{}")
    return root


# --- a model folder as cnnbatch train writes it (a linear head on a seeded random VGG16's features) --------------

MODEL_LABELS = ("checks", "dots", "stripes")


def write_small_model(uri: str, image_size: int = TEST_IMAGE_SIZE, seed: int = 3, labels=MODEL_LABELS):
    """A model folder whose head maps VGG16's 512 features to ``labels`` (seeded, untrained); ``(info, head)``."""
    from cnnbatch.decode import DECODE_VERSION
    from cnnbatch.head import HeadSpec, build_head
    from cnnbatch.modelio import ModelInfo, write_model_folder
    from cnnbatch.weights import WeightsRef

    rng = np.random.default_rng(seed)
    head = build_head(HeadSpec("linear"), 512, len(labels), rng.normal(0, 1, 512), rng.uniform(0.5, 2, 512),
                      seed=seed)
    info = ModelInfo(backbone="vgg16", image_size=image_size, weights=WeightsRef("random", seed=seed),
                     feature_dim=512, labels=tuple(labels), head="linear", precision="float32",
                     preprocessing="keras.applications.vgg16.preprocess_input(caffe:BGR,mean-subtract)",
                     decode=DECODE_VERSION)
    return write_model_folder(uri, head, info, {"validation": {"accuracy": 0.5}}, {}), head


# --- inputs as the tests write them: folders, tars (hostile ones too), shards read whole ---------------------

def touch(root: Path, rel: str, data: bytes = b"x") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def tar_bytes(entries: list, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar of ``(name, data)`` members and ready-made ``TarInfo`` entries (links, FIFOs, folders), in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                archive.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                archive.addfile(info, io.BytesIO(entry[1]))
    return buffer.getvalue()


def read_all(shard: Shard) -> dict[str, tuple[str | None, bytes | str]]:
    """key -> (label, bytes) for images, (label, error) for error records; keys must be unique."""
    from cnnbatch.shards import iter_records

    records = list(iter_records(shard))
    keys = [r.key for r in records]
    assert len(keys) == len(set(keys)), f"duplicate keys in one shard: {sorted(k for k in keys if keys.count(k) > 1)}"
    return {r.key: (r.label, r.error if r.error is not None else r.load()) for r in records}


def one_shard(root: Path | str, **kwargs) -> Shard:
    from cnnbatch.shards import list_shards

    shards = list(list_shards(str(root), **kwargs))
    assert len(shards) == 1, f"expected one shard, got {[s.shard_id for s in shards]}"
    return shards[0]
