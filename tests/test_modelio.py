"""The model folder: written atomically (a local folder renamed into place, an object store's manifest last), read
back only when every checksum matches, the head loaded safely (no Lambda layers, no legacy HDF5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cnnbatch import modelio
from cnnbatch.head import HeadSpec, build_head
from cnnbatch.modelio import (
    ModelError,
    ModelInfo,
    check_output,
    load_model_folder,
    read_model_info,
    refuse_lambda_layers,
    write_model_folder,
)
from cnnbatch.weights import WeightsRef


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


def test_check_output_refuses_a_file_or_foreign_files_and_accepts_nothing_yet(tmp_path: Path) -> None:
    check_output(str(tmp_path / "new"), overwrite=False)  # nothing there: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelError, match="is a file; a model is a folder"):
        check_output(str(tmp_path / "file"), overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"holds files that are not part of a cnnbatch model \(holiday.jpg\)"):
        check_output(str(tmp_path / "mine"), overwrite=True)
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".DS_Store").write_bytes(b"x")  # hidden names are not in the way
    check_output(str(tmp_path / "hidden"), overwrite=False)


def test_the_manifest_lists_every_file_with_its_sha256_and_the_versions(tmp_path: Path) -> None:
    figures = {modelio.CONFUSION_FILE: b"\x89PNG fake", modelio.CURVE_FILE: b"\x89PNG fake too"}
    info = write_model_folder(str(tmp_path / "m"), small_head(), small_model_info(), {"acc": np.float32(0.5)},
                              figures)
    manifest = json.loads((tmp_path / "m" / modelio.MANIFEST_FILE).read_text())
    assert manifest["format"] == modelio.MODEL_FORMAT and set(manifest["versions"]) >= {"cnnbatch", "keras"}
    assert manifest["files"] == dict(info.files)
    assert set(info.files) == {modelio.HEAD_FILE, modelio.LABELS_FILE, modelio.METRICS_FILE, *figures}
    for name, digest in info.files.items():
        assert modelio.sha256_bytes((tmp_path / "m" / name).read_bytes()) == digest
    assert json.loads((tmp_path / "m" / modelio.METRICS_FILE).read_text()) == {"acc": 0.5}  # numpy made plain
    assert read_model_info(str(tmp_path / "m")) == info


def test_writing_refuses_unknown_figures_and_labels_with_line_breaks(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unexpected figure names"):
        write_model_folder(str(tmp_path / "a"), small_head(), small_model_info(), {}, {"roc.png": b"x"})
    with pytest.raises(ModelError, match="may not contain line breaks"):
        write_model_folder(str(tmp_path / "b"), small_head(), small_model_info(("a\nb", "c")), {}, {})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_reading_refuses_a_manifest_of_another_format_or_not_json(tmp_path: Path) -> None:
    write_model_folder(str(tmp_path / "m"), small_head(), small_model_info(), {}, {})
    manifest_path = tmp_path / "m" / modelio.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format": "someone-else/9"}))
    with pytest.raises(ModelError, match="has format 'someone-else/9'; this cnnbatch reads"):
        read_model_info(str(tmp_path / "m"))
    manifest_path.write_text("{torn")
    with pytest.raises(ModelError, match="is not valid JSON"):
        read_model_info(str(tmp_path / "m"))


def test_lambda_layers_are_found_at_any_depth_of_the_config() -> None:
    import io
    import zipfile

    def archive(config: dict) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as handle:
            handle.writestr("config.json", json.dumps(config))
        return buffer.getvalue()

    nested = {"class_name": "Functional", "config": {"layers": [
        {"class_name": "Dense", "config": {"name": "d"}},
        {"class_name": "Functional", "config": {"layers": [{"class_name": "Lambda", "config": {"name": "inner"}}]}}]}}
    with pytest.raises(ModelError, match=r"Lambda layers \(inner\)"):
        refuse_lambda_layers(archive(nested))
    refuse_lambda_layers(archive({"class_name": "Functional", "config": {"layers": []}}))
    refuse_lambda_layers(b"not a zip at all")  # not an archive: load_model says why


def test_labels_txt_must_agree_with_the_manifest_even_with_its_checksum_updated(tmp_path: Path) -> None:
    """A shortened labels.txt whose sha256 was updated in model.json would mislabel predictions: refused."""
    folder = tmp_path / "m"
    write_model_folder(str(folder), small_head(), small_model_info(("cats", "dogs")), {}, {})
    manifest = json.loads((folder / modelio.MANIFEST_FILE).read_text())
    (folder / modelio.LABELS_FILE).write_bytes(b"cats\n")
    manifest["files"][modelio.LABELS_FILE] = modelio.sha256_bytes(b"cats\n")
    (folder / modelio.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"labels.txt of model .* lists 1 labels \(cats\), model.json 2 "
                                         r"\(cats, dogs\)"):
        load_model_folder(str(folder))


def test_a_format_1_folder_still_loads(tmp_path: Path) -> None:
    """Folders written before fine-tuning existed: format cnnbatch-model/1, no augment or fine_tuned fields."""
    folder = tmp_path / "m"
    write_model_folder(str(folder), small_head(), small_model_info(), {}, {})
    manifest = json.loads((folder / modelio.MANIFEST_FILE).read_text())
    assert manifest["format"] == "cnnbatch-model/2"
    manifest["format"] = "cnnbatch-model/1"
    for name in ("augment", "fine_tuned"):
        manifest.pop(name)
    (folder / modelio.MANIFEST_FILE).write_text(json.dumps(manifest))
    info, head = load_model_folder(str(folder))
    assert info.augment is None and info.fine_tuned is None and not info.has_backbone_file
    assert modelio.backbone_weights(str(folder), info) == info.weights and head.output_shape == (None, 2)
