"""``--precision auto`` through a real extraction: resolved where the actors run, recorded, and part of the resume
fingerprint; and InceptionV3 in bfloat16 within cosine 0.999 of float32 (two InceptionV3 builds: kept out of the
fast lane; VGG16's cosines are in tests/test_embed.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as ds
import pytest

from cnnbatch.embed import Embedder, ModelSpec
from cnnbatch.extract import ExtractConfig, run_extract
from cnnbatch.output import OutputError
from cnnbatch.parquetio import read_metadata
from cnnbatch.precision import local_precision
from cnnbatch.weights import WeightsRef

from ..conftest import TEST_IMAGE_SIZE
from ..test_embed import cosines, sample_pixels


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


def test_inceptionv3_bfloat16_features_stay_within_cosine_0999(sample_root: Path) -> None:
    """Batch normalisation and 94 convolutions deep: the harder case, with seeded random weights."""
    pixels = sample_pixels(sample_root, 75)[:12]
    weights = WeightsRef("random", seed=5)
    reference = Embedder(ModelSpec("inceptionv3", 75, weights, "float32")).embed(pixels)
    features = Embedder(ModelSpec("inceptionv3", 75, weights, "bfloat16")).embed(pixels)
    worst = cosines(features, reference).min()
    assert worst >= 0.999, f"worst cosine {worst:.6f}"
