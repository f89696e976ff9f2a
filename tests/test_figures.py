"""The model folder's figures: valid PNG images of the confusion matrix and the training curve."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from cnnbatch.figures import confusion_figure, curve_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image(data: bytes) -> Image.Image:
    assert data[:8] == PNG_SIGNATURE
    picture = Image.open(io.BytesIO(data))
    picture.load()  # decodes the whole file: a truncated PNG fails here
    return picture


def test_confusion_matrix_is_a_png() -> None:
    evaluation = {"rows": 10, "accuracy": 0.8, "confusion_matrix": [[4, 1], [1, 4]]}
    picture = image(confusion_figure(["cat", "dog"], evaluation))
    assert picture.format == "PNG" and picture.width > 100 and picture.height > 100


def test_confusion_matrix_of_many_classes_or_none_evaluated() -> None:
    labels = [f"class-{i:03d}" for i in range(80)]  # too many for tick labels and cell counts
    matrix = np.eye(80, dtype=int).tolist()
    assert image(confusion_figure(labels, {"rows": 80, "accuracy": 1.0, "confusion_matrix": matrix})).width > 100
    empty = image(confusion_figure(["a", "b"], {"rows": 0, "loss": None, "accuracy": None}))
    assert empty.format == "PNG"


def test_training_curve_is_a_png_with_or_without_validation() -> None:
    history = {"loss": [1.0, 0.6, 0.4], "val_loss": [1.1, 0.7, 0.8], "accuracy": [0.5, 0.7, 0.9],
               "val_accuracy": [0.4, 0.7, 0.6]}
    wide = image(curve_figure(history, best_epoch=2))
    assert wide.width > wide.height  # two panels side by side
    assert image(curve_figure({"loss": [1.0], "accuracy": [0.5]}, best_epoch=1)).format == "PNG"
