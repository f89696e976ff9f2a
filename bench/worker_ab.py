"""The worker without Ray: ``worker.process_shard`` with one batch or two in flight, and the same model bare.

All in this process, same model, same shard, interleaved: the A/B of batches in flight; how close the worker alone
comes to its model bare (what is left of P1's gap is Ray's); the same worker with decoding taken out (pixels
decoded ahead of the run and looked up), which is what decoding costs; and the Embedder (uint8 in, preprocessing
in the compiled call) against the backbone on preprocessed float32 tensors (what bench/bare.py, P1's denominator,
runs). Prints one JSON line with the best of each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable

import numpy as np

from cnnbatch.decode import decode_image
from cnnbatch.embed import Embedder, ModelSpec
from cnnbatch.extract import ExtractTask, feature_metadata
from cnnbatch.output import OutputDataset
from cnnbatch.shards import Shard, iter_records, list_shards
from cnnbatch.shardstats import ShardStats
from cnnbatch.weights import DEFAULT_RANDOM_SEED, WeightsRef
from cnnbatch.worker import decode_threads_for, process_shard


def predecoded(shard: Shard, size: int) -> Callable[[bytes, int], np.ndarray]:
    """A ``decode`` for process_shard that looks each image's pixels up instead of decoding them."""
    pixels = {}
    for record in iter_records(shard):
        data = record.load()
        pixels[data] = decode_image(data, size)
    return lambda data, _size: pixels[data]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import tensorflow as tf

    spec = ModelSpec("vgg16", args.image_size, WeightsRef("random", seed=DEFAULT_RANDOM_SEED), args.precision)
    task = ExtractTask(spec, args.batch_size, feature_metadata(spec))
    model = Embedder(spec)
    shard = next(iter(list_shards(args.input, shard_size=10**9)))
    threads = decode_threads_for(None)
    lookup = predecoded(shard, args.image_size)
    pixels = np.random.default_rng(0).integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3),
                                               dtype=np.uint8)
    ready = tf.constant(model.backbone.preprocess_fn()(pixels.astype(np.float32)))
    backbone = tf.function(lambda x: model.model(x, training=False))

    def bare_rate(step: Callable[[], object]) -> float:
        step()
        started, images = time.perf_counter(), 0
        while images < shard.num_files // 2:
            step()
            images += args.batch_size
        return images / (time.perf_counter() - started)

    runs: dict[str, Callable[[OutputDataset], float]] = {
        "backbone": lambda _: bare_rate(lambda: backbone(ready).numpy()),
        "bare": lambda _: bare_rate(lambda: model.embed(pixels)),
        "1": lambda output: _rate(process_shard(shard, task, model, output, "ab", threads, 1)),
        "2": lambda output: _rate(process_shard(shard, task, model, output, "ab", threads, 2)),
        "predecoded": lambda output: _rate(process_shard(shard, task, model, output, "ab", threads, 2,
                                                         decode=lookup)),
    }
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as out:
        output = OutputDataset(out)
        process_shard(shard, task, model, output, "warm-up", threads, 1)  # tracing and oneDNN set-up
        for _ in range(args.repeats):
            for name, run in runs.items():
                best[name] = max(best.get(name, 0.0), run(output))
    print(json.dumps({"images": shard.num_files, "decode_threads": threads, "images_per_second": best,
                      "ratio": best["2"] / best["1"], "worker_over_bare": max(best["1"], best["2"]) / best["bare"],
                      "predecoded_over_bare": best["predecoded"] / best["bare"],
                      "bare_over_backbone": best["bare"] / best["backbone"]}))


def _rate(stats: ShardStats) -> float:
    return stats.rows / stats.seconds["total"]


if __name__ == "__main__":
    main()
