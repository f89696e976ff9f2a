"""The train job's fit without Ray (``execute_plan``, what the Ray task runs): in memory and streamed, from a folder
and from an object store, into a complete model folder. Keras fits of 30 epochs: kept out of the fast lane (moved
here from tests/test_train.py, with the original epochs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cnnbatch import modelio
from cnnbatch.extract import embeddings_table, feature_schema
from cnnbatch.modelio import ModelError, load_model_folder
from cnnbatch.output import SUCCESS_FILE
from cnnbatch.parquetio import table_to_parquet_bytes
from cnnbatch.train import TrainConfig, execute_plan, plan_training
from cnnbatch.weights import WeightsRef

from ..conftest import CLASSES, feature_metadata, learnable, write_features


def quick(features, output, **overrides) -> TrainConfig:
    values = dict(features=tuple(str(f) for f in features), output=str(output), epochs=30, hidden_units=64,
                  batch_size=32, patience=5)
    values.update(overrides)
    return TrainConfig(**values)


# --- the fit -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def learnable_features(tmp_path_factory) -> Path:
    x, labels = learnable(60, 16)
    labels = labels + [None] * 5
    x = np.concatenate([x, np.zeros((5, 16), np.float32)])
    return write_features(tmp_path_factory.mktemp("learnable") / "features", x, labels, parts=4,
                          row_group_rows=20)


@pytest.fixture(scope="module")
def trained(learnable_features: Path, tmp_path_factory):
    output = tmp_path_factory.mktemp("models") / "in-memory"
    summary = execute_plan(plan_training(quick([learnable_features], output)))
    return output, summary


def test_fit_in_memory_writes_a_complete_model(trained) -> None:
    output, summary = trained
    assert summary.failed == {} and not summary.streamed
    assert (summary.rows_train, summary.rows_validation, summary.rows_unlabelled) == (162, 18, 5)
    assert summary.validation_accuracy >= 0.95, summary.line()
    assert {p.name for p in output.iterdir()} == set(modelio.MODEL_FILES) - {modelio.BACKBONE_FILE}
    metrics = json.loads((output / modelio.METRICS_FILE).read_text())
    assert metrics["rows"] == {"total": 185, "train": 162, "validation": 18, "excluded_unlabelled": 5}
    assert metrics["classes"] == {label: {"train": 54, "validation": 6} for label in CLASSES}
    assert set(metrics["validation"]["per_class"]) == set(CLASSES)
    assert {"precision", "recall", "support"} <= set(metrics["validation"]["per_class"]["cat"])
    assert metrics["validation"]["accuracy"] == summary.validation_accuracy
    assert np.asarray(metrics["validation"]["confusion_matrix"]).sum() == 18
    assert {"loss", "val_loss", "accuracy", "val_accuracy"} <= set(metrics["history"])
    assert metrics["fit"]["device"] == "CPU" and metrics["fit"]["hostname"]
    assert (output / modelio.LABELS_FILE).read_text() == "cat\ndog\nfox\n"
    for png in (modelio.CONFUSION_FILE, modelio.CURVE_FILE):
        assert (output / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loaded_head_predicts_from_raw_features(trained, learnable_features: Path) -> None:
    output, _ = trained
    info, head = load_model_folder(str(output))
    assert (info.backbone, info.image_size, info.feature_dim, info.labels) == ("vgg16", 32, 16, CLASSES)
    assert info.weights == WeightsRef("random", seed=1337) and info.head == "mlp"
    x, labels = learnable(60, 16)  # the same rows, raw (un-normalised) features
    predicted = np.asarray(head.predict(x, verbose=0)).argmax(axis=1)
    assert (np.array(CLASSES)[predicted] == np.array(labels)).mean() >= 0.95


def test_streamed_fit_sees_the_same_split(trained, learnable_features: Path, tmp_path: Path) -> None:
    _, in_memory = trained
    config = quick([learnable_features], tmp_path / "streamed", cache_mb=0, head="linear", learning_rate=0.01)
    summary = execute_plan(plan_training(config))
    assert summary.streamed
    assert (summary.rows_train, summary.rows_validation, summary.rows_unlabelled) == (
        in_memory.rows_train, in_memory.rows_validation, in_memory.rows_unlabelled)
    assert summary.validation_accuracy >= 0.95, summary.line()
    info, _ = load_model_folder(str(tmp_path / "streamed"))
    assert info.head == "linear"


def test_streams_features_from_an_object_store_into_a_model_there() -> None:
    """memory:// stands in for a bucket: listing, footers, row groups and the model folder all go through fsspec."""
    import fsspec

    fs = fsspec.filesystem("memory")
    x, labels = learnable(30, 8, seed=3)
    schema = feature_schema(8, feature_metadata(8))
    for part, rows in enumerate(np.array_split(np.arange(len(labels)), 3)):
        table = embeddings_table([f"k{i}" for i in rows], [labels[i] for i in rows], x[rows], schema)
        fs.pipe_file(f"/bucket/features/part-{part:06d}.parquet", table_to_parquet_bytes(table))
    fs.pipe_file(f"/bucket/features/{SUCCESS_FILE}", b"{}")
    summary = execute_plan(plan_training(quick(["memory://bucket/features"], "memory://bucket/model", cache_mb=0,
                                               epochs=5, head="linear", learning_rate=0.05)))
    assert summary.streamed and summary.rows_train + summary.rows_validation == 90
    info, _ = load_model_folder("memory://bucket/model")
    assert info.labels == CLASSES and fs.exists("/bucket/model/confusion_matrix.png")


def test_output_holding_a_model_needs_overwrite(trained, learnable_features: Path) -> None:
    output, _ = trained
    with pytest.raises(ModelError, match="already holds a model; use --overwrite"):
        plan_training(quick([learnable_features], output))
    plan_training(quick([learnable_features], output, overwrite=True))


