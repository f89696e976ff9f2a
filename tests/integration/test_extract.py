"""Extraction end to end on a real local Ray cluster: folder and tar inputs, the plain Keras recipe, exactly once."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from cnnbatch.extract import ExtractConfig, run_extract
from cnnbatch.parquetio import read_metadata
from cnnbatch.weights import sha256_file

from ..conftest import TEST_IMAGE_SIZE


def real_photo() -> Path:
    """A real photograph that ships with matplotlib (Grace Hopper, 512x600 JPEG): exercises the draft path."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


@pytest.fixture(scope="module")
def folder_input(tmp_path_factory, sample_root: Path) -> Path:
    root = tmp_path_factory.mktemp("folder-input")
    shutil.copytree(sample_root / "train", root, dirs_exist_ok=True)
    shutil.copy(real_photo(), root / "dots" / "grace_hopper.jpg")
    (root / "stripes" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "unlabelled.png").write_bytes((sample_root / "train" / "checks" / "checks-0004.png").read_bytes())
    return root


@pytest.fixture(scope="module")
def folder_run(ray_cluster, folder_input: Path, vgg16_weights_file: Path, tmp_path_factory):
    output = tmp_path_factory.mktemp("features") / "out"
    config = ExtractConfig(input=str(folder_input), output=str(output), backbone="vgg16",
                           weights=str(vgg16_weights_file), image_size=TEST_IMAGE_SIZE, batch_size=8,
                           shard_size=7, workers=2, gpus_per_worker=0, precision="float32")
    return config, run_extract(config)


def input_keys(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_every_image_exactly_once_in_features_or_errors(folder_run, folder_input: Path) -> None:
    config, summary = folder_run
    assert summary.ok and summary.failed == {}
    features = ds.dataset(config.output).to_table()
    errors = pq.read_table(Path(config.output) / "_errors").to_pylist()
    keys = features.column("key").to_pylist() + [e["key"] for e in errors]
    assert len(keys) == len(set(keys))
    assert set(keys) == input_keys(folder_input)
    assert [e["key"] for e in errors] == ["stripes/broken.jpg"]
    assert errors[0]["error"].startswith("cannot decode image")
    assert summary.images == len(keys) and summary.errors == 1
    labels = dict(zip(features.column("key").to_pylist(), features.column("label").to_pylist()))
    assert labels["dots/grace_hopper.jpg"] == "dots" and labels["unlabelled.png"] is None


def test_features_match_the_plain_keras_recipe(folder_run, folder_input: Path, vgg16_weights_file: Path) -> None:
    """keras.utils.load_img(bilinear) -> preprocess_input -> model, on the same files and weights file."""
    import keras

    config, _ = folder_run
    table = ds.dataset(config.output).to_table()
    ours = dict(zip(table.column("key").to_pylist(),
                    np.stack(table.column("embedding").to_numpy(zero_copy_only=False))))
    model = keras.applications.VGG16(include_top=False, weights=str(vgg16_weights_file),
                                     input_shape=(TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3), pooling="avg")
    keys = sorted(ours)
    pixels = np.stack([keras.utils.img_to_array(keras.utils.load_img(
        folder_input / key, target_size=(TEST_IMAGE_SIZE, TEST_IMAGE_SIZE), interpolation="bilinear"))
        for key in keys])
    recipe = np.asarray(model(keras.applications.vgg16.preprocess_input(pixels), training=False))
    for key, expected in zip(keys, recipe):
        got = ours[key]
        cosine = float(got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)))
        assert cosine >= 0.9995, f"{key}: cosine {cosine:.6f}"


def test_schema_metadata_records_how_vectors_were_made(folder_run, vgg16_weights_file: Path) -> None:
    config, _ = folder_run
    parts = sorted(Path(config.output).glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    schema = pq.read_schema(parts[0])
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[512]"
    meta = read_metadata(schema)
    assert meta["backbone"] == "vgg16" and meta["dim"] == 512 and meta["image_size"] == TEST_IMAGE_SIZE
    assert meta["weights"]["kind"] == "file" and meta["weights"]["sha256"] == sha256_file(vgg16_weights_file)
    assert "preprocess_input" in meta["preprocessing"] and meta["precision"] == "float32"
    assert {"tensorflow", "keras", "pyarrow", "pillow", "cnnbatch"} <= set(meta["versions"])


def test_duckdb_reads_the_features_alone(folder_run) -> None:
    duckdb = pytest.importorskip("duckdb")
    config, summary = folder_run
    rows = duckdb.sql(f"SELECT count(*), count(DISTINCT key), min(len(embedding)) "
                      f"FROM read_parquet('{config.output}/*.parquet')").fetchall()
    assert rows == [(summary.rows, summary.rows, 512)]


def test_success_manifest_and_stats_per_shard(folder_run) -> None:
    import json

    config, summary = folder_run
    manifest = json.loads((Path(config.output) / "_SUCCESS").read_text())
    assert manifest["totals"] == {"shards": 3, "rows": summary.rows, "errors": 1}
    stats = json.loads((Path(config.output) / "_stats" / "000000.json").read_text())
    assert {"read", "decode", "infer", "write", "total"} <= set(stats["seconds"])
    assert stats["rows"] + stats["errors"] == 7


def test_rerun_skips_done_shards_and_rewrites_nothing(folder_run) -> None:
    config, _ = folder_run
    before = {p: p.stat().st_mtime_ns for p in Path(config.output).rglob("*") if p.is_file()}
    again = run_extract(config)
    assert again.ok and again.shards_done == 0 and again.shards_skipped == 3
    after = {p: p.stat().st_mtime_ns for p in Path(config.output).rglob("*") if p.is_file()}
    assert after == before


def write_webdataset(path: Path, sample_root: Path) -> dict[str, str | None]:
    """A WebDataset tar: <key>.jpg/.png with a .cls label for most samples; returns key -> label."""
    expected: dict[str, str | None] = {}
    with tarfile.open(path, "w") as archive:
        for index, image in enumerate(sorted((sample_root / "holdout").rglob("*.*"))):
            key = f"sample{index:03d}"
            label = image.parent.name if index % 3 else None
            members = {f"{key}{image.suffix}": image.read_bytes()}
            if label:
                members[f"{key}.cls"] = label.encode()
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            expected[f"{path.stem}/{key}"] = label
    return expected


def test_tar_shard_extraction(ray_cluster, sample_root: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "tars"
    inputs.mkdir()
    expected = write_webdataset(inputs / "holdout-0000.tar", sample_root)
    config = ExtractConfig(input=str(inputs), output=str(tmp_path / "out"), weights="random",
                           image_size=TEST_IMAGE_SIZE, batch_size=4, workers=1, gpus_per_worker=0,
                           precision="float32")
    summary = run_extract(config)
    assert summary.ok and summary.errors == 0
    table = pq.read_table(tmp_path / "out" / "part-holdout-0000.parquet")
    assert dict(zip(table.column("key").to_pylist(), table.column("label").to_pylist())) == expected
    assert read_metadata(table.schema)["weights"]["kind"] == "random"
