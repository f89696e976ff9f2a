"""Augmented views end to end on a real local Ray cluster: extract --augment-views writes augmented_embeddings
(deterministic across runs and across a killed and resumed actor, the plain embedding untouched), train learns
from the views and reports on plain vectors, predict --tta averages over seeded views."""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from cnnbatch.augment import CLASSIC, VIEWS_VERSION
from cnnbatch.extract import ExtractConfig, prepare_extract, run_extract
from cnnbatch.output import OutputError
from cnnbatch.parquetio import read_metadata
from cnnbatch.pipeline import run_sharded_job
from cnnbatch.predict import PredictConfig, run_predict
from cnnbatch.train import TrainConfig, run_train

from ..conftest import TEST_IMAGE_SIZE
from .conftest import held, wait_until_held

VIEWS = 3


def extract_config(root: Path, output: Path, **extra) -> ExtractConfig:
    return ExtractConfig(input=str(root), output=str(output), weights="random", image_size=TEST_IMAGE_SIZE,
                         batch_size=8, shard_size=9, workers=1, gpus_per_worker=0, precision="float32", **extra)


def table_of(output: Path) -> pa.Table:
    return ds.dataset(str(output)).to_table().sort_by("key")


@pytest.fixture(scope="module")
def extracted(ray_cluster, sample_root: Path, tmp_path_factory) -> dict[str, Path]:
    root, work = sample_root / "train", tmp_path_factory.mktemp("augment")
    outputs = {"plain": work / "plain", "views": work / "views", "again": work / "again"}
    run_extract(extract_config(root, outputs["plain"]))
    for name in ("views", "again"):
        assert run_extract(extract_config(root, outputs[name], augment_views=VIEWS)).ok
    return outputs


def test_the_views_column_sits_beside_an_untouched_embedding(extracted: dict[str, Path]) -> None:
    plain, views = table_of(extracted["plain"]), table_of(extracted["views"])
    assert plain.column_names == ["key", "label", "embedding"]
    assert views.column_names == ["key", "label", "embedding", "augmented_embeddings"]
    assert views.schema.field("augmented_embeddings").type == pa.list_(pa.list_(pa.float32(), 512), VIEWS)
    assert views.column("key").to_pylist() == plain.column("key").to_pylist()
    # The plain images go through the model in the same batches as without views: the same vectors, bit for bit.
    assert views.column("embedding").equals(plain.column("embedding"))
    augmented = np.asarray(views.column("augmented_embeddings").to_pylist(), np.float32)
    embedding = np.asarray(views.column("embedding").to_pylist(), np.float32)
    assert augmented.shape == (views.num_rows, VIEWS, 512) and np.isfinite(augmented).all()
    assert not np.allclose(augmented[:, 0], embedding)  # a view is not the plain image
    assert len({augmented[0, v].tobytes() for v in range(VIEWS)}) == VIEWS


def test_views_are_the_same_in_two_runs_and_recorded_in_the_metadata(extracted: dict[str, Path]) -> None:
    first, second = table_of(extracted["views"]), table_of(extracted["again"])
    assert first.column("augmented_embeddings").equals(second.column("augmented_embeddings"))
    part = sorted(extracted["views"].glob("part-*.parquet"))[0]
    metadata = read_metadata(pq.read_schema(part))
    assert metadata["augment"] == {"views": VIEWS, "recipe": CLASSIC.to_dict(), "seed": 1337,
                                   "version": VIEWS_VERSION}
    assert "augment" not in read_metadata(pq.read_schema(sorted(extracted["plain"].glob("part-*.parquet"))[0]))


def test_duckdb_reads_the_nested_column(extracted: dict[str, Path]) -> None:
    import duckdb

    rows = duckdb.sql(f"SELECT key, len(augmented_embeddings) AS k, len(augmented_embeddings[1]) AS d "
                      f"FROM read_parquet('{extracted['views']}/*.parquet') ORDER BY key").fetchall()
    assert len(rows) == 18 and {(k, d) for _, k, d in rows} == {(VIEWS, 512)}


def test_another_recipe_or_view_count_is_another_configuration(extracted: dict[str, Path], sample_root: Path) -> None:
    root = sample_root / "train"
    with pytest.raises(OutputError, match="another configuration"):
        run_extract(extract_config(root, extracted["views"], augment_views=VIEWS, rotation_range=10.0))
    with pytest.raises(OutputError, match="another configuration"):
        run_extract(extract_config(root, extracted["views"]))  # no views: another configuration too
    again = run_extract(extract_config(root, extracted["views"], augment_views=VIEWS))
    assert again.ok and again.shards_done == 0 and again.shards_skipped == 2  # the same one resumes


