"""Bulk prediction as a :class:`~cnnbatch.worker.ShardTask`: each actor's fused predictor, the views of
test-time augmentation, and the prediction table layout with its metadata and resume fingerprint."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from . import storage
from .augment import VIEWS_VERSION, Recipe, with_views
from .batching import auto_batch_size
from .decode import DECODE_VERSION
from .modelio import ModelError, ModelInfo, backbone_weights, load_model_folder
from .parquetio import with_metadata
from .pipeline import fingerprint_of
from .predictor import Predictor, top_k
from .versions import library_versions


def prediction_schema(k: int, metadata: dict[str, Any]) -> pa.Schema:
    fields = [("key", pa.string()), ("predicted_label", pa.string()), ("probability", pa.float32())]
    if k > 1:
        fields += [("top_k_labels", pa.list_(pa.string())), ("top_k_probabilities", pa.list_(pa.float32()))]
    return with_metadata(fields, metadata)


def prediction_table(keys: list[str], probabilities: np.ndarray, labels: tuple[str, ...], k: int,
                     schema: pa.Schema) -> pa.Table:
    indices, best = top_k(probabilities, k)
    vocabulary = np.asarray(labels, dtype=object)
    columns = [pa.array(keys, pa.string()), pa.array(vocabulary[indices[:, 0]].tolist(), pa.string()),
               pa.array(best[:, 0], pa.float32())]
    if k > 1:
        offsets = pa.array(np.arange(0, len(keys) * k + 1, k, dtype=np.int32))
        columns += [pa.ListArray.from_arrays(offsets, pa.array(vocabulary[indices].reshape(-1).tolist(), pa.string())),
                    pa.ListArray.from_arrays(offsets, pa.array(best.reshape(-1), pa.float32()))]
    return pa.Table.from_arrays(columns, schema=schema)


def tta_metadata(views: int, recipe: Recipe, seed: int) -> dict[str, Any]:
    """Test-time augmentation: recorded in the metadata and the fingerprint (absent without it)."""
    return {"views": views, "recipe": recipe.to_dict(), "seed": seed, "version": VIEWS_VERSION}


@dataclass(frozen=True)
class PredictTask:
    """Prediction as a :class:`~cnnbatch.worker.ShardTask`: a fused predictor plus the prediction table layout.
    With ``tta`` views the probability is the mean over the plain image and its views."""

    model_uri: str
    info: ModelInfo
    precision: str
    top_k: int
    batch_size: int | None  # None: each actor sizes it to its device (batching.auto_batch_size)
    metadata: dict[str, Any]
    tta: int = 0
    recipe: Recipe | None = None
    seed: int = 0

    @property
    def image_size(self) -> int:
        return self.info.image_size

    @property
    def views(self) -> int:
        return 1 + self.tta

    def variants(self, key: str, pixels: np.ndarray) -> np.ndarray:
        return with_views(pixels, self.recipe, self.tta, self.seed, key)

    def make_model(self) -> Predictor:
        info, head = load_model_folder(self.model_uri)
        if info != self.info:
            raise ModelError(f"model folder {storage.redact(self.model_uri)} changed while the job ran")
        return Predictor(info, head, self.precision, backbone_weights(self.model_uri, info))

    def with_batch_size_for(self, model: Predictor, gpu_share: float) -> PredictTask:
        if self.batch_size is not None:
            return self
        return replace(self, batch_size=auto_batch_size(model.embedder.model, self.precision, gpu_share))

    def make_table(self, model: Predictor, keys: list[str], labels: list[str | None],
                   outputs: dict[str, np.ndarray]) -> pa.Table:
        probabilities = mean_probabilities(outputs, len(self.info.labels))
        return prediction_table(keys, probabilities, self.info.labels, self.top_k,
                                prediction_schema(self.top_k, self.metadata))

    def counts(self, labels: list[str | None], outputs: dict[str, np.ndarray]) -> dict[str, int]:
        """How many records had a label among the model's classes, and how many of those it got right."""
        probabilities = mean_probabilities(outputs, len(self.info.labels))
        predicted = np.asarray(self.info.labels, dtype=object)[probabilities.argmax(axis=1)] if len(labels) else []
        known = set(self.info.labels)
        pairs = [(truth, guess) for truth, guess in zip(labels, predicted) if truth in known]
        return {"labelled": len(pairs), "correct": sum(truth == guess for truth, guess in pairs)}


def mean_probabilities(outputs: dict[str, np.ndarray], classes: int) -> np.ndarray:
    """``(records, classes)``: each record's probabilities averaged over its views (test-time augmentation)."""
    probabilities = outputs.get("probabilities", np.zeros((0, 1, classes), np.float32))
    return np.asarray(probabilities.mean(axis=1), dtype=np.float32)


def prediction_metadata(model_uri: str, digest: str, info: ModelInfo, precision: str, k: int,
                        tta: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every prediction part records about the model that made it (README, "Predict": schema metadata)."""
    weights = {k_: (storage.redact(v) if isinstance(v, str) else v) for k_, v in info.weights.to_dict().items()}
    extra = {"tta": tta} if tta else {}
    return extra | {
        "kind": "predictions",
        "model": {"uri": storage.redact(model_uri), "sha256": digest, "head": info.head},
        "backbone": info.backbone,
        "image_size": info.image_size,
        "weights": weights,
        "labels": list(info.labels),
        "precision": precision,
        "decode": DECODE_VERSION,
        "top_k": k,
        "versions": library_versions(),
    }


def prediction_fingerprint(digest: str, k: int, precision: str, tta: dict[str, Any] | None = None) -> str:
    extra = {"tta": tta} if tta else {}
    return fingerprint_of(extra | {"kind": "predictions", "model_sha256": digest, "top_k": k, "precision": precision,
                                   "decode": DECODE_VERSION})
