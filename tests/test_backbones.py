"""The backbone registry, tested over the one table: shapes, sizes, preprocessing, and the embedder's compiled call."""

from __future__ import annotations

import numpy as np
import pytest

from cnnbatch.backbones import BACKBONES, get_backbone
from cnnbatch.embed import Embedder, ModelSpec
from cnnbatch.weights import WeightsRef

SPECS = sorted(BACKBONES.values(), key=lambda b: b.name)


@pytest.mark.parametrize("backbone", SPECS, ids=lambda b: b.name)
def test_table_entry_is_consistent(backbone) -> None:
    assert backbone.min_input_size <= backbone.input_size
    assert backbone.feature_dim > 0 and backbone.preprocessing
    assert get_backbone(backbone.name.upper()) is backbone
    with pytest.raises(ValueError, match=f"at least {backbone.min_input_size} px, got"):
        backbone.check_size(backbone.min_input_size - 1)


@pytest.mark.parametrize("backbone", SPECS, ids=lambda b: b.name)
def test_pooled_output_has_the_feature_dimension_at_the_smallest_size(backbone) -> None:
    model = backbone.build(backbone.min_input_size, weights=None)
    assert model.input_shape == (None, backbone.min_input_size, backbone.min_input_size, 3)
    assert model.output_shape == (None, backbone.feature_dim)


def test_unknown_backbone_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000': expected one of inceptionv3, vgg16"):
        get_backbone("resnet9000")


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


def test_a_cpu_embedder_turns_tensorflow_thread_spinning_off_before_the_runtime_starts() -> None:
    """In a fresh process (TensorFlow's runtime settings are fixed once it starts): the Embedder sets it, and a
    runtime already started is left as it is."""
    import subprocess
    import sys

    script = (
        "from tensorflow.python.eager import context\n"
        "import tensorflow as tf\n"
        "from cnnbatch.embed import Embedder, ModelSpec\n"
        "from cnnbatch.tfruntime import quiet_idle_threads\n"
        "from cnnbatch.weights import WeightsRef\n"
        "embedder = Embedder(ModelSpec('vgg16', 32, WeightsRef('random', seed=1), 'float32'))\n"
        "print(context.context().config.experimental.disable_thread_spinning, quiet_idle_threads(),\n"
        "      embedder.embed(__import__('numpy').zeros((2, 32, 32, 3), 'uint8')).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "True False (2, 512)"