def test_a_killed_actor_redoes_its_shard_with_the_same_views(ray_cluster, extracted: dict[str, Path],
                                                              sample_root: Path, tmp_path: Path) -> None:
    """The actor is held on the first image of shard 1 (on its decode threads, where views are made) and killed
    there; Ray restarts it and the shard is redone. The views come out as in an uninterrupted run."""
    root, output, gate = sample_root / "train", tmp_path / "out", tmp_path / "gate"
    gate.mkdir()
    job = prepare_extract(extract_config(root, output, augment_views=VIEWS))
    keys = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_sharded_job, held(job, gate, keys[9]))
        os.kill(wait_until_held(gate, running), signal.SIGKILL)
        summary = running.result(timeout=300)
    assert summary.ok and summary.shards_done == 2 and summary.images == 18
    resumed, reference = table_of(output), table_of(extracted["views"])
    assert resumed.column("key").to_pylist() == reference.column("key").to_pylist()
    assert resumed.column("augmented_embeddings").equals(reference.column("augmented_embeddings"))
    assert resumed.column("embedding").equals(reference.column("embedding"))


@pytest.fixture(scope="module")
def models(extracted: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("augment-models")
    models = {"views": work / "views", "none": work / "none"}
    for name, views in (("views", "all"), ("none", "none")):
        summary = run_train(TrainConfig(features=(str(extracted["views"]),), output=str(models[name]),
                                        epochs=5, validation_split=0.2, views=views))
        assert summary.failed == {}
    return models


def test_train_uses_every_view_of_the_training_rows_and_plain_validation(models: dict[str, Path]) -> None:
    with_views = json.loads((models["views"] / "metrics.json").read_text())
    without = json.loads((models["none"] / "metrics.json").read_text())
    rows = with_views["rows"]
    assert rows["train_from_views"] == VIEWS * rows["train"] and without["rows"]["train_from_views"] == 0
    # the split is by key: the same images are held out, and every reported metric counts plain vectors only
    assert rows["validation"] == without["rows"]["validation"] == with_views["validation"]["rows"]
    assert with_views["train"]["rows"] == rows["train"]
    manifest = json.loads((models["views"] / "model.json").read_text())
    assert manifest["format"] == "cnnbatch-model/2"
    assert manifest["augment"] == {"views": VIEWS, "recipe": CLASSIC.to_dict(), "seed": 1337,
                                   "version": VIEWS_VERSION}
    assert json.loads((models["none"] / "model.json").read_text())["augment"] is None


def test_predict_with_test_time_augmentation(models: dict[str, Path], sample_root: Path, tmp_path: Path) -> None:
    holdout = sample_root / "holdout"
    plain = run_predict(PredictConfig(model=str(models["views"]), input=str(holdout), output=str(tmp_path / "p0"),
                                      batch_size=8, workers=1))
    tta = run_predict(PredictConfig(model=str(models["views"]), input=str(holdout), output=str(tmp_path / "p2"),
                                    batch_size=8, workers=1, tta=2))
    assert plain.ok and tta.ok and tta.images == plain.images == 6
    p0, p2 = table_of(tmp_path / "p0"), table_of(tmp_path / "p2")
    assert p0.column("key").equals(p2.column("key"))
    assert not np.allclose(p0.column("probability").to_numpy(), p2.column("probability").to_numpy())
    metadata = read_metadata(pq.read_schema(sorted((tmp_path / "p2").glob("part-*.parquet"))[0]))
    assert metadata["tta"] == {"views": 2, "recipe": CLASSIC.to_dict(), "seed": 1337,
                                   "version": VIEWS_VERSION}  # the model's recipe
    assert "tta" not in read_metadata(pq.read_schema(sorted((tmp_path / "p0").glob("part-*.parquet"))[0]))
    again = run_predict(PredictConfig(model=str(models["views"]), input=str(holdout), output=str(tmp_path / "p2"),
                                      batch_size=8, workers=1, tta=2))
    assert again.ok and again.shards_done == 0  # the same views: resumed, not redone
    with pytest.raises(OutputError, match="another configuration"):
        run_predict(PredictConfig(model=str(models["views"]), input=str(holdout), output=str(tmp_path / "p2"),
                                  batch_size=8, workers=1, tta=2, shear_range=5.0))
    assert "accuracy" in tta.line() and tta.counts["labelled"] == 6


def test_one_image_prediction_with_tta(models: dict[str, Path], sample_root: Path) -> None:
    image = sorted((sample_root / "holdout").rglob("*.jpg"))[0]
    base = dict(model=str(models["views"]), image=str(image), top_k=3)
    plain, tta = run_predict(PredictConfig(**base)), run_predict(PredictConfig(**base, tta=4))
    same = run_predict(PredictConfig(**base, tta=4))
    assert tta.probabilities == same.probabilities  # seeded views
    assert plain.probabilities != tta.probabilities and abs(sum(tta.probabilities) - 1) < 1e-4
    unflipped = run_predict(PredictConfig(**base, tta=4, rotation_range=0.0, width_shift_range=0.0,
                                          height_shift_range=0.0, shear_range=0.0, zoom_range=0.0,
                                          horizontal_flip=False))
    assert unflipped.probabilities == pytest.approx(plain.probabilities, abs=1e-5)  # views equal to the image
