"""Experiment (not in ``make bench``): on a CPU actor, should decoding wait while the model computes?

On 2 cores the decode threads and TensorFlow's compute threads share the cores. This A/B runs
``worker.process_shard`` as shipped ("alongside": decoding runs while the model computes) and with decoding and the
model taking turns ("turns": a decode waits while the model computes; the model starts once running decodes end),
interleaved, against the same model bare. Besides each run's images/s it reports the model's own images/s (full
batches only), which separates the two costs: contention slows the model, taking turns makes each batch wait for
its images. With ``--ray`` it all runs inside one Ray actor (a job's CPU actor), else in this process.

26 Nov 2026, this 2-core CPU, 400 JPEGs at 160 px (images/s). Inside a Ray actor, 3 rounds, medians: bare 27.8;
alongside 26.9 (model 27.0); turns 26.6 (model 27.6); a fourth round: bare 28.6, alongside 27.4, turns 27.7. In
this process, 6 rounds: turns ahead in 4 (medians 0.959 vs 0.944 of bare). A ``make bench`` with turns shipped gave
P1 0.901 (infer time unchanged, the model waiting 2.9 s for images). Taking turns frees the model (its own rate
goes to bare) and costs about as much in waiting: a wash within this machine's noise, so not kept.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
from typing import Any, Iterator

import numpy as np

from cnnbatch import worker
from cnnbatch.embed import Embedder, ModelSpec
from cnnbatch.extract import ExtractTask, feature_metadata
from cnnbatch.output import OutputDataset
from cnnbatch.shards import list_shards
from cnnbatch.weights import DEFAULT_RANDOM_SEED, WeightsRef

BATCH = 32


class Turns:
    """Decodes wait while the model computes; the model waits for running decodes to end (a strict alternation)."""

    def __init__(self) -> None:
        self.enabled = False
        self._changed = threading.Condition()
        self._decoding = 0
        self._computing = False

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with self._changed:
            self._changed.wait_for(lambda: not self._computing)
            self._decoding += 1
        try:
            yield
        finally:
            with self._changed:
                self._decoding -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with self._changed:
            self._computing = True  # first: no new decode starts while the running ones finish
            self._changed.wait_for(lambda: self._decoding == 0)
        try:
            yield
        finally:
            with self._changed:
                self._computing = False
                self._changed.notify_all()


class Experiment:
    """Model, shard and both ways of running them, in whichever process builds it."""

    def __init__(self, input_uri: str, image_size: int):
        spec = ModelSpec("vgg16", image_size, WeightsRef("random", seed=DEFAULT_RANDOM_SEED), "bfloat16")
        self.task = ExtractTask(spec, BATCH, feature_metadata(spec))
        self.model = Embedder(spec)
        self.shard = next(iter(list_shards(input_uri, shard_size=10**9)))
        self.pixels = np.random.default_rng(0).integers(0, 256, (BATCH, image_size, image_size, 3), dtype=np.uint8)
        self.output = OutputDataset(tempfile.mkdtemp(prefix="decode-gate-ab-"))
        self.turns = Turns()
        self.batch_seconds: list[float] = []
        plain_decode, turns = worker.decode_image, self.turns

        def decode(data: bytes, size: int) -> np.ndarray:
            with turns.decoding():
                return plain_decode(data, size)

        worker.decode_image = decode  # this process only: the experiment's own
        worker.process_shard(self.shard, self.task, self, self.output, "warm-up", 2, 2)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        with self.turns.computing():
            started = time.perf_counter()
            result = self.model(batch)
            if len(batch["image"]) == BATCH:
                self.batch_seconds.append(time.perf_counter() - started)
            return result

    def __getattr__(self, name: str) -> Any:  # the rest of the Embedder's interface (make_table reads it)
        if name == "model":  # not built yet
            raise AttributeError(name)
        return getattr(self.model, name)

    def bare(self) -> float:
        started, images = time.perf_counter(), 0
        while images < self.shard.num_files:
            self.model.embed(self.pixels)
            images += BATCH
        return images / (time.perf_counter() - started)

    def run(self, take_turns: bool) -> dict[str, float]:
        self.turns.enabled, self.batch_seconds = take_turns, []
        stats = worker.process_shard(self.shard, self.task, self, self.output, "ab", 2, 2)
        return {"rate": stats.rows / stats.seconds["total"],
                "model": BATCH * len(self.batch_seconds) / sum(self.batch_seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ray", action="store_true", help="run inside one Ray actor, as a job's CPU actor does")
    args = parser.parse_args()
    input_uri = os.path.abspath(args.input)
    if args.ray:
        import ray

        from cnnbatch.cluster import init_ray

        os.environ.setdefault("RAY_worker_niceness", "0")  # the same priority as this process
        init_ray()
        actor = ray.remote(num_cpus=1)(Experiment).remote(input_uri, args.image_size)

        def call(method: str, *call_args: Any) -> Any:
            return ray.get(getattr(actor, method).remote(*call_args))
    else:
        experiment = Experiment(input_uri, args.image_size)

        def call(method: str, *call_args: Any) -> Any:
            return getattr(experiment, method)(*call_args)

    figures: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        figures.setdefault("bare", []).append(call("bare"))
        for mode in (("alongside", "turns") if round_ % 2 == 0 else ("turns", "alongside")):
            for name, value in call("run", mode == "turns").items():
                figures.setdefault(f"{mode} {name}", []).append(value)
        print(json.dumps({name: round(values[-1], 2) for name, values in figures.items()}), flush=True)
    print(json.dumps({"median": {name: round(statistics.median(v), 2) for name, v in figures.items()}}))


if __name__ == "__main__":
    main()
