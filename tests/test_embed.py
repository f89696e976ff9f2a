"""The embedder: the backbone built once with its weights under a precision policy, uint8 in and float32 features
out of one compiled call that equals the eager Keras recipe, for every backbone of the table; reduced precision
within cosine 0.999 of float32 (InceptionV3's case, the heavy one: tests/integration/test_precision.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnnbatch.backbones import BACKBONES
from cnnbatch.decode import decode_image
from cnnbatch.embed import Embedder, ModelSpec, build_model, check_images, variables_digest
from cnnbatch.weights import WeightsError, WeightsRef, sha256_file

from .conftest import TEST_IMAGE_SIZE

SPECS = sorted(BACKBONES.values(), key=lambda b: b.name)


@pytest.mark.parametrize("backbone", SPECS, ids=lambda b: b.name)
def test_embedder_equals_preprocess_then_model(backbone) -> None:
    """uint8 in, preprocessing inside the compiled call: the same numbers as the eager Keras recipe."""
    size = backbone.min_input_size
    embedder = Embedder(ModelSpec(backbone.name, size, WeightsRef("random", seed=3)))
    images = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    out = embedder({"image": images, "key": np.array(["a", "b", "c"])})
    assert out["embedding"].shape == (3, backbone.feature_dim) and out["embedding"].dtype == np.float32
    assert list(out["key"]) == ["a", "b", "c"] and "image" not in out
    recipe = embedder.model(backbone.preprocess_fn()(images.astype(np.float32)), training=False)
    np.testing.assert_allclose(out["embedding"], np.asarray(recipe), rtol=1e-4, atol=1e-4)


def test_seeded_random_weights_are_reproducible() -> None:
    spec = ModelSpec("vgg16", 32, WeightsRef("random", seed=11))
    assert Embedder(spec).weights_sha256 == Embedder(spec).weights_sha256
    other = Embedder(ModelSpec("vgg16", 32, WeightsRef("random", seed=12)))
    assert other.weights_sha256 != Embedder(spec).weights_sha256


def test_embedder_rejects_wrong_input_with_expected_and_got() -> None:
    embedder = Embedder(ModelSpec("vgg16", 32, WeightsRef("random", seed=1)))
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(N, 32, 32, 3\), got float32"):
        embedder.embed(np.zeros((1, 32, 32, 3), np.float32))



# --- reduced precision (moved here from the precision tests) -----------------------------------------------------

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


def test_unresolved_precisions_are_refused_by_the_spec(vgg16_float32) -> None:
    weights = vgg16_float32[0]
    with pytest.raises(ValueError, match=r"must be resolved to one of float32, bfloat16, float16, got 'auto'"):
        ModelSpec("vgg16", TEST_IMAGE_SIZE, weights, "auto")


# --- more of the same module -------------------------------------------------------------------------------------

def test_an_empty_batch_gives_no_rows_of_the_feature_width() -> None:
    embedder = Embedder(ModelSpec("vgg16", 32, WeightsRef("random", seed=1)))
    out = embedder.embed(np.zeros((0, 32, 32, 3), np.uint8))
    assert out.shape == (0, 512) and out.dtype == np.float32
    assert embedder.feature_dim == 512 and embedder.image_size == 32 and embedder.device_type == "CPU"


def test_images_of_another_size_or_type_are_refused() -> None:
    check_images(np.zeros((2, 32, 32, 3), np.uint8), 32)
    with pytest.raises(ValueError, match=r"of shape \(N, 32, 32, 3\), got uint8 \(2, 48, 48, 3\)"):
        check_images(np.zeros((2, 48, 48, 3), np.uint8), 32)
    with pytest.raises(ValueError, match=r"got uint8 \(2, 32, 32\)"):
        check_images(np.zeros((2, 32, 32), np.uint8), 32)


def test_the_weights_digest_is_the_weights_content() -> None:
    spec = ModelSpec("vgg16", 32, WeightsRef("random", seed=21))
    model = build_model(spec)
    digest = variables_digest(model)
    assert len(digest) == 64 and digest == Embedder(spec).weights_sha256  # random weights: named by content
    model.weights[0].assign(model.weights[0] + 1.0)
    assert variables_digest(model) != digest


def test_a_file_reference_keeps_the_file_s_sha256(vgg16_weights_file: Path) -> None:
    weights = WeightsRef("file", uri=str(vgg16_weights_file), sha256=sha256_file(vgg16_weights_file))
    assert Embedder(ModelSpec("vgg16", TEST_IMAGE_SIZE, weights)).weights_sha256 == weights.sha256


def test_build_leaves_the_global_precision_policy_as_it_was() -> None:
    import keras

    before = keras.mixed_precision.global_policy().name
    model = build_model(ModelSpec("vgg16", 32, WeightsRef("random", seed=1), "bfloat16"))
    assert model.layers[1].dtype_policy.name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == before


def test_weights_that_do_not_load_are_one_weights_error(tmp_path: Path) -> None:
    bad = tmp_path / "vgg16.weights.h5"
    bad.write_bytes(b"this is not HDF5")
    weights = WeightsRef("file", uri=str(bad), sha256=sha256_file(bad))
    with pytest.raises(WeightsError, match=r"cannot load weights .*vgg16.weights.h5 into vgg16 at 32 px"):
        build_model(ModelSpec("vgg16", 32, weights))
