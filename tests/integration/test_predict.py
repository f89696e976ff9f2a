"""Prediction end to end on a real local Ray cluster, with a head trained in this module on extracted features.

One extraction and one training per module (seeded random VGG16 at 32 px); every test then predicts with that
model folder: bulk over a folder and over tar shards, incremental reruns, one image from a path or a local HTTP
server, and model folders that must be refused (Lambda layers, checksum mismatch, legacy HDF5, another model).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from cnnbatch import cli
from cnnbatch.extract import ExtractConfig, run_extract
from cnnbatch.modelio import ModelError, load_model_folder, write_model_folder
from cnnbatch.output import OutputError
from cnnbatch.parquetio import read_metadata
from cnnbatch.predict import PredictConfig, manifest_sha256, run_predict
from cnnbatch.train import TrainConfig, run_train

from ..conftest import REPO, TEST_IMAGE_SIZE

# --- fixtures: one extraction and one training for the module -----------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(ray_cluster, sample_root: Path, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("predict-model")
    extract = ExtractConfig(input=str(sample_root / "train"), output=str(work / "features"), weights="random",
                            image_size=TEST_IMAGE_SIZE, batch_size=16, shard_size=100, gpus_per_worker=0,
                            precision="float32")
    assert run_extract(extract).ok
    model = work / "model"
    run_train(TrainConfig(features=(str(work / "features"),), output=str(model), epochs=8, hidden_units=32,
                          batch_size=16, patience=3, gpus=0))
    return model


def main(*args: str) -> int:
    """``cnnbatch ARGS`` in this process; its stderr handler goes with the test (capsys closes that stream)."""
    try:
        return cli.main(list(args))
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "_cnnbatch", False)]:
            root.removeHandler(handler)


def bulk(input_uri: Path, output: Path, model: Path, **overrides):
    values = dict(input=str(input_uri), output=str(output), model=str(model), batch_size=8, gpus_per_worker=0)
    values.update(overrides)
    return run_predict(PredictConfig(**values))


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def rows_by_key(output: Path) -> dict[str, dict]:
    rows = ds.dataset(output).to_table().to_pylist()
    by_key = {row["key"]: row for row in rows}
    assert len(by_key) == len(rows), "a key appears twice"
    return by_key


@pytest.fixture(scope="module")
def folder_predictions(model_dir: Path, sample_root: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("predictions") / "holdout"
    summary = bulk(sample_root / "holdout", output, model_dir, top_k=2)
    assert summary.ok and summary.shards_done == 1
    return output


# --- bulk ----------------------------------------------------------------------------------------------------------

def test_bulk_folder_every_image_once_with_top_k(folder_predictions: Path, sample_root: Path, model_dir: Path) -> None:
    rows = rows_by_key(folder_predictions)
    assert set(rows) == files_under(sample_root / "holdout")
    labels = set(json.loads((model_dir / "model.json").read_text())["labels"])
    for row in rows.values():
        assert row["predicted_label"] in labels
        assert row["top_k_labels"][0] == row["predicted_label"] and len(row["top_k_labels"]) == 2
        assert row["top_k_probabilities"][0] == pytest.approx(row["probability"])
        assert 0.0 <= row["top_k_probabilities"][1] <= row["probability"] <= 1.0
    schema = pq.read_schema(next(folder_predictions.glob("part-*.parquet")))
    meta = read_metadata(schema)
    assert meta["kind"] == "predictions" and meta["backbone"] == "vgg16" and meta["labels"] == sorted(labels)
    assert meta["model"]["sha256"] == manifest_sha256(str(model_dir)) and meta["top_k"] == 2
    assert str(schema.field("top_k_labels").type) == "list<element: string>"
    manifest = json.loads((folder_predictions / "_SUCCESS").read_text())
    assert manifest["totals"]["rows"] == len(rows) and manifest["totals"]["errors"] == 0


def write_tar(path: Path, images: list[Path], broken: bool = False) -> set[str]:
    """A WebDataset tar of ``images`` (label in ``<key>.cls``); returns the dataset keys it yields."""
    keys = set()
    with tarfile.open(path, "w") as archive:
        members = [(f"img{i:02d}{image.suffix}", image.read_bytes()) for i, image in enumerate(images)]
        members += [(f"img{i:02d}.cls", image.parent.name.encode()) for i, image in enumerate(images)]
        if broken:
            members.append(("broken.jpg", b"\xff\xd8 not a jpeg"))
        for name, data in sorted(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
            keys.add(f"{path.stem}/{name.rsplit('.', 1)[0]}")
    return keys


def test_tar_shards_and_incremental_rerun(model_dir: Path, sample_root: Path, tmp_path: Path) -> None:
    images = sorted((sample_root / "holdout").rglob("*.*"))
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = write_tar(shards / "night-001.tar", images[:3], broken=True)
    keys |= write_tar(shards / "night-002.tar", images[3:5])
    output = tmp_path / "predictions"
    first = bulk(shards, output, model_dir)
    assert first.ok and (first.shards_done, first.shards_skipped) == (2, 0) and first.errors == 1
    errors = pq.read_table(output / "_errors").to_pylist()
    assert [e["key"] for e in errors] == ["night-001/broken"]
    assert set(rows_by_key(output)) | {"night-001/broken"} == keys

    # A night later the bucket holds one more shard: only that one is predicted, nothing done is rewritten.
    job_files = ("_SUCCESS", "_cnnbatch.json")
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file() and p.name not in job_files}
    keys |= write_tar(shards / "night-003.tar", images[4:6])
    second = bulk(shards, output, model_dir)
    assert second.ok and (second.shards_done, second.shards_skipped, second.images) == (1, 2, 2)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (output / "_stats" / "night-003.json").exists()
    assert set(rows_by_key(output)) | {"night-001/broken"} == keys
    assert json.loads((output / "_SUCCESS").read_text())["totals"] == {"shards": 3, "rows": 7, "errors": 1}


# --- one image agrees with bulk ------------------------------------------------------------------------------------

def test_one_image_matches_bulk(folder_predictions: Path, sample_root: Path, model_dir: Path) -> None:
    rows = rows_by_key(folder_predictions)
    for key in sorted(rows)[::3]:
        result = run_predict(PredictConfig(model=str(model_dir), image=str(sample_root / "holdout" / key), top_k=2))
        assert result.failed == {}
        assert result.label == rows[key]["predicted_label"]
        assert result.probability == pytest.approx(rows[key]["probability"], abs=1e-5)
        assert result.labels == rows[key]["top_k_labels"]
        assert result.line().splitlines()[0] == f"{result.label} {result.probability:.6f}"


def test_cli_json_is_pure_json_and_exits_zero(folder_predictions: Path, sample_root: Path, model_dir: Path) -> None:
    key = sorted(rows_by_key(folder_predictions))[0]
    done = subprocess.run([sys.executable, "-m", "jobs.predict", "--image", str(sample_root / "holdout" / key),
                           "--model", str(model_dir), "--json"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout)
    row = rows_by_key(folder_predictions)[key]
    assert answer["label"] == row["predicted_label"]
    assert answer["probability"] == pytest.approx(row["probability"], abs=1e-5)
    assert answer["model_sha256"] == manifest_sha256(str(model_dir))


@pytest.fixture()
def image_server(sample_root: Path) -> Iterator[str]:
    handler = partial(SimpleHTTPRequestHandler, directory=str(sample_root / "holdout"))
    handler.log_message = lambda *args: None  # type: ignore[assignment]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_image_url_refused_by_default_and_served_when_allowed(image_server: str, folder_predictions: Path,
                                                              model_dir: Path, capsys) -> None:
    key = sorted(rows_by_key(folder_predictions))[1]
    url = f"{image_server}/{key}"
    assert main("predict", "--image-url", url, "--model", str(model_dir)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("cnnbatch predict: error: refused") and "loopback" in err and "--allow-private-urls" in err

    assert main("predict", "--image-url", url, "--model", str(model_dir), "--allow-private-urls",
                     "--top-k", "3") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    label, probability = lines[0].split()
    row = rows_by_key(folder_predictions)[key]
    assert label == row["predicted_label"] and float(probability) == pytest.approx(row["probability"], abs=1e-5)


def test_top_k_over_the_class_count_is_a_bad_argument(sample_root: Path, model_dir: Path, capsys) -> None:
    image = next((sample_root / "holdout").rglob("*.jpg"))
    assert main("predict", "--image", str(image), "--model", str(model_dir), "--top-k", "9") == 2
    assert "--top-k must be at most the model's 3 classes, got 9" in capsys.readouterr().err


# --- model folders that are refused --------------------------------------------------------------------------------

def rewrite_model(model_dir: Path, target: Path, head) -> Path:
    """Another model folder with ``head`` and ``model_dir``'s manifest (valid checksums: written by modelio)."""
    info, _ = load_model_folder(str(model_dir))
    figures = {name: (model_dir / name).read_bytes() for name in ("confusion_matrix.png", "training_curve.png")}
    write_model_folder(str(target), head, info,
                       json.loads((model_dir / "metrics.json").read_text()), figures)
    return target


