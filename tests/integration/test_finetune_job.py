"""finetune end to end: from a model folder written by train, on the sample images (seeded random backbones, tiny
images): two replicas on a CPU split in two (the MirroredStrategy path GPUs take), BatchNorm statistics that do not
move, a worker killed mid-fit that resumes from its checkpoint, the model folder predict and extract use, labels
that do not match refused, and ``ray job submit -- python -m jobs.finetune`` against a head with token auth."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from cnnbatch import modelinfo, modelio
from cnnbatch.extract import ExtractConfig, run_extract
from cnnbatch.finetune import FinetuneConfig, run_finetune
from cnnbatch.parquetio import read_metadata
from cnnbatch.predict import PredictConfig, run_predict
from cnnbatch.train import TrainConfig, run_train
from cnnbatch.weights import sha256_file

from ..conftest import TEST_IMAGE_SIZE
from .test_train_job import BIN, REPO, ray_head  # noqa: F401 - the token-auth head fixture


def train_start_model(root: Path, work: Path, backbone: str, size: int) -> Path:
    features, model = work / f"{backbone}-features", work / f"{backbone}-model"
    assert run_extract(ExtractConfig(input=str(root), output=str(features), backbone=backbone, weights="random",
                                     image_size=size, batch_size=9, shard_size=9, workers=1, gpus_per_worker=0,
                                     precision="float32")).ok
    assert run_train(TrainConfig(features=(str(features),), output=str(model), epochs=5,
                                 validation_split=0.2)).failed == {}
    return model


@pytest.fixture(scope="module")
def start_model(ray_cluster, sample_root: Path, tmp_path_factory) -> Path:
    return train_start_model(sample_root / "train", tmp_path_factory.mktemp("ft-start"), "vgg16", TEST_IMAGE_SIZE)


def finetune_args(sample_root: Path, model: Path, output: Path, *extra: str) -> list[str]:
    return ["finetune", "--input", str(sample_root / "train"), "--model", str(model), "--output", str(output),
            "--learning-rate", "1e-5", "--batch-size", "8", *extra]


@pytest.fixture(scope="module")
def two_replicas(start_model: Path, sample_root: Path, tmp_path_factory) -> Path:
    """The CLI's main() in this process, on the module's cluster: two data-parallel replicas on the CPU (the fit
    runs in a worker process of its own, where the CPU is split in two before TensorFlow starts)."""
    import contextlib
    import io

    from cnnbatch.cli import main

    output = tmp_path_factory.mktemp("ft-two") / "model"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(finetune_args(sample_root, start_model, output, "--cpu-replicas", "2", "--epochs", "2"))
    assert code == 0, stderr.getvalue()[-4000:]
    assert "cnnbatch finetune: 3 classes, 15 training / 3 validation images" in stdout.getvalue()
    assert "starting model" in stdout.getvalue() and "on 2 replica(s)" in stdout.getvalue()
    return output


def test_two_replicas_keep_a_finite_loss_and_equal_weights(two_replicas: Path, start_model: Path) -> None:
    metrics = json.loads((two_replicas / "metrics.json").read_text())
    assert metrics["fit"]["replicas"] == 2 and metrics["fit"]["replica_max_difference"] == 0.0
    assert len(metrics["history"]["loss"]) == 2
    assert all(np.isfinite(metrics["history"][name]).all() for name in ("loss", "val_loss"))
    start = json.loads((start_model / "metrics.json").read_text())
    # the same images are held out as for the head: train's rule, seed and share, by key
    assert metrics["rows"]["validation"] == start["rows"]["validation"] == metrics["validation"]["rows"]
    assert "accuracy" in metrics["starting_model"]["validation"] and "validation_accuracy" in metrics["gain"]


def test_the_model_folder_holds_the_fine_tuned_backbone(two_replicas: Path, start_model: Path) -> None:
    assert {p.name for p in two_replicas.iterdir()} == set(modelio.MODEL_FILES)  # no checkpoints left behind
    manifest = json.loads((two_replicas / "model.json").read_text())
    assert manifest["format"] == "cnnbatch-model/2"
    assert manifest["files"][modelio.BACKBONE_FILE] == sha256_file(two_replicas / modelio.BACKBONE_FILE)
    assert manifest["weights"]["kind"] == "file" and manifest["weights"]["uri"] == modelio.BACKBONE_FILE
    assert manifest["fine_tuned"]["trainable_from"] == "block5_conv1"
    assert manifest["fine_tuned"]["start_weights"]["kind"] == "random"
    info, head = modelio.load_model_folder(str(two_replicas))
    assert info.labels == ("checks", "dots", "stripes") and head.output_shape == (None, 3)


def test_predict_and_extract_use_the_fine_tuned_backbone(ray_cluster, two_replicas: Path, sample_root: Path,
                                                         tmp_path: Path) -> None:
    predicted = run_predict(PredictConfig(model=str(two_replicas), input=str(sample_root / "holdout"),
                                          output=str(tmp_path / "predictions"), batch_size=8, workers=1))
    assert predicted.ok and predicted.counts["labelled"] == 6 and "accuracy" in predicted.line()
    weights = two_replicas / modelio.BACKBONE_FILE
    features = tmp_path / "features"
    assert run_extract(ExtractConfig(input=str(sample_root / "holdout"), output=str(features), weights=str(weights),
                                     image_size=TEST_IMAGE_SIZE, batch_size=8, workers=1, gpus_per_worker=0,
                                     precision="float32")).ok
    metadata = read_metadata(pq.read_schema(sorted(features.glob("part-*.parquet"))[0]))
    assert metadata["weights"]["kind"] == "file" and metadata["weights"]["sha256"] == sha256_file(weights)
    one = run_predict(PredictConfig(model=str(two_replicas), image=str(sorted(sample_root.rglob("*.jpg"))[0])))
    assert one.label in ("checks", "dots", "stripes")


def test_batchnorm_statistics_do_not_move() -> None:
    """InceptionV3 (BatchNorm after every convolution) assembled and trained as finetune does it, from mixed9 on:
    every BatchNorm layer's weights and moving statistics stay the starting ones, frozen layers too, while the
    trained convolutions move."""
    from cnnbatch.backbones import get_backbone
    from cnnbatch.finetunefit import fine_tune_model, set_trainable
    from cnnbatch.head import HeadSpec, build_head
    from cnnbatch.tfruntime import keras_module

    keras = keras_module()
    keras.utils.set_random_seed(3)
    spec = get_backbone("inceptionv3")
    backbone = spec.build(75, weights=None)
    head = build_head(HeadSpec("mlp", 16, 0.0, 0.0), 2048, 3, np.zeros(2048), np.ones(2048), seed=1)
    first, _ = set_trainable(backbone, spec, None)
    model = fine_tune_model(backbone, head, 75)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), loss="sparse_categorical_crossentropy")
    before = [np.array(w) for w in backbone.weights]
    rng = np.random.default_rng(0)
    model.fit(rng.uniform(-1, 1, (12, 75, 75, 3)).astype("float32"), rng.integers(0, 3, 12), epochs=2,
              batch_size=4, verbose=0)
    start = [layer.name for layer in backbone.layers].index(first)
    assert start == 249
    moved, index_of = 0, {id(w): i for i, layer in enumerate(backbone.layers) for w in layer.weights}
    for old, weight in zip(before, backbone.weights, strict=True):
        layer = backbone.layers[index_of[id(weight)]]
        same = np.array_equal(old, np.array(weight))
        if isinstance(layer, keras.layers.BatchNormalization) or index_of[id(weight)] < start:
            assert same, f"{weight.path} changed"
        else:
            moved += not same
    assert moved > 0, "no trained layer moved"


def test_a_killed_worker_resumes_from_its_last_epoch(ray_cluster, start_model: Path, sample_root: Path,
                                                     tmp_path: Path) -> None:
    output = tmp_path / "model"
    config = FinetuneConfig(input=str(sample_root / "train"), model=str(start_model), output=str(output), epochs=3,
                            learning_rate=1e-5, batch_size=8, patience=10)
    state = output / modelinfo.CHECKPOINT_DIR / "state.json"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_finetune, config)
        deadline = time.monotonic() + 300
        while not (state.exists() and json.loads(state.read_text())["epoch"] >= 1) and not running.done():
            assert time.monotonic() < deadline, "no epoch was checkpointed"
            time.sleep(0.05)
        assert not running.done(), running.result()
        os.kill(json.loads(state.read_text())["pid"], signal.SIGKILL)  # the fit's worker process
        summary = running.result(timeout=600)
    metrics = json.loads((output / "metrics.json").read_text())
    assert 1 <= metrics["fit"]["resumed_from_epoch"] <= 2, metrics["fit"]
    assert summary.epochs_run == 3 and len(metrics["history"]["loss"]) == 3
    assert not (output / modelinfo.CHECKPOINT_DIR).exists() and (output / "model.json").exists()


def finetune_in_process(capsys, *args: str) -> tuple[int, str]:
    """``cnnbatch finetune ARGS`` in this process, on the module's cluster: (exit status, stderr)."""
    from cnnbatch.cli import main

    capsys.readouterr()
    code = main(["finetune", *args])
    return code, capsys.readouterr().err


