"""Experiment (not in ``make bench``): on a CPU actor, should decoding wait while the model computes?

On 2 cores the decode threads and TensorFlow's compute threads contend; a decode thread taking a core stalls
TensorFlow's other thread at each parallel op. This A/B runs ``worker.process_shard`` with decoding alongside the
model ("overlap", what GPU actors do) and with the two taking turns ("turns", ``take_turns=True``: what CPU actors
do), interleaved, each against the bare model measured around it. Prints each round's ratios and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np

from cnnbatch import worker
from cnnbatch.embed import Embedder, ModelSpec
from cnnbatch.extract import ExtractTask, feature_metadata
from cnnbatch.output import OutputDataset
from cnnbatch.shards import list_shards
from cnnbatch.weights import DEFAULT_RANDOM_SEED, WeightsRef


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    spec = ModelSpec("vgg16", args.image_size, WeightsRef("random", seed=DEFAULT_RANDOM_SEED), "bfloat16")
    task = ExtractTask(spec, 32, feature_metadata(spec))
    model = Embedder(spec)
    shard = next(iter(list_shards(args.input, shard_size=10**9)))
    pixels = np.random.default_rng(0).integers(0, 256, (32, args.image_size, args.image_size, 3), dtype=np.uint8)

    def bare() -> float:
        started, images = time.perf_counter(), 0
        while images < shard.num_files:
            model.embed(pixels)
            images += 32
        return images / (time.perf_counter() - started)

    ratios: dict[str, list[float]] = {"overlap": [], "turns": []}
    with tempfile.TemporaryDirectory() as out:
        output = OutputDataset(out)
        worker.process_shard(shard, task, model, output, "warm-up", 2, 2)
        for round_ in range(args.rounds):
            before, rates = bare(), {}
            for mode in (("overlap", "turns") if round_ % 2 == 0 else ("turns", "overlap")):
                stats = worker.process_shard(shard, task, model, output, "ab", 2, 2, take_turns=mode == "turns")
                rates[mode] = stats.rows / stats.seconds["total"]
            reference = (before + bare()) / 2
            for mode, rate in rates.items():
                ratios[mode].append(rate / reference)
            print(json.dumps({mode: round(rate / reference, 3) for mode, rate in rates.items()}), flush=True)
    print(json.dumps({"median": {mode: round(statistics.median(v), 3) for mode, v in ratios.items()}}))


if __name__ == "__main__":
    main()
