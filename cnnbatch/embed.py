"""Stage 3: the model as a callable class (Ray Data's batch-inference pattern).

``Embedder.__init__`` builds the backbone once; ``__call__(batch) -> batch`` is pure: uint8 images in, float32
embeddings out. uint8 crosses process boundaries (4x smaller than float32) and is cast and preprocessed inside
one compiled ``tf.function``, so the whole step is one graph call per batch. :meth:`Embedder.features` is that
graph's body, which the predictor composes with a head (one preprocessing, in one place).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backbones import Backbone, get_backbone
from .precision import policy_name
from .storage import describe_error, redact
from .tfruntime import device_type, jit_compile_for, keras_module, tensorflow
from .weights import WeightsError, WeightsRef, keras_weights_arg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the same backbone on any node."""

    backbone: str
    image_size: int
    weights: WeightsRef
    precision: str = "float32"  # already resolved: float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        policy_name(self.precision)  # refuses "auto" and unknown names

    @property
    def backbone_spec(self) -> Backbone:
        return get_backbone(self.backbone)


def build_model(spec: ModelSpec) -> Any:
    """Build the pooled backbone with its weights under the spec's precision policy."""
    tensorflow()
    keras = keras_module()

    backbone = spec.backbone_spec
    if spec.weights.kind == "random":
        keras.utils.set_random_seed(int(spec.weights.seed or 0))
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy_name(spec.precision))
    try:
        return backbone.build(spec.image_size, weights=keras_weights_arg(spec.weights))
    except WeightsError:
        raise
    except (OSError, ValueError) as exc:  # not an HDF5 file, or weights of another architecture
        source = spec.weights.uri or spec.weights.kind
        raise WeightsError(f"cannot load weights {redact(source)} into {backbone.name} at {spec.image_size} px: "
                           f"{describe_error(exc)}") from None
    finally:
        keras.mixed_precision.set_global_policy(previous)


def variables_digest(model: Any) -> str:
    """sha256 over the model's weights, so that a seeded random backbone is still identified by content."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def check_images(images: np.ndarray, size: int) -> None:
    expected = (size, size, 3)
    if images.dtype != np.uint8 or images.shape[1:] != expected:
        raise ValueError(f"expected uint8 images of shape (N, {size}, {size}, 3), got {images.dtype} {images.shape}")


class Embedder:
    """Backbone features for a batch of uint8 images: ``{"image": (N, S, S, 3) uint8, ...} -> {..., "embedding"}``."""

    def __init__(self, spec: ModelSpec):
        self._tf = tf = tensorflow()
        self.spec = spec
        self.backbone = spec.backbone_spec
        self.image_size = self.backbone.check_size(spec.image_size)
        self.model = build_model(spec)
        self.weights_sha256 = spec.weights.sha256 or variables_digest(self.model)
        self.device_type = device_type()
        self._preprocess = self.backbone.preprocess_fn()
        # autograph=False: the body has no Python control flow to convert (and AutoGraph's warnings about what it
        # cannot convert print the repr of whatever the body calls).
        self._embed = tf.function(self.features, jit_compile=jit_compile_for(self.device_type), autograph=False,
                                  input_signature=[tf.TensorSpec([None, self.image_size, self.image_size, 3],
                                                                 tf.uint8)])

    def features(self, images: Any) -> Any:
        """The graph body: uint8 ``(N, S, S, 3)`` tensor -> float32 ``(N, D)`` features (cast, preprocess, backbone
        in inference mode)."""
        tf = self._tf
        pixels = self._preprocess(tf.cast(images, tf.float32))
        return tf.cast(self.model(pixels, training=False), tf.float32)

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def embed(self, images: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 -> ``(N, D)`` float32."""
        check_images(images, self.image_size)
        if len(images) == 0:
            return np.zeros((0, self.feature_dim), np.float32)
        return np.asarray(self._embed(images).numpy())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {name: value for name, value in batch.items() if name != "image"}
        out["embedding"] = self.embed(batch["image"])
        return out
