"""What Ray's presence costs the model on this machine: the bare backbone alone, and next to an idle private cluster.

A job's private local cluster (GCS, raylet, agents, and the actor's own core-worker threads) keeps working while the
actor computes; on a 2-core machine that is charged to P1, whose bare model runs without any of it. This measures
the machine's busy cores while the cluster holds one idle actor, and the bare model (bench/bare.py, a fresh process
each time) alone and with the idle cluster beside it, interleaved. Not part of ``make bench`` (~3 minutes for 2
rounds): run it when P1's gap needs splitting. Prints one line per round and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

from bench.monitor import measured_env, python_argv, run_measured


def busy_cores(seconds: float) -> float:
    """Cores the whole machine kept busy over ``seconds`` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1)


def bare(image_size: str, seconds: str) -> float:
    result = run_measured(python_argv("bench.bare", "--image-size", image_size, "--precision", "bfloat16",
                                      "--seconds", seconds)).result
    return float(result["images_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", default="160")
    parser.add_argument("--seconds", default="20", help="each bare run's measured window")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.update(measured_env())  # the priority and settings of the bench's other runs
    import ray

    from cnnbatch.cluster import init_ray

    rates: dict[str, list[float]] = {"alone": [], "beside_idle_ray": []}
    idle: list[float] = []
    for _ in range(args.rounds):
        rates["alone"].append(bare(args.image_size, args.seconds))
        init_ray()  # the same private cluster a job starts
        actor = ray.remote(num_cpus=1)(_Idle).remote()
        ray.get(actor.pid.remote())
        time.sleep(5)  # past the cluster's start-up
        idle.append(busy_cores(15))
        rates["beside_idle_ray"].append(bare(args.image_size, args.seconds))
        ray.shutdown()
        print(json.dumps({"idle_cluster_cores": round(idle[-1], 3)} | {k: round(v[-1], 2) for k, v in rates.items()}),
              flush=True)
    medians: dict[str, Any] = {k: round(statistics.median(v), 2) for k, v in rates.items()}
    medians["idle_cluster_cores"] = round(statistics.median(idle), 3)
    medians["ratio"] = round(medians["beside_idle_ray"] / medians["alone"], 4)
    print(json.dumps({"median": medians}))


class _Idle:
    def pid(self) -> int:
        return os.getpid()


if __name__ == "__main__":
    main()