def test_model_change_is_refused_on_the_same_output_unless_overwrite(model_dir: Path, sample_root: Path,
                                                                     tmp_path: Path) -> None:
    _, head = load_model_folder(str(model_dir))
    weights = head.get_weights()
    head.set_weights([w * 1.01 for w in weights])
    changed = rewrite_model(model_dir, tmp_path / "model-v2", head)
    output = tmp_path / "predictions"
    assert bulk(sample_root / "holdout", output, model_dir).ok
    with pytest.raises(OutputError, match="another configuration.*model_sha256"):
        bulk(sample_root / "holdout", output, changed)
    replaced = bulk(sample_root / "holdout", output, changed, overwrite=True)
    assert replaced.ok and replaced.shards_done == 1
    meta = read_metadata(pq.read_schema(next(output.glob("part-*.parquet"))))
    assert meta["model"]["sha256"] == manifest_sha256(str(changed)) != manifest_sha256(str(model_dir))


@pytest.mark.parametrize("kind", ["python-lambda", "keras-function"])
def test_lambda_layer_model_refused_and_its_code_never_runs(kind: str, model_dir: Path, sample_root: Path,
                                                            tmp_path: Path) -> None:
    import keras

    marker = tmp_path / "code-ran"
    info, _ = load_model_folder(str(model_dir))
    inputs = keras.Input((info.feature_dim,))
    if kind == "python-lambda":
        layer = keras.layers.Lambda(lambda x, path=str(marker): (open(path, "w").close(), x)[1], name="evil")
    else:  # safe_mode alone lets a Lambda naming a Keras function load
        layer = keras.layers.Lambda(keras.ops.relu, name="evil")
    outputs = keras.layers.Dense(len(info.labels), activation="softmax")(layer(inputs))
    bad = rewrite_model(model_dir, tmp_path / "lambda-model", keras.Model(inputs, outputs))
    marker.unlink(missing_ok=True)  # building the model above traced the function once

    image = next((sample_root / "holdout").rglob("*.jpg"))
    with pytest.raises(ModelError, match=r"Lambda layers \(evil\)"):
        run_predict(PredictConfig(model=str(bad), image=str(image)))
    with pytest.raises(ModelError, match="Lambda"):
        bulk(sample_root / "holdout", tmp_path / "out", bad)
    assert not marker.exists()
    assert not (tmp_path / "out" / "_cnnbatch.json").exists()  # refused before the output was touched


def test_checksum_mismatch_refused(model_dir: Path, sample_root: Path, tmp_path: Path, capsys) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(model_dir, tampered)
    (tampered / "labels.txt").write_text("dots\nchecks\nstripes\n")
    image = next((sample_root / "holdout").rglob("*.jpg"))
    # an unusable model, like unusable weights, exits 1
    assert main("predict", "--image", str(image), "--model", str(tampered)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("cnnbatch predict: error:") and "labels.txt of model" in err
    assert "does not match model.json" in err


def test_legacy_h5_model_refused(model_dir: Path, sample_root: Path, tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    _, head = load_model_folder(str(model_dir))
    head.save(legacy / "dc.model.h5")
    image = next((sample_root / "holdout").rglob("*.jpg"))
    with pytest.raises(ModelError, match=r"legacy HDF5 head \(dc.model.h5\)"):
        run_predict(PredictConfig(model=str(legacy), image=str(image)))
