"""What a model folder says about itself: the manifest's fields as data, read back strictly."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from cnnbatch.modelinfo import BACKBONE_FILE, MODEL_FILES, ModelError, ModelInfo
from cnnbatch.weights import WeightsRef


def small_model_info(labels=("a", "b")) -> ModelInfo:
    return ModelInfo(backbone="vgg16", image_size=32, weights=WeightsRef("random", seed=1), feature_dim=4,
                     labels=tuple(labels), head="linear", precision="float32", preprocessing="p", decode="d")


def test_model_info_round_trip() -> None:
    """Moved here from the train tests."""
    info = replace(small_model_info(), files={"head.keras": "ab"})
    assert ModelInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    with pytest.raises(ModelError, match="malformed"):
        ModelInfo.from_dict({"backbone": "vgg16"})


def test_augmentation_and_fine_tuning_round_trip_too() -> None:
    info = replace(small_model_info(), files={"head.keras": "ab", BACKBONE_FILE: "cd"},
                   augment={"views": 2, "seed": 7, "recipe": {"zoom_range": 0.1}},
                   fine_tuned={"from": "s3://bucket/m1", "layers": 4})
    data = info.to_dict()
    assert data["labels"] == ["a", "b"] and data["weights"] == {"kind": "random", "uri": None, "sha256": None,
                                                                 "seed": 1}
    assert ModelInfo.from_dict(json.loads(json.dumps(data))) == info
    assert info.has_backbone_file and not small_model_info().has_backbone_file
    assert BACKBONE_FILE in MODEL_FILES


def test_fields_of_the_wrong_shape_are_refused() -> None:
    data = small_model_info().to_dict()
    with pytest.raises(ModelError, match="augment must be an object, got list"):
        ModelInfo.from_dict({**data, "augment": [1, 2]})
    with pytest.raises(ModelError, match="malformed field"):
        ModelInfo.from_dict({**data, "image_size": "large"})
    assert ModelInfo.from_dict({**data, "augment": None, "files": None}).files == {}
