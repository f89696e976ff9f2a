"""The classifier head and the arithmetic around it: labels, the stratified split, feature statistics, metrics.

Everything here is NumPy except :func:`build_head` (Keras, imported lazily), so the split and statistics are unit
tested without TensorFlow. The head is the classic transfer-learning top (features -> Dense 1024 relu -> Dropout ->
softmax) with the feature normalisation as its first layer: the saved head maps raw backbone features to class
probabilities, and predict needs nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .tfruntime import keras_module

HEADS = ("mlp", "linear")
OPTIMIZERS = ("rmsprop", "adam", "sgd")
# Features whose training variance is below this are constant (dead ReLU channels): centred, not scaled, so that
# float noise in a channel that is zero everywhere never becomes a huge input.
MIN_VARIANCE = 1e-12

# Row split codes in the per-file assignment arrays.
EXCLUDED, TRAIN, VALIDATION = 0, 1, 2


# --- labels ----------------------------------------------------------------------------------------------------

class LabelCodes:
    """Provisional integer codes for label strings as they stream by; :meth:`finish` sorts them.

    Codes are handed out in order of first appearance (so a pass needs no second look at the strings); the final
    class index of a label is its position in the sorted label list, which is what the model folder records.
    """

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}

    def encode(self, dictionary: Sequence[str | None], indices: np.ndarray) -> np.ndarray:
        """Codes for a dictionary-encoded label column (``indices`` -1 where the label is null)."""
        lookup = np.empty(len(dictionary) + 1, dtype=np.int32)
        lookup[-1] = -1
        for position, label in enumerate(dictionary):
            lookup[position] = -1 if is_unlabelled(label) else self.codes.setdefault(str(label), len(self.codes))
        return lookup[indices]

    def finish(self) -> tuple[tuple[str, ...], np.ndarray]:
        """The sorted labels and the array mapping a provisional code to its class index."""
        labels = tuple(sorted(self.codes))
        index = {label: i for i, label in enumerate(labels)}
        remap = np.empty(len(self.codes), dtype=np.int32)
        for label, code in self.codes.items():
            remap[code] = index[label]
        return labels, remap


def is_unlabelled(label: str | None) -> bool:
    """Null and blank labels mean "unknown" (README: label is null when unknown)."""
    return label is None or not str(label).strip()


def encode_labels(labels: Iterable[str | None]) -> tuple[tuple[str, ...], np.ndarray]:
    """Sorted class names and each row's class index (-1 for unlabelled rows)."""
    values = list(labels)
    codes = LabelCodes()
    unique = list(dict.fromkeys(values))
    position = {label: i for i, label in enumerate(unique)}
    provisional = codes.encode(unique, np.array([position[v] for v in values], dtype=np.int64))
    names, remap = codes.finish()
    return names, np.where(provisional >= 0, remap[np.maximum(provisional, 0)], -1).astype(np.int32)


# --- the stratified split --------------------------------------------------------------------------------------

def key_hashes(keys: Iterable[str], seed: int) -> np.ndarray:
    """A stable 64-bit hash per key: the split depends on the keys and the seed only, never on file order."""
    salt = f"cnnbatch-split:{seed}".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8, key=salt).digest(), "little") for k in keys),
        dtype=np.uint64,
    )


def validation_quota(count: int, fraction: float) -> int:
    """How many of a class's ``count`` rows go to validation: the rounded share, at least one when the class has
    two or more rows (so every class is measured), never all of them (so every class is learned)."""
    if count < 2 or fraction <= 0:
        return 0
    return min(count - 1, max(1, int(round(count * fraction))))


def stratified_split(classes: np.ndarray, hashes: np.ndarray, fraction: float) -> np.ndarray:
    """Per row: TRAIN, VALIDATION or EXCLUDED (class -1). Within each class the rows with the smallest key hashes
    make up exactly that class's validation quota, so the split is stratified, deterministic and order-free."""
    split = np.full(len(classes), EXCLUDED, dtype=np.int8)
    labelled = classes >= 0
    split[labelled] = TRAIN
    if not labelled.any():
        return split
    for cls in np.unique(classes[labelled]):
        rows = np.flatnonzero(classes == cls)
        quota = validation_quota(len(rows), fraction)
        if quota:
            # Ties (equal keys in two datasets) fall back on row order: lexsort is stable.
            order = np.lexsort((rows, hashes[rows]))
            split[rows[order[:quota]]] = VALIDATION
    return split


