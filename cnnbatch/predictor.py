"""The fused model of ``predict``: backbone + head as one compiled function from uint8 pixels to probabilities."""

from __future__ import annotations

from typing import Any

import numpy as np

from .embed import Embedder, ModelSpec, check_images, variables_digest
from .modelio import MANIFEST_FILE, ModelError, ModelInfo
from .tfruntime import jit_compile_for, tensorflow
from .weights import WeightsRef


class Predictor:
    """Backbone + head as one compiled function: ``{"image": (N, S, S, 3) uint8} -> {"probabilities": (N, C)}``."""

    def __init__(self, info: ModelInfo, head: Any, precision: str, weights: WeightsRef | None = None):
        """``weights``: the backbone's (modelio.backbone_weights: a fine-tuned model's own file); default the
        reference the training features were made with."""
        tf = tensorflow()
        self.info = info
        self.labels = info.labels
        # The Embedder builds the backbone exactly as extraction did (weights, seed, precision policy).
        self.embedder = Embedder(ModelSpec(info.backbone, info.image_size, weights or info.weights, precision))
        if self.embedder.feature_dim != info.feature_dim:
            raise ModelError(f"backbone {info.backbone} gives {self.embedder.feature_dim} features, "
                             f"{MANIFEST_FILE} says {info.feature_dim}")
        if info.weights.kind == "random" and info.weights.sha256:
            # A seeded random backbone is identified by its content: a rebuild that differs (another Keras)
            # would give features the head never saw.
            rebuilt = variables_digest(self.embedder.model)
            if rebuilt != info.weights.sha256:
                raise ModelError(f"the random backbone rebuilt with seed {info.weights.seed} differs from the one "
                                 f"the training features came from (sha256 {rebuilt[:12]}..., expected "
                                 f"{info.weights.sha256[:12]}...)")
        size = self.embedder.image_size
        self.head = head
        # The embedder's own graph body (cast, preprocess_input, backbone), then the head: one compiled call.
        self._tf = tf
        self._predict = tf.function(self.graph, jit_compile=jit_compile_for(self.embedder.device_type), autograph=False,
                                    input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])

    def graph(self, images: Any) -> Any:
        """uint8 ``(N, S, S, 3)`` -> float32 ``(N, classes)``: backbone features, then the head (inference mode)."""
        tf = self._tf
        return tf.cast(self.head(self.embedder.features(images), training=False), tf.float32)

    @property
    def image_size(self) -> int:
        return self.embedder.image_size

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 -> ``(N, n_classes)`` float32."""
        check_images(images, self.image_size)
        if len(images) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        return np.asarray(self._predict(images).numpy())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"probabilities": self.probabilities(batch["image"])}


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and probabilities of the ``k`` most likely classes per row, best first (ties: lower index)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probabilities, order, axis=1).astype(np.float32)


