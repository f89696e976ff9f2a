"""The extract job without Ray: its flags, the feature table's layout, what the metadata records and what makes
two runs interchangeable (the fingerprint), and the job it prepares for the driver. (Extraction on a real cluster:
tests/integration/test_extract.py.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from cnnbatch.embed import ModelSpec
from cnnbatch.extract import (
    AUGMENTED_COLUMN,
    ExtractConfig,
    embeddings_table,
    extraction_fingerprint,
    feature_metadata,
    feature_schema,
    prepare_extract,
)
from cnnbatch.parquetio import read_metadata
from cnnbatch.weights import WeightsRef, sha256_file

from .conftest import TEST_IMAGE_SIZE


@pytest.fixture(scope="module")
def file_weights(vgg16_weights_file: Path) -> WeightsRef:
    return WeightsRef("file", uri=str(vgg16_weights_file), sha256=sha256_file(vgg16_weights_file))


def test_precision_is_in_metadata_and_fingerprint(file_weights: WeightsRef) -> None:
    """Moved here from the precision tests."""
    specs = {p: ModelSpec("vgg16", TEST_IMAGE_SIZE, file_weights, p) for p in ("float32", "bfloat16", "float16")}
    assert len({extraction_fingerprint(spec) for spec in specs.values()}) == 3
    assert feature_metadata(specs["bfloat16"])["precision"] == "bfloat16"


@pytest.mark.parametrize("overrides, message", [
    ({"backbone": "resnet9000"}, "unknown backbone 'resnet9000'"),
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"shard_size": 0}, "--shard-size must be at least 1, got 0"),
    ({"workers": 0}, "--workers must be at least 1, got 0"),
    ({"gpus_per_worker": -1.0}, "--gpus-per-worker must be 0 or more, got -1.0"),
    ({"image_size": 16}, "--image-size for vgg16 must be at least 32 px, got 16"),
    ({"backbone": "inceptionv3", "image_size": 64}, "--image-size for inceptionv3 must be at least 75 px, got 64"),
    ({"augment_views": -1}, "--augment-views must be 0 or more, got -1"),
])
def test_config_refuses_bad_values_naming_expected_and_got(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExtractConfig(**{"input": "in", "output": "out", **overrides})


def test_the_feature_table_layout() -> None:
    schema = feature_schema(4, {"backbone": "vgg16"})
    assert schema.names == ["key", "label", "embedding"]
    assert schema.field("embedding").type == pa.list_(pa.float32(), 4)
    vectors = np.arange(8, dtype=np.float64).reshape(2, 4)  # cast to float32 on the way in
    table = embeddings_table(["a", "b"], ["cat", None], vectors, schema)
    assert table.column("label").to_pylist() == ["cat", None]
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                                  vectors.astype(np.float32))
    assert read_metadata(table.schema) == {"backbone": "vgg16"}


def test_augmented_views_are_a_nested_column_of_the_declared_shape() -> None:
    schema = feature_schema(4, {}, views=2)
    assert schema.field(AUGMENTED_COLUMN).type == pa.list_(pa.list_(pa.float32(), 4), 2)
    views = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)
    table = embeddings_table(["a", "b", "c"], [None] * 3, np.zeros((3, 4), np.float32), schema, views)
    assert table.column(AUGMENTED_COLUMN).to_pylist()[1] == views[1].tolist()
    with pytest.raises(ValueError, match=r"expected augmented vectors of shape \(N, 2, 4\), got \(3, 3, 4\)"):
        embeddings_table(["a", "b", "c"], [None] * 3, np.zeros((3, 4), np.float32), schema,
                         np.zeros((3, 3, 4), np.float32))
    with pytest.raises(ValueError, match="got None"):
        embeddings_table(["a"], [None], np.zeros((1, 4), np.float32), schema)


def test_the_fingerprint_follows_what_changes_the_vectors_only(file_weights: WeightsRef, tmp_path: Path) -> None:
    base = ModelSpec("vgg16", 32, file_weights, "float32")
    copy = WeightsRef("file", uri=str(tmp_path / "elsewhere.weights.h5"), sha256=file_weights.sha256)
    assert extraction_fingerprint(ModelSpec("vgg16", 32, copy, "float32")) == extraction_fingerprint(base)
    others = [ModelSpec("vgg16", 64, file_weights, "float32"), ModelSpec("vgg16", 32, WeightsRef("random", seed=1)),
              ModelSpec("inceptionv3", 75, WeightsRef("random", seed=1))]
    assert len({extraction_fingerprint(spec) for spec in [base, *others]}) == 4


def test_metadata_records_the_recipe_of_the_vectors_without_credentials() -> None:
    weights = WeightsRef("file", uri="s3://AKIAFAKE:hunter2@bucket/w.weights.h5", sha256="a" * 64)
    meta = feature_metadata(ModelSpec("vgg16", 48, weights, "bfloat16"))
    assert (meta["kind"], meta["backbone"], meta["dim"], meta["image_size"]) == ("features", "vgg16", 512, 48)
    assert meta["weights"]["uri"] == "s3://***@bucket/w.weights.h5" and meta["weights"]["sha256"] == "a" * 64
    assert meta["preprocessing"].startswith("keras.applications.vgg16.preprocess_input")
    assert meta["decode"] and "cnnbatch" in meta["versions"] and "augment" not in meta


def test_prepare_describes_the_job_without_starting_ray(tmp_path: Path) -> None:
    images = tmp_path / "in" / "cats"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(b"x")
    config = ExtractConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), weights="random",
                           image_size=32, shard_size=7, workers=3, gpus_per_worker=0, precision="float32", seed=4)
    job = prepare_extract(config)  # explicit GPUs and precision: nothing to ask a cluster
    assert (job.input_uri, job.output_uri, job.shard_size) == (config.input, config.output, 7)
    assert (job.pool.workers, job.pool.gpus_per_worker) == (3, 0)
    assert job.task.model == ModelSpec("vgg16", 32, WeightsRef("random", seed=4), "float32")
    assert job.fingerprint == extraction_fingerprint(job.task.model)
    assert job.config["weights_identity"] == "random:seed=4" and "augment_views" not in job.config
    assert job.task.views == 1 and job.task.image_size == 32
    pixels = np.zeros((32, 32, 3), np.uint8)
    assert job.task.variants("cats/a.jpg", pixels).shape == (1, 32, 32, 3)
    model = SimpleNamespace(feature_dim=512, weights_sha256="b" * 64)  # what make_table reads from the embedder
    table = job.task.make_table(model, ["cats/a.jpg"], ["cats"], {"embedding": np.ones((1, 1, 512), np.float32)})
    assert table.num_rows == 1 and read_metadata(table.schema)["weights"]["sha256"] == "b" * 64


def test_prepare_refuses_a_missing_input_before_anything_else(tmp_path: Path) -> None:
    from cnnbatch.storage import StorageError

    with pytest.raises(StorageError, match="does not exist"):
        prepare_extract(ExtractConfig(input=str(tmp_path / "nope"), output=str(tmp_path / "out"), weights="random",
                                      gpus_per_worker=0, precision="float32"))
