"""The fast path's A/B: cnnbatch's worker with one batch or two in flight, same model, same shard, interleaved.

Runs ``worker.process_shard`` in this process (no Ray: the actor around it is the same either way). Prints one
JSON line with the best images/s of each setting.
"""

from __future__ import annotations

import argparse
import json
import tempfile

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
    best: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as out:
        output = OutputDataset(out)
        process_shard(shard, task, model, output, "warm-up", threads, 1)  # tracing and oneDNN set-up
        for _ in range(args.repeats):
            for depth in (1, 2):
                stats = process_shard(shard, task, model, output, "ab", threads, depth)
                best[depth] = max(best.get(depth, 0.0), stats.rows / stats.seconds["total"])
    print(json.dumps({"images": shard.num_files, "decode_threads": threads,
                      "images_per_second": {str(k): v for k, v in best.items()}, "ratio": best[2] / best[1]}))


if __name__ == "__main__":
    main()
