"""The train job without Ray: its flags, and what the driver checks from footers before a worker starts (one kind of
features, two classes, an output that may receive a model). Features are synthetic but written with the real
feature writer, so what is read is exactly what ``cnnbatch extract`` produces. (The fit itself, ``execute_plan``
in memory and streamed: tests/integration/test_train_fit.py; the head and its arithmetic: tests/test_head.py; the
model folder: tests/test_modelio.py; the footers: tests/test_featuresets.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cnnbatch.train import FeatureError, TrainConfig, execute_plan, plan_training

from .conftest import learnable, write_features


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
