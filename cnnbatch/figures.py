"""The figures of a model folder: the validation confusion matrix and the training curve, as PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return buffer.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless workers have no display
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(labels: Sequence[str], evaluation: dict[str, Any]) -> bytes:
    """The validation confusion matrix as a PNG (counts written in the cells while there is room)."""
    plt = _pyplot()
    matrix = np.asarray(evaluation.get("confusion_matrix") or np.zeros((len(labels), len(labels))), dtype=np.int64)
    side = min(24.0, 3.0 + 0.45 * len(labels))
    figure, axes = plt.subplots(figsize=(side, side))
    axes.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(labels))
    if len(labels) <= 60:
        axes.set_xticks(ticks, labels=labels, rotation=90)
        axes.set_yticks(ticks, labels=labels)
    if len(labels) <= 30:
        limit = matrix.max() / 2 if matrix.size else 0
        for (row, col), count in np.ndenumerate(matrix):
            axes.text(col, row, str(count), ha="center", va="center",
                      color="white" if count > limit else "black", fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    accuracy = evaluation.get("accuracy")
    axes.set_title(f"validation confusion matrix ({evaluation.get('rows', 0)} rows, accuracy "
                   f"{accuracy if accuracy is not None else float('nan'):.3f})")
    return _png(figure)


def curve_figure(history: dict[str, list[float]], best_epoch: int) -> bytes:
    """Training and validation loss and accuracy per epoch, the restored epoch marked."""
    plt = _pyplot()
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        for prefix, name in (("", "train"), ("val_", "validation")):
            values = history.get(prefix + metric, [])
            axes.plot(range(1, len(values) + 1), values, label=name)
        axes.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.legend()
    figure.suptitle("training curve")
    return _png(figure)
