"""The backbone registry: one frozen entry per supported CNN.

Everything that differs between backbones lives in this table, so adding ResNet50 or EfficientNet is one entry
and the tests parametrised over :data:`BACKBONES` cover it automatically. Keras is imported lazily: listing or
validating backbones must not pay TensorFlow's start-up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Backbone:
    """How to build and feed one `keras.applications` backbone without its classifier top."""

    name: str
    module: str  # keras.applications sub-module holding the constructor and preprocess_input
    constructor: str  # attribute name of the constructor in that module
    input_size: int  # default square input size in pixels
    min_input_size: int  # smallest size the architecture accepts without its top
    feature_dim: int  # width of the globally average-pooled output
    preprocessing: str  # stable name of the preprocessing, recorded in metadata and the resume fingerprint
    finetune_from: str = ""  # finetune's default --trainable-from: the recipe's top blocks
    # Names of blocks whose first layer is the one after the previous block's output (InceptionV3's mixed1..10:
    # "--trainable-from mixed9" trains blocks 9 and 10, the recipe's "freeze the first 249 layers"). Other names
    # are layer names, the first layer to train.
    block_outputs: tuple[str, ...] = ()

    def _module(self) -> Any:
        from .tfruntime import keras_module

        keras_module()  # TensorFlow first, its start-up lines filtered
        return importlib.import_module(f"keras.applications.{self.module}")

    def build(self, image_size: int | None = None, weights: str | None = None) -> Any:
        """Return the Keras model: uint8-agnostic float input (H, W, 3) -> (feature_dim,) pooled features.

        ``weights`` is what keras.applications takes: None (random init), "imagenet", or a path to a notop file.
        """
        size = self.check_size(image_size)
        constructor = getattr(self._module(), self.constructor)
        return constructor(include_top=False, weights=weights, input_shape=(size, size, 3), pooling="avg")

    def preprocess_fn(self) -> Callable[[Any], Any]:
        """The backbone's own ``preprocess_input`` (takes float RGB in [0, 255])."""
        return self._module().preprocess_input

    def trainable_start(self, layer_names: list[str], name: str | None) -> int:
        """Index in ``layer_names`` (the built backbone's layers, in order) of the first layer to train."""
        name = name or self.finetune_from
        if name in self.block_outputs[1:]:
            return layer_names.index(self.block_outputs[self.block_outputs.index(name) - 1]) + 1
        if name in layer_names and name not in self.block_outputs:
            return layer_names.index(name)
        choices = [n for n in self.block_outputs[1:]] or [n for n in layer_names if "conv" in n]
        raise ValueError(f"--trainable-from must name a layer of {self.name}: one of {', '.join(choices)}; "
                         f"got {name!r}")

    def check_size(self, image_size: int | None) -> int:
        size = self.input_size if image_size is None else int(image_size)
        if size < self.min_input_size:
            raise ValueError(
                f"--image-size for {self.name} must be at least {self.min_input_size} px, got {size}"
            )
        return size


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            name="vgg16",
            module="vgg16",
            constructor="VGG16",
            input_size=224,
            min_input_size=32,
            feature_dim=512,
            preprocessing="keras.applications.vgg16.preprocess_input(caffe:BGR,mean-subtract)",
            finetune_from="block5_conv1",
        ),
        Backbone(
            name="inceptionv3",
            module="inception_v3",
            constructor="InceptionV3",
            input_size=299,
            min_input_size=75,
            feature_dim=2048,
            preprocessing="keras.applications.inception_v3.preprocess_input(tf:[-1,1])",
            finetune_from="mixed9",
            block_outputs=tuple(f"mixed{i}" for i in range(11)),
        ),
    )
}


def get_backbone(name: str) -> Backbone:
    """Look a backbone up by name, failing with the list of known names."""
    try:
        return BACKBONES[name.lower()]
    except KeyError:
        known = ", ".join(sorted(BACKBONES))
        raise ValueError(f"unknown backbone {name!r}: expected one of {known}") from None
