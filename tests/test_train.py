"""The train stage without Ray: head construction, labels, the stratified split, feature statistics, validation of
feature sets, the fit itself (in memory and streamed) and the model folder. Features are synthetic but written with
the real feature writer, so what is read is exactly what ``cnnbatch extract`` produces."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cnnbatch import modelio
from cnnbatch.cli import main
from cnnbatch.head import (EXCLUDED, VALIDATION, HeadSpec, LabelCodes, RunningMoments, build_head,
                           class_weights, encode_labels, key_hashes, stratified_split, validation_quota)
from cnnbatch.modelio import ModelError, ModelInfo, load_model_folder, write_model_folder
from cnnbatch.extract import embeddings_table, feature_schema
from cnnbatch.output import SUCCESS_FILE
from cnnbatch.parquetio import table_to_parquet_bytes
from cnnbatch.train import FeatureError, TrainConfig, execute_plan, plan_training
from cnnbatch.weights import WeightsRef

CLASSES = ("cat", "dog", "fox")


def feature_metadata(dim: int, **overrides) -> dict:
    """Schema metadata shaped as cnnbatch extract writes it."""
    metadata = {"kind": "features", "backbone": "vgg16", "dim": dim,
                "weights": {"kind": "random", "uri": None, "sha256": None, "seed": 1337}, "image_size": 32,
                "preprocessing": "keras.applications.vgg16.preprocess_input(caffe:BGR,mean-subtract)",
                "decode": "pillow-bilinear-exif-draft2-v1", "precision": "float32"}
    metadata.update(overrides)
    return metadata


def learnable(rows_per_class: int, dim: int, seed: int = 0, scale: float = 50.0,
              offset: float = 100.0) -> tuple[np.ndarray, list[str]]:
    """Separable classes on a large offset and scale, so an unnormalised head would struggle."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (len(CLASSES), dim))
    x = np.concatenate([centres[c] + rng.normal(0, 0.35, (rows_per_class, dim)) for c in range(len(CLASSES))])
    labels = [label for label in CLASSES for _ in range(rows_per_class)]
    return (x * scale + offset).astype(np.float32), labels


def write_features(root: Path, x: np.ndarray, labels: list[str | None], parts: int = 3, prefix: str = "img",
                   row_group_rows: int | None = None, success: bool = True, **metadata) -> Path:
    """A feature dataset as extract writes it: part files, schema metadata, ``_SUCCESS``."""
    root.mkdir(parents=True, exist_ok=True)
    schema = feature_schema(x.shape[1], feature_metadata(x.shape[1], **metadata))
    keys = [f"{prefix}/{label}/{i:05d}.jpg" for i, label in enumerate(labels)]
    for part, rows in enumerate(np.array_split(np.arange(len(labels)), parts)):
        table = embeddings_table([keys[i] for i in rows], [labels[i] for i in rows], x[rows], schema)
        path = root / f"part-{part:06d}.parquet"
        if row_group_rows:
            pq.write_table(table, path, row_group_size=row_group_rows)
        else:
            path.write_bytes(table_to_parquet_bytes(table))
    if success:
        (root / SUCCESS_FILE).write_text("{}")
    return root


def quick(features, output, **overrides) -> TrainConfig:
    values = dict(features=tuple(str(f) for f in features), output=str(output), epochs=30, hidden_units=64,
                  batch_size=32, patience=5)
    values.update(overrides)
    return TrainConfig(**values)


# --- labels, split, statistics ----------------------------------------------------------------------------------

def test_label_encoding_sorts_classes_and_excludes_unknown() -> None:
    names, classes = encode_labels(["fox", None, "cat", "", "fox", "  ", "dog"])
    assert names == ("cat", "dog", "fox")
    assert classes.tolist() == [2, -1, 0, -1, 2, -1, 1]


def test_label_codes_are_stable_across_batches() -> None:
    codes = LabelCodes()
    first = codes.encode(["b", "a", None], np.array([0, 1, 2, -1]))
    second = codes.encode(["c", "a"], np.array([1, 0]))
    labels, remap = codes.finish()
    assert labels == ("a", "b", "c")
    assert remap[first[first >= 0]].tolist() == [1, 0]
    assert remap[second].tolist() == [0, 2]
    assert first[-2:].tolist() == [-1, -1]


def test_split_is_stratified_exact_and_order_free() -> None:
    sizes = {0: 50, 1: 30, 2: 5, 3: 1}
    classes = np.concatenate([np.full(n, c, np.int32) for c, n in sizes.items()] + [np.full(4, -1, np.int32)])
    keys = [f"k{i}" for i in range(len(classes))]
    split = stratified_split(classes, key_hashes(keys, seed=3), 0.2)
    for cls, n in sizes.items():
        assert (split[classes == cls] == VALIDATION).sum() == validation_quota(n, 0.2)
    assert [validation_quota(n, 0.2) for n in sizes.values()] == [10, 6, 1, 0]
    assert (split[classes == -1] == EXCLUDED).all() and (split[classes >= 0] != EXCLUDED).all()
    # The same rows in another order get the same split; another seed gives another split.
    order = np.random.default_rng(0).permutation(len(classes))
    shuffled = stratified_split(classes[order], key_hashes([keys[i] for i in order], seed=3), 0.2)
    assert (shuffled == split[order]).all()
    assert (stratified_split(classes, key_hashes(keys, seed=4), 0.2) != split).any()