def test_labels_that_do_not_match_the_model_are_refused(ray_cluster, start_model: Path, sample_root: Path,
                                                        tmp_path: Path, capsys) -> None:
    two_classes = tmp_path / "two"
    for label in ("checks", "dots"):
        shutil.copytree(sample_root / "train" / label, two_classes / label)
    args = ["--input", str(two_classes), "--model", str(start_model), "--output", str(tmp_path / "out"),
            "--epochs", "1"]
    code, err = finetune_in_process(capsys, *args)
    assert code == 1 and "Traceback" not in err
    assert "labels do not cover the model's 3 classes" in err.strip().splitlines()[-1]
    shutil.copytree(sample_root / "train" / "stripes", two_classes / "zigzags")
    shutil.copytree(sample_root / "train" / "stripes", two_classes / "stripes")
    code, err = finetune_in_process(capsys, *args)
    assert code == 1 and "labels the model does not know: zigzags" in err
    assert not (tmp_path / "out" / "model.json").exists()


def test_more_gpus_than_a_node_has_is_refused(ray_cluster, start_model: Path, sample_root: Path, tmp_path: Path,
                                              capsys) -> None:
    code, err = finetune_in_process(capsys, "--input", str(sample_root / "train"), "--model", str(start_model),
                                    "--output", str(tmp_path / "out"), "--gpus", "2")
    assert code == 2 and "more than any one node of the cluster has" in err
    assert "keras-team/keras#20585" in err and "Traceback" not in err


def test_submitted_finetune_job_writes_a_model(ray_head, start_model: Path, sample_root: Path,  # noqa: F811
                                               tmp_path: Path) -> None:
    import subprocess

    output = tmp_path / "model"
    command = [str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard, "--working-dir", str(REPO), "--",
               "python", "-m", "jobs.finetune", "--input", str(sample_root / "train"), "--model", str(start_model),
               "--output", str(output), "--epochs", "1", "--learning-rate", "1e-5", "--batch-size", "8"]
    result = subprocess.run(command, env=ray_head.env, capture_output=True, text=True, timeout=600, cwd=REPO)
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-4000:]
    assert "succeeded" in logs and "cnnbatch finetune: 3 classes" in logs
    assert (output / modelio.BACKBONE_FILE).exists() and (output / "model.json").exists()
    with h5py.File(output / modelio.BACKBONE_FILE) as weights:
        assert len(weights.keys()) > 0
