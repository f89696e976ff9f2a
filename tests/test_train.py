"""The train job without Ray: its flags, what the driver checks from footers before a worker starts (one kind of
features, two classes, an output that may receive a model), and the fit itself (``execute_plan``: in memory and
streamed, from a folder and from an object store). Features are synthetic but written with the real feature
writer, so what is read is exactly what ``cnnbatch extract`` produces. (The head and its arithmetic:
tests/test_head.py; the model folder: tests/test_modelio.py; the footers: tests/test_featuresets.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cnnbatch import modelio
from cnnbatch.extract import embeddings_table, feature_schema
from cnnbatch.modelio import ModelError, load_model_folder
from cnnbatch.output import SUCCESS_FILE
from cnnbatch.parquetio import table_to_parquet_bytes
from cnnbatch.train import FeatureError, TrainConfig, execute_plan, plan_training
from cnnbatch.weights import WeightsRef

from .conftest import CLASSES, feature_metadata, learnable, write_features


def quick(features, output, **overrides) -> TrainConfig:
    values = dict(features=tuple(str(f) for f in features), output=str(output), epochs=10, hidden_units=64,
                  batch_size=32, patience=5)
    values.update(overrides)
    return TrainConfig(**values)


# --- the flags ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"features": ()}, "--features needs at least one feature dataset"),
    ({"epochs": 0}, "--epochs must be at least 1, got 0"),
    ({"validation_split": 0.0}, "--validation-split must be between 0 and 1, got 0.0"),
    ({"learning_rate": 0}, "--learning-rate must be positive, got 0"),
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"patience": -1}, "--patience must be 0 or more, got -1"),
    ({"hidden_units": 0}, "--hidden-units must be at least 1, got 0"),
    ({"dropout": 1.0}, r"--dropout must be in \[0, 1\), got 1.0"),
    ({"l2": -0.1}, "--l2 must be 0 or more, got -0.1"),
    ({"cache_mb": -1}, "--cache-mb must be 0 or more, got -1"),
    ({"gpus": -1.0}, "--gpus must be 0 or more, got -1.0"),
])
def test_config_refuses_bad_values_naming_expected_and_got(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"features": ("f",), "output": str(tmp_path / "m"), **overrides})


def test_one_features_uri_from_python_becomes_a_tuple(tmp_path: Path) -> None:
    config = TrainConfig(features="s3://bucket/features", output=str(tmp_path))
    assert config.features == ("s3://bucket/features",)
    assert config.head_spec.kind == "mlp" and config.head_spec.hidden_units == 1024


# --- validation of the feature sets ---------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("backbone", "inceptionv3"),
    ("image_size", 64),
    ("weights", {"kind": "random", "uri": None, "sha256": None, "seed": 7}),
    ("preprocessing", "something else"),
])
def test_refuses_mixed_feature_sets(tmp_path: Path, field: str, value) -> None:
    x, labels = learnable(4, 8)
    first = write_features(tmp_path / "a", x, labels)
    second = write_features(tmp_path / "b", x, labels, **{field: value})
    with pytest.raises(FeatureError, match=f"differ in {field}"):
        plan_training(quick([first, second], tmp_path / "model"))


def test_refuses_other_dimension_and_foreign_parquet(tmp_path: Path) -> None:
    x, labels = learnable(4, 8)
    first = write_features(tmp_path / "a", x, labels)
    wide = write_features(tmp_path / "b", np.concatenate([x, x], axis=1), labels)
    with pytest.raises(FeatureError, match="differ in dim"):
        plan_training(quick([first, wide], tmp_path / "model"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(pq.read_table(first / "part-000000.parquet").replace_schema_metadata(None),
                   foreign / "x.parquet")
    with pytest.raises(FeatureError, match="no cnnbatch feature metadata"):
        plan_training(quick([foreign], tmp_path / "model"))
    empty = tmp_path / "empty"
    (empty / "_errors").mkdir(parents=True)
    (empty / "_errors" / "part-000000.parquet").write_bytes(b"")
    with pytest.raises(FeatureError, match="no feature files"):
        plan_training(quick([empty], tmp_path / "model"))


def test_needs_two_labelled_classes(tmp_path: Path) -> None:
    x, _ = learnable(4, 8)
    features = write_features(tmp_path / "f", x, ["cat"] * 6 + [None] * 6)
    plan = plan_training(quick([features], tmp_path / "model"))
    with pytest.raises(FeatureError, match=r"at least two classes; found only 'cat'.*6 of 12 rows have no label"):
        execute_plan(plan)
    assert not (tmp_path / "model").exists()


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
    config = quick([learnable_features], tmp_path / "streamed", cache_mb=0, head="linear", learning_rate=0.01,
                   epochs=5)
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


