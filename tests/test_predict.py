"""The predict job without Ray: its modes and flags, the model folder's digest, one image predicted in this process
(the same decoding and fused model as bulk), the answer's line and JSON. (Bulk prediction on a real cluster:
tests/integration/test_predict.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cnnbatch.decode import DecodeError, decode_image
from cnnbatch.modelio import load_model_folder
from cnnbatch.predict import ImagePrediction, PredictConfig, manifest_sha256, open_model, read_image, run_predict
from cnnbatch.predictor import Predictor
from cnnbatch.storage import StorageError

from .conftest import MODEL_LABELS, TEST_IMAGE_SIZE, write_small_model


def test_config_needs_exactly_one_mode() -> None:
    """Moved here from the integration module (it needs no Ray)."""
    with pytest.raises(ValueError, match="--input and --output to predict in bulk, or --image"):
        PredictConfig(model="m")
    with pytest.raises(ValueError, match="not both"):
        PredictConfig(model="m", input="i", output="o", image="x.jpg")
    with pytest.raises(ValueError, match="needs --output"):
        PredictConfig(model="m", input="i")
    with pytest.raises(ValueError, match="--image or --image-url, not both"):
        PredictConfig(model="m", image="x.jpg", image_url="https://example.com/x.jpg")
    with pytest.raises(ValueError, match="got file scheme"):
        PredictConfig(model="m", image_url="file:///etc/passwd")
    with pytest.raises(ValueError, match="--json is for one-image"):
        PredictConfig(model="m", input="i", output="o", json=True)
    with pytest.raises(ValueError, match="--top-k must be at least 1, got 0"):
        PredictConfig(model="m", image="x.jpg", top_k=0)
    assert PredictConfig(model="m", image_url="https://example.com/x.jpg").one_image


def test_config_refuses_bad_numbers() -> None:
    for overrides, message in (({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
                               ({"shard_size": 0}, "--shard-size must be at least 1, got 0"),
                               ({"workers": 0}, "--workers must be at least 1, got 0"),
                               ({"gpus_per_worker": -0.5}, "--gpus-per-worker must be 0 or more, got -0.5"),
                               ({"tta": -1}, "--tta must be 0 or more, got -1")):
        with pytest.raises(ValueError, match=message):
            PredictConfig(model="m", input="i", output="o", **overrides)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("predict") / "model"
    write_small_model(str(path))
    return path


def test_the_model_digest_is_the_manifest_s(model_dir: Path, tmp_path: Path) -> None:
    import hashlib

    assert manifest_sha256(str(model_dir)) == hashlib.sha256((model_dir / "model.json").read_bytes()).hexdigest()
    assert manifest_sha256(str(tmp_path)) == ""  # no manifest: load_model_folder says what is missing


def test_open_model_checks_top_k_against_the_classes(model_dir: Path) -> None:
    info, _, digest = open_model(str(model_dir), 3)
    assert info.labels == MODEL_LABELS and digest == manifest_sha256(str(model_dir))
    with pytest.raises(ValueError, match="--top-k must be at most the model's 3 classes, got 4"):
        open_model(str(model_dir), 4)


def test_one_image_is_the_fused_model_on_the_decoded_pixels(model_dir: Path, sample_root: Path) -> None:
    image = sorted((sample_root / "holdout" / "dots").iterdir())[0]
    result = run_predict(PredictConfig(model=str(model_dir), image=str(image), top_k=3))
    assert isinstance(result, ImagePrediction) and result.failed == {}
    info, head = load_model_folder(str(model_dir))
    pixels = decode_image(image.read_bytes(), TEST_IMAGE_SIZE)
    expected = Predictor(info, head, "float32").probabilities(pixels[None])[0]
    order = np.argsort(-expected, kind="stable")
    assert result.labels == [MODEL_LABELS[i] for i in order]
    np.testing.assert_allclose(result.probabilities, expected[order], rtol=1e-4, atol=1e-6)
    assert result.label == result.labels[0] and result.probability == result.probabilities[0]
    assert result.model_sha256 == manifest_sha256(str(model_dir))


def test_the_answer_s_line_and_json() -> None:
    answer = ImagePrediction("cat.jpg", "s3://bucket/m", "d" * 64, ["cat", "dog"], [0.75, 0.25])
    assert answer.line() == "cat 0.750000\ndog 0.250000"
    as_json = json.loads(ImagePrediction("cat.jpg", "m", "d" * 64, ["cat"], [0.75], as_json=True).line())
    assert as_json == {"image": "cat.jpg", "label": "cat", "probability": 0.75,
                       "top_k": [{"label": "cat", "probability": 0.75}], "model": "m", "model_sha256": "d" * 64}
    assert ImagePrediction.bare  # printed as is by the CLI: --json output is nothing but JSON


def test_unreadable_images_are_one_storage_or_decode_error(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        read_image(PredictConfig(model="m", image=str(tmp_path / "missing.jpg")))
    with pytest.raises(StorageError, match="is a folder; use --input/--output"):
        read_image(PredictConfig(model="m", image=str(tmp_path)))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    assert read_image(PredictConfig(model="m", image=str(broken))) == (str(broken), broken.read_bytes())
    with pytest.raises(DecodeError, match="broken.jpg: "):
        run_predict(PredictConfig(model=str(model_dir), image=str(broken)))
