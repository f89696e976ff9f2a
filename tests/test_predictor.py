"""The fused predictor: the Embedder's graph and the head as one compiled function, uint8 pixels to probabilities
(a seeded random VGG16 at 32 px, a seeded untrained head); and the top-k ordering."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cnnbatch.embed import Embedder, ModelSpec
from cnnbatch.modelio import ModelError
from cnnbatch.predictor import Predictor, top_k
from cnnbatch.weights import WeightsRef

from .conftest import MODEL_LABELS, TEST_IMAGE_SIZE, write_small_model


def test_top_k_orders_best_first_and_breaks_ties_by_label_order() -> None:
    """Moved here from the predict tests."""
    probabilities = np.array([[0.2, 0.5, 0.3], [0.4, 0.2, 0.4]], np.float32)
    indices, best = top_k(probabilities, 2)
    assert indices.tolist() == [[1, 2], [0, 2]]
    np.testing.assert_allclose(best, [[0.5, 0.3], [0.4, 0.4]])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("predictor") / "model")
    info, head = write_small_model(uri)
    return info, head


@pytest.fixture(scope="module")
def predictor(model) -> Predictor:
    info, head = model
    return Predictor(info, head, "float32")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3), dtype=np.uint8)


def test_the_graph_is_the_head_on_the_embedder_s_features(model, predictor: Predictor, images: np.ndarray) -> None:
    info, head = model
    embedder = Embedder(ModelSpec("vgg16", TEST_IMAGE_SIZE, info.weights, "float32"))
    expected = np.asarray(head(embedder.embed(images), training=False))
    np.testing.assert_allclose(predictor.probabilities(images), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(predictor.graph(images)), expected, rtol=1e-4, atol=1e-5)
    assert predictor.labels == MODEL_LABELS and predictor.image_size == TEST_IMAGE_SIZE


def test_probabilities_are_one_row_per_image_summing_to_one(predictor: Predictor, images: np.ndarray) -> None:
    out = predictor({"image": images})["probabilities"]
    assert out.shape == (5, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(predictor.probabilities(images[:2]), out[:2], rtol=1e-5, atol=1e-6)  # any batch
    assert predictor.probabilities(images[:0]).shape == (0, 3)
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(N, 32, 32, 3\)"):
        predictor.probabilities(images.astype(np.float32))


def test_a_manifest_that_disagrees_with_the_backbone_is_refused(model) -> None:
    info, head = model
    with pytest.raises(ModelError, match="backbone vgg16 gives 512 features, model.json says 256"):
        Predictor(replace(info, feature_dim=256), head, "float32")
    recorded = replace(info, weights=WeightsRef("random", seed=info.weights.seed, sha256="0" * 64))
    with pytest.raises(ModelError, match="the random backbone rebuilt with seed 3 differs"):
        Predictor(recorded, head, "float32")


def test_other_backbone_weights_can_be_given(model, predictor: Predictor, images: np.ndarray,
                                            vgg16_weights_file: Path) -> None:
    from cnnbatch.weights import sha256_file

    info, head = model
    weights = WeightsRef("file", uri=str(vgg16_weights_file), sha256=sha256_file(vgg16_weights_file))
    other = Predictor(info, head, "float32", weights)
    assert other.embedder.spec.weights == weights
    assert not np.allclose(other.probabilities(images), predictor.probabilities(images))
