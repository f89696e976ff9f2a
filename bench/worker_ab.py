"""The worker without Ray: ``worker.process_shard`` with one batch or two in flight, and the same model bare.

All in this process, same model, same shard, interleaved: the A/B of batches in flight, and how close the worker
alone comes to the bare model (what is left of P1's gap is Ray's). Prints one JSON line with the best of each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from cnnbatch.embed import Embedder, ModelSpec
from cnnbatch.extract import ExtractTask, feature_metadata
from cnnbatch.output import OutputDataset
from cnnbatch.shards import list_shards
from cnnbatch.weights import DEFAULT_RANDOM_SEED, WeightsRef
from cnnbatch.worker import decode_threads_for, process_shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    spec = ModelSpec("vgg16", args.image_size, WeightsRef("random", seed=DEFAULT_RANDOM_SEED), args.precision)
    task = ExtractTask(spec, args.batch_size, feature_metadata(spec))
    model = Embedder(spec)
    shard = next(iter(list_shards(args.input, shard_size=10**9)))
    threads = decode_threads_for(None)
    pixels = np.random.default_rng(0).integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3),
                                               dtype=np.uint8)

    def bare_rate() -> float:
        started, images = time.perf_counter(), 0
        while images < shard.num_files // 2:
            model.embed(pixels)
            images += args.batch_size
        return images / (time.perf_counter() - started)

    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as out:
        output = OutputDataset(out)
        process_shard(shard, task, model, output, "warm-up", threads, 1)  # tracing and oneDNN set-up
        for _ in range(args.repeats):
            best["bare"] = max(best.get("bare", 0.0), bare_rate())
            for depth in (1, 2):
                stats = process_shard(shard, task, model, output, "ab", threads, depth)
                best[str(depth)] = max(best.get(str(depth), 0.0), stats.rows / stats.seconds["total"])
    print(json.dumps({"images": shard.num_files, "decode_threads": threads, "images_per_second": best,
                      "ratio": best["2"] / best["1"], "worker_over_bare": max(best["1"], best["2"]) / best["bare"]}))


if __name__ == "__main__":
    main()
