"""The plain Keras script cnnbatch is measured against: ``image_dataset_from_directory`` + ``model.predict``.

What a user writes without cnnbatch (the Keras documentation's recipe), with the same backbone, weights, size and
batch. Run as a program so that it gets a fresh process, as a user's script would; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1337, help="seed of the random weights (as cnnbatch's)")
    args = parser.parse_args()
    started = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    size = (args.image_size, args.image_size)
    keras.utils.set_random_seed(args.seed)
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(*size, 3), pooling="avg")
    dataset = keras.utils.image_dataset_from_directory(
        args.input, image_size=size, batch_size=args.batch_size, shuffle=False, interpolation="bilinear",
        verbose=False)
    dataset = dataset.map(lambda x, y: keras.applications.vgg16.preprocess_input(x)).prefetch(tf.data.AUTOTUNE)
    batch_ends: list[float] = []  # measuring only: the script itself is the recipe above
    timer = keras.callbacks.LambdaCallback(on_predict_batch_end=lambda batch, logs: batch_ends.append(
        time.perf_counter()))
    features = model.predict(dataset, verbose=0, callbacks=[timer])
    images = int(features.shape[0])
    # Steady state as cnnbatch counts it: the images after the first batch over the time since that batch ended.
    after_first = images - min(args.batch_size, images)
    span = batch_ends[-1] - batch_ends[0] if len(batch_ends) > 1 else 0.0
    print(json.dumps({"images": images, "seconds": time.perf_counter() - started,
                      "steady_images_per_second": after_first / span if span > 0 else None}))


if __name__ == "__main__":
    main()