def test_running_moments_match_numpy_over_uneven_batches() -> None:
    rng = np.random.default_rng(1)
    x = (rng.normal(1000, 3, (257, 6))).astype(np.float32)
    x[:, 5] = 0.0  # a dead channel
    moments = RunningMoments(6)
    for chunk in np.array_split(x, [1, 2, 100, 101, 200]):
        moments.update(chunk)
    assert moments.count == 257
    np.testing.assert_allclose(moments.mean, x.astype(np.float64).mean(0), rtol=1e-9)
    np.testing.assert_allclose(moments.variance[:5], x[:, :5].astype(np.float64).var(0), rtol=1e-6)
    assert moments.variance[5] == 1.0


def test_balanced_class_weights() -> None:
    assert class_weights(np.array([10, 30]), "none") is None
    assert class_weights(np.array([10, 30]), "balanced") == {0: 2.0, 1: 40 / 60}


# --- the head ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, hidden", [("mlp", 16), ("linear", None)])
def test_head_construction(kind: str, hidden: int | None) -> None:
    mean, variance = np.arange(8, dtype=np.float32), np.full(8, 4.0, np.float32)
    head = build_head(HeadSpec(kind, hidden_units=16), 8, 3, mean, variance, seed=0)
    names = [layer.name for layer in head.layers]
    assert names[:2] == ["embedding", "normalize"] and names[-1] == "probabilities"
    assert ("hidden" in names) == (kind == "mlp") and ("dropout" in names) == (kind == "mlp")
    dense = [layer for layer in head.layers if layer.name in ("hidden", "probabilities")]
    assert [layer.units for layer in dense] == ([hidden, 3] if hidden else [3])
    probabilities = np.asarray(head(np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)))
    assert probabilities.shape == (5, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_normalisation_is_inside_the_head() -> None:
    import keras

    mean, variance = np.linspace(-5, 5, 4).astype(np.float32), np.array([1, 4, 9, 0.25], np.float32)
    head = build_head(HeadSpec("linear"), 4, 2, mean, variance, seed=0)
    normalize = keras.Model(head.input, head.get_layer("normalize").output)
    x = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(normalize(x)), (x - mean) / np.sqrt(variance), rtol=1e-5, atol=1e-5)


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


def test_cli_exit_codes(tmp_path: Path, capsys) -> None:
    x, labels = learnable(4, 8)
    first = write_features(tmp_path / "a", x, labels)
    second = write_features(tmp_path / "b", x, labels, image_size=64)
    assert main(["train", "--features", str(first), "--output", str(tmp_path / "m"),
                 "--validation-split", "1.5"]) == 2
    assert main(["train", "--features", str(first), str(second), "--output", str(tmp_path / "m")]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].startswith("cnnbatch train: error: feature sets differ in image_size")
    assert "--validation-split must be between 0 and 1, got 1.5" in errors[0]


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
    assert {p.name for p in output.iterdir()} == set(modelio.MODEL_FILES)
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


# --- the model folder --------------------------------------------------------------------------------------------

def small_model_info(labels=("a", "b")) -> ModelInfo:
    return ModelInfo(backbone="vgg16", image_size=32, weights=WeightsRef("random", seed=1), feature_dim=4,
                     labels=tuple(labels), head="linear", precision="float32", preprocessing="p", decode="d")


def small_head():
    return build_head(HeadSpec("linear"), 4, 2, np.zeros(4), np.ones(4), seed=0)


def test_model_folder_on_an_object_store_verifies_checksums() -> None:
    import fsspec

    uri = "memory://models/m1"
    info = write_model_folder(uri, small_head(), small_model_info(), {"validation": {"accuracy": 1.0}}, {})
    assert set(info.files) == {modelio.HEAD_FILE, modelio.LABELS_FILE, modelio.METRICS_FILE}
    loaded, head = load_model_folder(uri)
    assert loaded == info and head.output_shape == (None, 2)
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/models/m1/labels.txt", b"b\na\n")
    with pytest.raises(ModelError, match="labels.txt of model memory://models/m1 does not match model.json"):
        load_model_folder(uri)
    fs.rm_file("/models/m1/model.json")
    with pytest.raises(ModelError, match="not a complete cnnbatch model folder"):
        load_model_folder(uri)


def test_local_write_is_atomic_and_keeps_the_old_model_on_failure(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "model"
    write_model_folder(str(target), small_head(), small_model_info(), {}, {})
    before = (target / modelio.MANIFEST_FILE).read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(modelio.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        write_model_folder(str(target), small_head(), small_model_info(("x", "y")), {}, {}, overwrite=True)
    assert (target / modelio.MANIFEST_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no torn sibling left behind
    with pytest.raises(ModelError, match="not part of a cnnbatch model"):
        (target / "notes.txt").write_text("mine")
        write_model_folder(str(target), small_head(), small_model_info(), {}, {}, overwrite=True)


def test_load_refuses_lambda_layers_and_legacy_h5(tmp_path: Path) -> None:
    import keras

    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Lambda(lambda t: t * 2.0)(inputs))
    write_model_folder(str(tmp_path / "lambda"), keras.Model(inputs, outputs), small_model_info(), {}, {})
    with pytest.raises(ModelError, match="safe_mode=True"):
        load_model_folder(str(tmp_path / "lambda"))
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "head.h5").write_bytes(b"\x89HDF\r\n")
    with pytest.raises(ModelError, match=r"legacy HDF5 head \(head.h5\), which is refused"):
        load_model_folder(str(legacy))


def test_model_info_round_trip() -> None:
    info = replace(small_model_info(), files={"head.keras": "ab"})
    assert ModelInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    with pytest.raises(ModelError, match="malformed"):
        ModelInfo.from_dict({"backbone": "vgg16"})
