"""Does Ray cost throughput? The bare model, the worker alone (no Ray) and the Ray job, interleaved, on one folder.

Not part of ``make bench`` (about 4 minutes for 3 rounds of ~550 images here): run it when P1's gap needs splitting
into "the worker" and "Ray". Prints one line per round and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from bench.monitor import python_argv, run_measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="a folder of JPEGs (one shard: keep it under 1000 images)")
    parser.add_argument("--image-size", default="160")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"bare": [], "worker": [], "job": []}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.rounds):
            bare = run_measured(python_argv("bench.bare", "--image-size", args.image_size, "--precision", "bfloat16",
                                            "--seconds", "10")).result
            worker = run_measured(python_argv("bench.worker_ab", "--input", args.input, "--image-size",
                                              args.image_size, "--repeats", "1")).result
            job = run_measured(python_argv("bench.job", "--input", args.input, "--output", out, "--image-size",
                                           args.image_size, "--precision", "bfloat16")).result
            rates["bare"].append(bare["images_per_second"])
            rates["worker"].append(max(worker["images_per_second"]["1"], worker["images_per_second"]["2"]))
            rates["job"].append(job["steady_images_per_second"])
            print(json.dumps({k: round(v[-1], 2) for k, v in rates.items()}), flush=True)
    print(json.dumps({"median": {k: round(statistics.median(v), 2) for k, v in rates.items()}}))


if __name__ == "__main__":
    main()
