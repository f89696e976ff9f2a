"""Stage 3: the model as a callable class (Ray Data's batch-inference pattern).

``Embedder.__init__`` builds the backbone once; ``__call__(batch) -> batch`` is pure: uint8 images in, float32
embeddings out. uint8 crosses process boundaries (4x smaller than float32) and is cast and preprocessed inside
one compiled ``tf.function``, so the whole step is one graph call per batch.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backbones import Backbone, get_backbone
from .weights import WeightsRef, keras_weights_arg

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the same backbone on any node."""

    backbone: str
    image_size: int
    weights: WeightsRef
    precision: str = "float32"  # already resolved: float32 | bfloat16 | float16

    @property
    def backbone_spec(self) -> Backbone:
        return get_backbone(self.backbone)


def resolve_precision(requested: str) -> str:
    """``auto``: bfloat16 on CPUs with native bf16 (AVX512-BF16 / AMX), float16 on GPUs with tensor cores."""
    if requested not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        return requested
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        major = (details.get("compute_capability") or (0, 0))[0]
        return "float16" if major >= 7 else "float32"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _policy_name(precision: str) -> str:
    return {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[precision]


def build_model(spec: ModelSpec) -> Any:
    """Build the pooled backbone with its weights under the spec's precision policy."""
    import keras

    backbone = spec.backbone_spec
    if spec.weights.kind == "random":
        keras.utils.set_random_seed(int(spec.weights.seed or 0))
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(_policy_name(spec.precision))
    try:
        return backbone.build(spec.image_size, weights=keras_weights_arg(spec.weights))
    finally:
        keras.mixed_precision.set_global_policy(previous)


def variables_digest(model: Any) -> str:
    """sha256 over the model's weights, so that a seeded random backbone is still identified by content."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


class Embedder:
    """Backbone features for a batch of uint8 images: ``{"image": (N, S, S, 3) uint8, ...} -> {..., "embedding"}``."""

    def __init__(self, spec: ModelSpec):
        import tensorflow as tf

        self.spec = spec
        self.backbone = spec.backbone_spec
        self.image_size = self.backbone.check_size(spec.image_size)
        self.model = build_model(spec)
        self.weights_sha256 = spec.weights.sha256 or variables_digest(self.model)
        preprocess = self.backbone.preprocess_fn()
        model = self.model

        @tf.function(
            input_signature=[tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.uint8)],
            jit_compile=False,  # measured: XLA makes VGG16 slower on CPU (see docs/benchmarks.md)
        )
        def embed(images: tf.Tensor) -> tf.Tensor:
            pixels = preprocess(tf.cast(images, tf.float32))
            return tf.cast(model(pixels, training=False), tf.float32)

        self._embed = embed

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def embed(self, images: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 -> ``(N, D)`` float32."""
        expected = (self.image_size, self.image_size, 3)
        if images.dtype != np.uint8 or images.shape[1:] != expected:
            raise ValueError(f"expected uint8 images of shape (N, {expected[0]}, {expected[1]}, 3), "
                             f"got {images.dtype} {images.shape}")
        if len(images) == 0:
            return np.zeros((0, self.feature_dim), np.float32)
        return self._embed(images).numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {name: value for name, value in batch.items() if name != "image"}
        out["embedding"] = self.embed(batch["image"])
        return out
