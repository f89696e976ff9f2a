"""Learning figures for docs/benchmarks.md, on a real labelled image set that a package ships: scikit-learn's
handwritten digits (1,797 8x8 greyscale scans of 10 digits, UCI), written as 32 px PNGs in class folders, 30% of
each class held out for testing. One process, one private Ray cluster, seeded random VGG16 (no download).

- A1: held-out accuracy of the default head on plain features vs on plain features plus K augmented views.
- A2: the cost of making the views on the decode threads, per view, against the model's time per view.
- F1: held-out accuracy of the head alone vs after fine-tuning the top block with it.
- F2: fine-tuning's training images/s against a bare Keras ``fit`` of the same model with the same trainable
  layers on ready tensors (same batch, precision, machine): side by side in one process, alternating epochs
  (``fit_ab``), and, as a cross-check, the job's fastest epoch against the best of those bare epochs.

Prints one JSON line (bench.monitor reads it).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from cnnbatch.augment import Recipe, make_views
from cnnbatch.sample import photo_like

# Digits: no mirror images (a flipped 2 is not a 2), small rotations and shifts.
DIGITS_RECIPE = Recipe(rotation_range=10, width_shift_range=0.1, height_shift_range=0.1, shear_range=10,
                       zoom_range=0.1, horizontal_flip=False)


def write_digits(root: Path, size: int, test_share: float = 0.3, seed: int = 0) -> tuple[Path, Path]:
    """``root/train/digit-<d>/*.png`` and ``root/test/...`` from scikit-learn's digits, upscaled to ``size``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for label in range(10):
        rows = np.flatnonzero(digits.target == label)
        rows = rows[rng.permutation(len(rows))]
        held = int(round(len(rows) * test_share))
        for position, row in enumerate(rows):
            split = "test" if position < held else "train"
            folder = root / split / f"digit-{label}"
            folder.mkdir(exist_ok=True)
            path = folder / f"{row:04d}.png"
            if not path.exists():
                grey = (digits.images[row] * (255 / 16)).astype(np.uint8)
                Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR).convert("RGB").save(path)
    return root / "train", root / "test"


def accuracy(model: Path, test: Path, out: Path) -> float:
    from cnnbatch.predict import PredictConfig, run_predict

    summary = run_predict(PredictConfig(model=str(model), input=str(test), output=str(out), batch_size=64,
                                        overwrite=True))
    return summary.counts["correct"] / summary.counts["labelled"]


def views_cost(size: int, views: int = 10, images: int = 40) -> dict[str, float]:
    """Seconds per view of making views (the classic recipe) on one decode thread, at the model's size."""
    import threading

    from cnnbatch.augment import CLASSIC

    pictures = [photo_like(size, size, seed=i) for i in range(images)]
    out: dict[str, float] = {}

    def work() -> None:
        make_views(pictures[0], CLASSIC, views, 0, "warm")
        started = time.perf_counter()
        for index, picture in enumerate(pictures):
            make_views(picture, CLASSIC, views, 0, f"k{index}")
        out["seconds_per_view"] = (time.perf_counter() - started) / (images * views)

    thread = threading.Thread(target=work)  # as on the worker's decode threads (not the main thread)
    thread.start()
    thread.join()
    return out


def fit_model(size: int, trainable_from: str | None = None) -> Any:
    """VGG16 (block5 on, the fine-tuning default) + the default head, compiled as finetune compiles it."""
    from cnnbatch.backbones import get_backbone
    from cnnbatch.finetunefit import fine_tune_model, set_trainable
    from cnnbatch.head import HeadSpec, build_head
    from cnnbatch.tfruntime import keras_module

    keras = keras_module()
    keras.utils.set_random_seed(0)
    spec = get_backbone("vgg16")
    backbone = spec.build(size, weights=None)
    set_trainable(backbone, spec, trainable_from)
    head = build_head(HeadSpec(), 512, 10, np.zeros(512), np.ones(512), seed=0)
    model = fine_tune_model(backbone, head, size)
    model.compile(optimizer=keras.optimizers.SGD(1e-7, momentum=0.9), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def fit_ab(train: Path, size: int, rounds: int = 3, batch: int = 32) -> dict[str, Any]:
    """F2 side by side in one process, alternating epochs through the same compiled model: fine-tuning's own input
    (imagestream.ImageStream as the job builds it: the listing, the decoded images kept between epochs, a fresh
    view of every image each epoch, preprocessing) against ready float32 tensors of as many images."""
    import os

    from cnnbatch.backbones import get_backbone
    from cnnbatch.imagestream import DecodedImages, ImageStream, split_images

    model = fit_model(size)
    labels = sorted(path.name for path in train.iterdir() if path.is_dir())
    split = split_images(str(train), 1000, labels, seed=0, validation_split=0.1)
    stream = ImageStream(str(train), 1000, split, size, threads=max(2, os.cpu_count() or 2),
                         cache=DecodedImages(2**30))
    preprocess = get_backbone("vgg16").preprocess_fn()
    images = split.train_rows
    rng = np.random.default_rng(0)
    x = rng.uniform(-120, 120, (images, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, images).astype("int32")
    epochs = iter(range(1_000))

    def timed(ready: bool) -> float:
        data = None if ready else stream.dataset(False, batch, DIGITS_RECIPE, 0, True, preprocess,
                                                 first_epoch=next(epochs))
        started = time.perf_counter()
        if ready:
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
        else:
            model.fit(data, epochs=1, verbose=0)
        return images / (time.perf_counter() - started)

    timed(False), timed(True)  # tracing; the first stream epoch reads and decodes (and fills the cache)
    stream_rates: list[float] = []
    ready_rates: list[float] = []
    for index in range(rounds):  # ABBA: a drift in the machine's speed falls on both
        for ready in ((False, True) if index % 2 == 0 else (True, False)):
            (ready_rates if ready else stream_rates).append(timed(ready))
    ratios = sorted(a / b for a, b in zip(stream_rates, ready_rates))
    return {"images": images, "rounds": rounds, "stream_images_per_second": [round(r, 1) for r in stream_rates],
            "ready_images_per_second": [round(r, 1) for r in ready_rates],
            "ratio": ratios[len(ratios) // 2], "cached_images": len(stream.cache)}


def run(work: Path, size: int, views: int, epochs: int, finetune_epochs: int) -> dict[str, Any]:
    from cnnbatch.extract import ExtractConfig, run_extract
    from cnnbatch.finetune import FinetuneConfig, run_finetune
    from cnnbatch.train import TrainConfig, run_train

    train, test = write_digits(work / "digits", size)
    recipe = {name: getattr(DIGITS_RECIPE, name) for name in ("rotation_range", "width_shift_range",
                                                              "height_shift_range", "shear_range", "zoom_range",
                                                              "horizontal_flip")}
    features = work / "digits-features"
    run_extract(ExtractConfig(input=str(train), output=str(features), weights="random", image_size=size,
                              batch_size=64, precision="float32", augment_views=views, overwrite=True, **recipe))
    result: dict[str, Any] = {"dataset": "scikit-learn load_digits (1,797 8x8 scans, 10 classes), 30% held out",
                              "image_size": size, "views": views, "recipe": DIGITS_RECIPE.to_dict()}
    models = {}
    for name, use in (("plain", "none"), ("views", "all")):
        models[name] = work / f"digits-head-{name}"
        trained = run_train(TrainConfig(features=(str(features),), output=str(models[name]), epochs=epochs,
                                        views=use, overwrite=True))
        result[f"head_{name}"] = {"validation_accuracy": trained.validation_accuracy,
                                  "test_accuracy": accuracy(models[name], test, work / f"digits-pred-{name}"),
                                  "train_vectors": trained.rows_train + trained.rows_from_views}
    tuned_model = work / "digits-finetuned"
    tuned = run_finetune(FinetuneConfig(input=str(train), model=str(models["plain"]), output=str(tuned_model),
                                        epochs=finetune_epochs, learning_rate=1e-6, batch_size=32, overwrite=True,
                                        patience=finetune_epochs, **recipe))
    metrics = json.loads((tuned_model / "metrics.json").read_text())
    rows = tuned.rows_train
    result["finetune"] = {"start_validation_accuracy": tuned.start_accuracy,
                          "validation_accuracy": tuned.validation_accuracy, "best_epoch": tuned.best_epoch,
                          "epochs_run": tuned.epochs_run,
                          "test_accuracy": accuracy(tuned_model, test, work / "digits-pred-finetuned"),
                          "train_images_per_second": metrics["fit"]["train_images_per_second"],
                          "epoch_images_per_second": [round(rows / t, 1) for t in metrics["fit"]["epoch_train_seconds"]],
                          "decoded_images_cached": metrics["fit"]["decoded_images_cached"]}
    result["fit_ab"] = fit_ab(train, size)
    result["fit_ratio"] = result["fit_ab"]["ratio"]
    result["bare_fit_images_per_second"] = max(result["fit_ab"]["ready_images_per_second"])
    # a cross-check across processes and minutes (noisier on a shared machine): the job's best epoch / that
    result["job_fit_ratio"] = result["finetune"]["train_images_per_second"] / result["bare_fit_images_per_second"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--views-size", type=int, default=160, help="the model size A2 times views at")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = run(Path(args.work), args.image_size, args.views, args.epochs, args.finetune_epochs)
    result["views_cost"] = views_cost(args.views_size) | {"image_size": args.views_size}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