def class_weights(train_counts: np.ndarray, mode: str) -> dict[int, float] | None:
    """``balanced``: n / (k * n_c), as scikit-learn's ``class_weight="balanced"``; ``none``: no weighting."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise ValueError(f"--class-weight must be balanced or none, got {mode!r}")
    present = train_counts > 0
    total, k = float(train_counts.sum()), int(present.sum())
    return {int(c): (total / (k * float(n)) if n else 0.0) for c, n in enumerate(train_counts)}


# --- feature statistics ----------------------------------------------------------------------------------------

@dataclass
class RunningMoments:
    """Mean and variance of feature vectors over a stream of batches (Chan et al.'s parallel update, float64)."""

    dim: int
    count: int = 0
    mean: np.ndarray = field(init=False)
    m2: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.mean = np.zeros(self.dim, dtype=np.float64)
        self.m2 = np.zeros(self.dim, dtype=np.float64)

    def update(self, batch: np.ndarray) -> None:
        n = len(batch)
        if n == 0:
            return
        batch = batch.astype(np.float64, copy=False)
        batch_mean = batch.mean(axis=0)
        batch_m2 = ((batch - batch_mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        """Population variance, with constant features set to 1 (see :data:`MIN_VARIANCE`)."""
        if self.count == 0:
            return np.ones(self.dim, dtype=np.float64)
        variance = self.m2 / self.count
        return np.where(variance < MIN_VARIANCE, 1.0, variance)


# --- the Keras head --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadSpec:
    """The head's architecture; with the normalisation statistics it fully determines the saved model."""

    kind: str = "mlp"
    hidden_units: int = 1024
    dropout: float = 0.5
    l2: float = 1e-3  # on the Dense kernels: keeps a wide head on few rows from overfitting (see bench/)

    def __post_init__(self) -> None:
        if self.kind not in HEADS:
            raise ValueError(f"--head must be one of {', '.join(HEADS)}, got {self.kind!r}")


def build_head(spec: HeadSpec, feature_dim: int, num_classes: int, mean: np.ndarray, variance: np.ndarray,
               seed: int | None = None) -> Any:
    """Raw features (feature_dim,) -> class probabilities (num_classes,), normalisation included.

    Layer names are stable ("embedding", "normalize", "probabilities"): predict fuses the head by name.
    """
    keras = keras_module()

    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    inputs = keras.Input(shape=(feature_dim,), dtype="float32", name="embedding")
    x = keras.layers.Normalization(mean=np.asarray(mean, np.float32), variance=np.asarray(variance, np.float32),
                                   name="normalize")(inputs)
    def regulariser() -> Any:
        return keras.regularizers.L2(spec.l2) if spec.l2 > 0 else None

    if spec.kind == "mlp":
        x = keras.layers.Dense(spec.hidden_units, activation="relu", name="hidden", kernel_regularizer=regulariser(),
                               kernel_initializer=keras.initializers.HeUniform(seed))(x)
        if spec.dropout > 0:
            x = keras.layers.Dropout(spec.dropout, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities",
                                 kernel_regularizer=regulariser(),
                                 kernel_initializer=keras.initializers.GlorotUniform(seed))(x)
    return keras.Model(inputs, outputs, name=f"cnnbatch_{spec.kind}_head")


def make_optimizer(name: str, learning_rate: float) -> Any:
    keras = keras_module()

    classes = {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}
    if name not in classes:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name == "sgd":
        return classes[name](learning_rate=learning_rate, momentum=0.9, nesterov=True)
    return classes[name](learning_rate=learning_rate)


# --- metrics ---------------------------------------------------------------------------------------------------

def confusion_matrix(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (true.astype(np.int64), predicted.astype(np.int64)), 1)
    return matrix


def per_class_scores(matrix: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Precision, recall and support per class (0.0 where undefined, as scikit-learn's zero_division=0)."""
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    return {label: {"precision": round(float(precision[i]), 6), "recall": round(float(recall[i]), 6),
                    "support": int(support[i])}
            for i, label in enumerate(labels)}


@dataclass
class EvaluationAccumulator:
    """Loss, accuracy and the confusion matrix of a head over a stream of predicted batches."""

    num_classes: int
    rows: int = 0
    loss_sum: float = 0.0
    matrix: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, probabilities: np.ndarray, true: np.ndarray) -> None:
        if len(true) == 0:
            return
        picked = probabilities[np.arange(len(true)), true]
        self.loss_sum += float(-np.log(np.clip(picked, 1e-7, 1.0)).sum())
        self.rows += len(true)
        self.matrix += confusion_matrix(true, probabilities.argmax(axis=1), self.num_classes)

    def summary(self, labels: Sequence[str]) -> dict[str, Any]:
        if self.rows == 0:
            return {"rows": 0, "loss": None, "accuracy": None}
        return {"rows": self.rows, "loss": round(self.loss_sum / self.rows, 6),
                "accuracy": round(float(np.trace(self.matrix)) / self.rows, 6),
                "per_class": per_class_scores(self.matrix, labels), "confusion_matrix": self.matrix.tolist()}
