"""Bulk prediction's task: the prediction table's layout, probabilities averaged over a record's views, the counts
on labelled inputs, and what the metadata and the resume fingerprint record about the model."""

from __future__ import annotations

import numpy as np

from cnnbatch.augment import CLASSIC
from cnnbatch.modelio import ModelInfo
from cnnbatch.parquetio import read_metadata
from cnnbatch.predicttask import (
    PredictTask,
    mean_probabilities,
    prediction_fingerprint,
    prediction_metadata,
    prediction_schema,
    prediction_table,
    tta_metadata,
)
from cnnbatch.weights import WeightsRef

INFO = ModelInfo(backbone="vgg16", image_size=32, weights=WeightsRef("random", seed=1), feature_dim=512,
                 labels=("cat", "dog", "eel"), head="linear", precision="float32", preprocessing="p", decode="d")


def test_prediction_table_columns() -> None:
    """Moved here from the predict tests."""
    probabilities = np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]], np.float32)
    table = prediction_table(["a", "b"], probabilities, ("cat", "dog", "eel"), 2, prediction_schema(2, {"k": 1}))
    assert table.column_names == ["key", "predicted_label", "probability", "top_k_labels", "top_k_probabilities"]
    assert table.column("predicted_label").to_pylist() == ["dog", "cat"]
    assert table.column("top_k_labels").to_pylist() == [["dog", "eel"], ["cat", "dog"]]
    assert str(table.schema.field("probability").type) == "float"
    one = prediction_table(["a"], probabilities[:1], ("cat", "dog", "eel"), 1, prediction_schema(1, {}))
    assert one.column_names == ["key", "predicted_label", "probability"]


def test_probabilities_are_averaged_over_each_record_s_views() -> None:
    outputs = {"probabilities": np.array([[[0.8, 0.1, 0.1], [0.2, 0.7, 0.1]],
                                          [[0.1, 0.1, 0.8], [0.1, 0.1, 0.8]]], np.float32)}
    np.testing.assert_allclose(mean_probabilities(outputs, 3), [[0.5, 0.4, 0.1], [0.1, 0.1, 0.8]], rtol=1e-6)
    assert mean_probabilities({}, 3).shape == (0, 3)  # a shard of errors only


def test_the_task_s_table_and_counts(tmp_path) -> None:
    task = PredictTask(str(tmp_path), INFO, "float32", top_k=2, batch_size=8, metadata={"kind": "predictions"})
    assert task.views == 1 and task.image_size == 32
    assert task.variants("k", np.zeros((32, 32, 3), np.uint8)).shape == (1, 32, 32, 3)
    outputs = {"probabilities": np.array([[[0.1, 0.8, 0.1]], [[0.7, 0.2, 0.1]], [[0.2, 0.2, 0.6]]], np.float32)}
    table = task.make_table(None, ["a", "b", "c"], ["dog", "dog", None], outputs)
    assert table.column("predicted_label").to_pylist() == ["dog", "cat", "eel"]
    assert read_metadata(table.schema) == {"kind": "predictions"}
    # labels outside the model's classes (and unknown ones) are not counted
    assert task.counts(["dog", "dog", None], outputs) == {"labelled": 2, "correct": 1}
    assert task.counts(["wolf", None, "eel"], outputs) == {"labelled": 1, "correct": 1}
    assert task.counts([], {}) == {"labelled": 0, "correct": 0}


def test_test_time_views_are_the_plain_image_then_seeded_views() -> None:
    task = PredictTask("m", INFO, "float32", 1, 8, {}, tta=3, recipe=CLASSIC, seed=5)
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    views = task.variants("cats/a.jpg", pixels)
    assert task.views == 4 and views.shape == (4, 32, 32, 3) and np.array_equal(views[0], pixels)
    assert np.array_equal(views, task.variants("cats/a.jpg", pixels))  # seeded by (seed, key, view)


def test_the_fingerprint_names_the_model_top_k_precision_and_views() -> None:
    base = prediction_fingerprint("a" * 64, 1, "float32")
    assert prediction_fingerprint("a" * 64, 1, "float32") == base
    others = {prediction_fingerprint("b" * 64, 1, "float32"), prediction_fingerprint("a" * 64, 2, "float32"),
              prediction_fingerprint("a" * 64, 1, "bfloat16"),
              prediction_fingerprint("a" * 64, 1, "float32", tta_metadata(2, CLASSIC, 0))}
    assert base not in others and len(others) == 4


def test_metadata_records_the_model_without_credentials() -> None:
    meta = prediction_metadata("s3://AKIAFAKE:hunter2@bucket/model", "c" * 64, INFO, "bfloat16", 3)
    assert meta["kind"] == "predictions" and meta["model"] == {"uri": "s3://***@bucket/model", "sha256": "c" * 64,
                                                               "head": "linear"}
    assert meta["labels"] == ["cat", "dog", "eel"] and meta["top_k"] == 3 and meta["precision"] == "bfloat16"
    assert "tta" not in meta
    assert prediction_metadata("m", "c" * 64, INFO, "float32", 1, tta_metadata(2, CLASSIC, 7))["tta"]["views"] == 2
