"""The backbone registry, tested over the one table: sizes, feature dimensions, names. (The embedder's compiled
call over every backbone: tests/test_embed.py.)"""

from __future__ import annotations

import pytest

from cnnbatch.backbones import BACKBONES, get_backbone

SPECS = sorted(BACKBONES.values(), key=lambda b: b.name)


@pytest.mark.parametrize("backbone", SPECS, ids=lambda b: b.name)
def test_table_entry_is_consistent(backbone) -> None:
    assert backbone.min_input_size <= backbone.input_size
    assert backbone.feature_dim > 0 and backbone.preprocessing
    assert get_backbone(backbone.name.upper()) is backbone
    with pytest.raises(ValueError, match=f"at least {backbone.min_input_size} px, got"):
        backbone.check_size(backbone.min_input_size - 1)


@pytest.mark.parametrize("backbone", SPECS, ids=lambda b: b.name)
def test_pooled_output_has_the_feature_dimension_at_the_smallest_size(backbone, smallest_model) -> None:
    model = smallest_model(backbone.name)
    assert model.input_shape == (None, backbone.min_input_size, backbone.min_input_size, 3)
    assert model.output_shape == (None, backbone.feature_dim)


def test_unknown_backbone_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000': expected one of inceptionv3, vgg16"):
        get_backbone("resnet9000")


def test_the_default_size_is_the_backbone_s_own() -> None:
    assert get_backbone("vgg16").check_size(None) == 224 and get_backbone("inceptionv3").check_size(None) == 299
    assert get_backbone("vgg16").check_size("64") == 64


@pytest.mark.parametrize("backbone", SPECS, ids=lambda b: b.name)
def test_preprocess_input_is_the_keras_module_s_own(backbone) -> None:
    import importlib

    keras_module = importlib.import_module(f"keras.applications.{backbone.module}")
    assert backbone.preprocess_fn() is keras_module.preprocess_input
