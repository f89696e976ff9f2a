"""What every fit shares (``train`` on features, ``finetune`` on images): its callbacks, the restored epoch, and
the evaluation of the final model over a stream of batches, with loss, accuracy, per-class scores and the
confusion matrix that metrics.json and the figures report."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .head import EvaluationAccumulator
from .tfruntime import keras_module, tensorflow

EVAL_BATCH_ROWS = 4096


def fit_callbacks(patience: int, epochs: int, learning_rate: float) -> list[Any]:
    """Early stopping on the validation loss with the best epoch restored, and a smaller step once the
    validation loss stalls, so the fit settles instead of bouncing around the minimum."""
    keras = keras_module()

    patience = patience or epochs
    return [keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=max(1, patience // 2 - 1),
                                              min_lr=learning_rate / 1000)]


def best_epoch(history: dict[str, list[float]]) -> int:
    """The 1-based epoch with the lowest validation loss (the one early stopping restores)."""
    losses = history.get("val_loss", [])
    return int(np.argmin(losses)) + 1 if losses else len(next(iter(history.values()), []))


def rounded_history(history: dict[str, list[float]]) -> dict[str, list[float]]:
    return {name: [round(float(v), 6) for v in values] for name, values in history.items()}


def evaluate_batches(predict: Any, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                     labels: Sequence[str]) -> dict[str, Any]:
    """Loss, accuracy, per-class precision/recall and the confusion matrix of ``predict`` (inputs ->
    probabilities) over ``(inputs, classes)`` batches."""
    accumulator = EvaluationAccumulator(len(labels))
    for x_batch, y_batch in batches:
        accumulator.update(np.asarray(predict(x_batch)), y_batch)
    return accumulator.summary(labels)


def compiled_predict(model: Any, input_shape: tuple[int, ...], dtype: str = "float32") -> Any:
    """``model(x, training=False)`` as one ``tf.function`` traced once for every batch size (``predict_on_batch``
    would retrace for each new shape)."""
    tf = tensorflow()
    return tf.function(lambda x: model(x, training=False), autograph=False,
                       input_signature=[tf.TensorSpec((None, *input_shape), getattr(tf, dtype))])
