"""The bare compiled backbone: images/s of the model alone on ready tensors (the denominator of P1).

Same backbone, size, batch, precision and weights as the pipeline; the input is already preprocessed float32 in
memory, so nothing but the compiled model runs. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def bare_images_per_second(backbone: str, size: int, batch: int, precision: str, seconds: float,
                           jit_compile: bool = False) -> dict[str, float]:
    import tensorflow as tf

    from cnnbatch.embed import ModelSpec, build_model
    from cnnbatch.tfruntime import quiet_idle_threads

    if not tf.config.list_physical_devices("GPU"):
        quiet_idle_threads()  # the runtime settings an actor's Embedder uses
    from cnnbatch.weights import DEFAULT_RANDOM_SEED, WeightsRef

    spec = ModelSpec(backbone, size, WeightsRef("random", seed=DEFAULT_RANDOM_SEED), precision)
    model = build_model(spec)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3)).astype(np.float32)
    inputs = tf.constant(spec.backbone_spec.preprocess_fn()(pixels))

    @tf.function(jit_compile=jit_compile)
    def forward(x: tf.Tensor) -> tf.Tensor:
        return model(x, training=False)

    for _ in range(2):  # tracing and oneDNN's first-call set-up stay out of the figure
        forward(inputs).numpy()
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        forward(inputs).numpy()
        images += batch
    elapsed = time.perf_counter() - started
    return {"images": images, "seconds": elapsed, "images_per_second": images / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--xla", action="store_true")
    args = parser.parse_args()
    print(json.dumps(bare_images_per_second(args.backbone, args.image_size, args.batch_size, args.precision,
                                            args.seconds, args.xla)))


if __name__ == "__main__":
    main()
