"""What a model folder says about itself: the manifest's fields (``ModelInfo``), its file names and formats."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .weights import WeightsRef

# Format 2 adds the fine-tuned backbone (backbone.weights.h5) and the augmentation the head was trained with;
# format 1 folders (train before fine-tuning existed) read as they are.
MODEL_FORMAT = "cnnbatch-model/2"
READABLE_FORMATS = frozenset({"cnnbatch-model/1", MODEL_FORMAT})
MANIFEST_FILE = "model.json"
HEAD_FILE = "head.keras"
LABELS_FILE = "labels.txt"
METRICS_FILE = "metrics.json"
CONFUSION_FILE = "confusion_matrix.png"
CURVE_FILE = "training_curve.png"
BACKBONE_FILE = "backbone.weights.h5"  # a fine-tuned backbone without its top (usable as extract --weights)
CHECKPOINT_DIR = ".checkpoints"  # a fit's per-epoch state while it runs (hidden: never part of the model)
MODEL_FILES = frozenset({MANIFEST_FILE, HEAD_FILE, LABELS_FILE, METRICS_FILE, CONFUSION_FILE, CURVE_FILE,
                         BACKBONE_FILE})
LEGACY_HEAD_SUFFIXES = (".h5", ".hdf5")


class ModelError(ValueError):
    """A model folder that cannot be written or used, with a one-line message naming what is wrong."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder says about itself (``model.json``, less the bookkeeping)."""

    backbone: str
    image_size: int
    weights: WeightsRef  # the backbone's weights; a fine-tuned model's are its BACKBONE_FILE
    feature_dim: int
    labels: tuple[str, ...]
    head: str  # "mlp" | "linear"
    precision: str  # the backbone's compute precision the features were extracted with
    preprocessing: str
    decode: str
    files: Mapping[str, str] = field(default_factory=dict)  # file name -> sha256
    augment: Mapping[str, Any] | None = None  # the views the head trained on: {"views", "recipe", "seed"}
    fine_tuned: Mapping[str, Any] | None = None  # finetune: the starting model and the layers trained

    @property
    def has_backbone_file(self) -> bool:
        return BACKBONE_FILE in self.files

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["weights"] = self.weights.to_dict()
        data["labels"] = list(self.labels)
        data["files"] = dict(sorted(self.files.items()))
        data["augment"] = dict(self.augment) if self.augment else None
        data["fine_tuned"] = dict(self.fine_tuned) if self.fine_tuned else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInfo:
        try:
            return cls(backbone=str(data["backbone"]), image_size=int(data["image_size"]),
                       weights=WeightsRef.from_dict(data["weights"]), feature_dim=int(data["feature_dim"]),
                       labels=tuple(str(label) for label in data["labels"]), head=str(data["head"]),
                       precision=str(data["precision"]), preprocessing=str(data["preprocessing"]),
                       decode=str(data["decode"]), files=dict(data.get("files") or {}),
                       augment=_mapping_or_none(data.get("augment"), "augment"),
                       fine_tuned=_mapping_or_none(data.get("fine_tuned"), "fine_tuned"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{MANIFEST_FILE} is missing or has a malformed field: {exc}") from None


def _mapping_or_none(value: Any, name: str) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be an object, got {type(value).__name__}")
    return dict(value)
