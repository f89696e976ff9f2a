"""Reduced precision: features within cosine 0.999 of the float32 recipe, ``auto`` resolved where the actors run,
and the precision recorded in the metadata and the resume fingerprint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from cnnbatch.decode import decode_image
from cnnbatch.cluster import resolve_precision_for_workers
from cnnbatch.embed import Embedder, ModelSpec
from cnnbatch.precision import check_precision, cpu_has_native_bf16, local_precision
from cnnbatch.extract import ExtractConfig, extraction_fingerprint, feature_metadata, run_extract
from cnnbatch.output import OutputError
from cnnbatch.parquetio import read_metadata
from cnnbatch.weights import WeightsRef, sha256_file

from .conftest import TEST_IMAGE_SIZE


def sample_pixels(sample_root: Path, size: int) -> np.ndarray:
    paths = sorted(p for p in (sample_root / "train").rglob("*") if p.is_file())
    return np.stack([decode_image(p.read_bytes(), size) for p in paths])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def vgg16_float32(vgg16_weights_file: Path, sample_root: Path) -> tuple[WeightsRef, np.ndarray, np.ndarray]:
    weights = WeightsRef("file", uri=str(vgg16_weights_file), sha256=sha256_file(vgg16_weights_file))
    pixels = sample_pixels(sample_root, TEST_IMAGE_SIZE)
    return weights, pixels, Embedder(ModelSpec("vgg16", TEST_IMAGE_SIZE, weights, "float32")).embed(pixels)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_vgg16_features_stay_within_cosine_0999_of_float32(vgg16_float32, precision: str) -> None:
    weights, pixels, reference = vgg16_float32
    embedder = Embedder(ModelSpec("vgg16", TEST_IMAGE_SIZE, weights, precision))
    features = embedder.embed(pixels)
    assert features.dtype == np.float32 and features.shape == reference.shape
    worst = cosines(features, reference).min()
    assert worst >= 0.999, f"{precision}: worst cosine {worst:.6f} over {len(pixels)} images"
    assert not np.array_equal(features, reference)  # the policy did change the arithmetic


def test_inceptionv3_bfloat16_features_stay_within_cosine_0999(sample_root: Path) -> None:
    """Batch normalisation and 94 convolutions deep: the harder case, with seeded random weights."""
    pixels = sample_pixels(sample_root, 75)[:12]
    weights = WeightsRef("random", seed=5)
    reference = Embedder(ModelSpec("inceptionv3", 75, weights, "float32")).embed(pixels)
    features = Embedder(ModelSpec("inceptionv3", 75, weights, "bfloat16")).embed(pixels)
    worst = cosines(features, reference).min()
    assert worst >= 0.999, f"worst cosine {worst:.6f}"


def test_auto_follows_the_cpu_flags_and_tensor_cores() -> None:
    flags = Path("/proc/cpuinfo").read_text().split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_has_native_bf16() is native
    assert local_precision(gpu=False) == ("bfloat16" if native else "float32")
    assert resolve_precision_for_workers("float16", gpus_per_worker=0) == "float16"  # explicit: no probe


def test_unresolved_or_unknown_precisions_fail_naming_the_choices(vgg16_float32) -> None:
    weights = vgg16_float32[0]
    with pytest.raises(ValueError, match=r"--precision must be one of auto, float32, bfloat16, float16, got 'fp8'"):
        check_precision("fp8")
    with pytest.raises(ValueError, match=r"must be resolved to one of float32, bfloat16, float16, got 'auto'"):
        ModelSpec("vgg16", TEST_IMAGE_SIZE, weights, "auto")


def test_precision_is_in_metadata_and_fingerprint(vgg16_float32) -> None:
    weights = vgg16_float32[0]
    specs = {p: ModelSpec("vgg16", TEST_IMAGE_SIZE, weights, p) for p in ("float32", "bfloat16", "float16")}
    assert len({extraction_fingerprint(spec) for spec in specs.values()}) == 3
    assert feature_metadata(specs["bfloat16"])["precision"] == "bfloat16"


@pytest.mark.integration
def test_auto_extraction_records_the_resolved_precision_and_resume_refuses_another(
        ray_cluster, sample_root: Path, vgg16_weights_file: Path, tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    for path in sorted((sample_root / "train" / "dots").iterdir())[:4]:
        (source / path.name).write_bytes(path.read_bytes())
    config = ExtractConfig(input=str(source), output=str(tmp_path / "out"), weights=str(vgg16_weights_file),
                           image_size=TEST_IMAGE_SIZE, gpus_per_worker=0, precision="auto")
    summary = run_extract(config)
    assert summary.ok and summary.rows == 4
    expected = local_precision(gpu=False)  # the worker node is this machine
    assert read_metadata(ds.dataset(config.output).schema)["precision"] == expected
    other = "float32" if expected != "float32" else "bfloat16"
    with pytest.raises(OutputError, match=f"precision: existing '{expected}', now '{other}'"):
        run_extract(ExtractConfig(**{**config.__dict__, "precision": other}))
