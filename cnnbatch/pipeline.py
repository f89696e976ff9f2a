"""The driver: shards -> a pool of Ray actors -> the output dataset, exactly once per shard.

Shared by every sharded job (extract, predict). The driver lists shards lazily, skips the ones already done for
this configuration, and keeps a bounded window of shards submitted to a ``ray.util.ActorPool``. Actors are
restartable and their calls retried by Ray itself, so a killed actor's shard is redone on its replacement; the
deterministic, atomic per-shard writes make the redo harmless.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from . import storage
from .output import OutputDataset, OutputLock, ShardStats
from .progress import Progress
from .shards import Shard, list_shards
from .worker import ShardTask, decode_threads_for, process_shard

log = logging.getLogger(__name__)

ACTOR_RESTARTS = 4  # a node or actor crash is redone by Ray this many times per actor
SHARD_ATTEMPTS = 3  # whole-shard failures (not crashes) are retried this many times before being reported
LOCK_HEARTBEAT_SECONDS = 60.0


def fingerprint_of(parts: dict[str, Any]) -> str:
    """A short stable hash of what makes two runs' outputs interchangeable."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class PoolOptions:
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0


@dataclass
class JobSummary:
    output: str
    shards_total: int = 0
    shards_skipped: int = 0
    shards_done: int = 0
    images: int = 0
    rows: int = 0
    errors: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # shard id -> reason
    stale_removed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(self.stage_seconds.items()))
        text = (f"{self.images} images ({self.rows} rows, {self.errors} errors) in {self.shards_done} shards "
                f"[{self.shards_skipped} already done] in {self.seconds:.1f}s, {self.images_per_second:.1f} images/s"
                f" -> {storage.redact(self.output)}")
        if stages:
            text += f"; per-stage worker time: {stages}"
        if self.failed:
            text += f"; FAILED shards: {', '.join(sorted(self.failed))}"
        return text


def init_ray() -> None:
    """Attach to ``RAY_ADDRESS`` (or the cluster of ``ray job submit``); else start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, configure_logging=False)


def _make_actor_class() -> Any:
    import ray

    class ShardWorker:
        """A Ray actor holding one model, processing whole shards."""

        def __init__(self, task: ShardTask, output_uri: str, fingerprint: str, cpus: float):
            from .cli import setup_logging

            setup_logging()
            self.task = task
            self.output = OutputDataset(output_uri)
            self.fingerprint = fingerprint
            self.decode_threads = decode_threads_for(cpus)
            self.model = task.make_model()

        def process(self, shard: Shard) -> ShardStats:
            try:
                return process_shard(shard, self.task, self.model, self.output, self.fingerprint,
                                     self.decode_threads)
            except Exception as exc:  # noqa: BLE001 - reported to the driver, which retries then records it
                log.exception("shard %s failed", shard.shard_id)
                return ShardStats(shard.shard_id, shard.signature, self.fingerprint,
                                  failed=storage.describe_error(exc))

        def pid(self) -> int:
            return os.getpid()

    return ray.remote(ShardWorker)


def actor_env(options: PoolOptions) -> dict[str, str]:
    """Environment for actors: storage settings (so actors on every node reach the same buckets; never logged),
    quiet TensorFlow start-up, and no GPU for actors that did not reserve one (TF would otherwise take them all).
    """
    env = storage.storage_env()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    if options.gpus_per_worker == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def start_pool(task: ShardTask, output_uri: str, fingerprint: str, options: PoolOptions) -> list[Any]:
    import ray

    worker_cls = _make_actor_class().options(
        num_cpus=options.cpus_per_worker,
        num_gpus=options.gpus_per_worker,
        max_restarts=ACTOR_RESTARTS,
        max_task_retries=ACTOR_RESTARTS,
        runtime_env={"env_vars": actor_env(options)},
    )
    actors = [worker_cls.remote(task, output_uri, fingerprint, options.cpus_per_worker)
              for _ in range(options.workers)]
    # Surface model-build failures (bad weights, no memory) before any shard is handed out.
    ray.get([actor.pid.remote() for actor in actors])
    return actors


def pending_shards(shards: Iterable[Shard], output: OutputDataset, fingerprint: str, summary: JobSummary,
                   done: dict[str, ShardStats], seen: dict[str, str]) -> Iterator[Shard]:
    """Shards that still need work; records every shard's kind in ``seen`` and the finished ones in ``done``."""
    for shard in shards:
        summary.shards_total += 1
        seen[shard.shard_id] = shard.kind
        stats = output.done_stats(shard.shard_id, shard.signature, fingerprint)
        if stats is not None:
            summary.shards_skipped += 1
            done[shard.shard_id] = stats
        else:
            yield shard


def run_sharded_job(*, input_uri: str, shard_size: int, output: OutputDataset, task: ShardTask,
                    fingerprint: str, config: dict[str, Any], pool: PoolOptions, overwrite: bool,
                    lock_wait_seconds: float = 0.0) -> JobSummary:
    """Run ``task`` over every pending shard of ``input_uri`` into ``output``; the shared body of every job."""
    started = time.perf_counter()
    summary = JobSummary(output=output.uri)
    lock = output.acquire_lock(lock_wait_seconds)
    try:
        output.prepare(fingerprint, config, overwrite)
        done: dict[str, ShardStats] = {}
        seen: dict[str, str] = {}
        todo = pending_shards(list_shards(input_uri, shard_size), output, fingerprint, summary, done, seen)
        first = next(todo, None)
        if first is not None:
            output.remove_success()  # stale until this run finishes
            _run_pool(itertools.chain([first], todo), task, output, fingerprint, pool, summary, done, lock)
        if "folder" in seen.values():
            # Folder shards are chunks of the sorted listing: if the folder shrank, the last chunks are gone and
            # their old outputs would duplicate keys that moved into earlier shards.
            summary.stale_removed = output.remove_stale_parts(set(seen))
            if summary.stale_removed:
                log.info("removed outputs of %d shards no longer in the input: %s",
                         len(summary.stale_removed), ", ".join(summary.stale_removed[:10]))
        summary.seconds = time.perf_counter() - started
        if summary.ok:
            previous = output.read_success()
            unchanged = (not summary.shards_done and not summary.stale_removed and previous is not None
                         and set(previous.get("shards", {})) == set(done))
            if not unchanged:  # a no-op rerun rewrites nothing
                output.write_success(fingerprint, config, done.values())
        return summary
    finally:
        lock.release()


def _run_pool(shards: Iterator[Shard], task: ShardTask, output: OutputDataset, fingerprint: str,
              pool: PoolOptions, summary: JobSummary, done: dict[str, ShardStats], lock: OutputLock) -> None:
    import ray
    from ray.util import ActorPool

    init_ray()
    actors = start_pool(task, output.uri, fingerprint, pool)
    actor_pool = ActorPool(actors)
    attempts: dict[str, int] = {}
    by_id: dict[str, Shard] = {}
    window = 2 * len(actors)  # keeps every actor busy while the listing stays lazy
    in_flight = 0
    last_beat = time.monotonic()
    progress = Progress(what="images")

    def submit(shard: Shard) -> None:
        nonlocal in_flight
        by_id[shard.shard_id] = shard
        attempts[shard.shard_id] = attempts.get(shard.shard_id, 0) + 1
        actor_pool.submit(lambda actor, s: actor.process.remote(s), shard)
        in_flight += 1

    def drain_one() -> None:
        nonlocal in_flight, last_beat
        in_flight -= 1
        stats: ShardStats = actor_pool.get_next_unordered()
        if stats.failed and attempts[stats.shard_id] < SHARD_ATTEMPTS:
            log.warning("shard %s failed (attempt %d/%d), retrying: %s", stats.shard_id,
                        attempts[stats.shard_id], SHARD_ATTEMPTS, stats.failed)
            submit(by_id[stats.shard_id])
        else:
            by_id.pop(stats.shard_id, None)
            _record(stats, summary, done, progress)
        if time.monotonic() - last_beat > LOCK_HEARTBEAT_SECONDS:
            lock.heartbeat()
            last_beat = time.monotonic()

    try:
        for shard in shards:
            submit(shard)
            while in_flight >= window:
                drain_one()
        while in_flight:
            drain_one()
    finally:
        progress.close()
        for actor in actors:
            ray.kill(actor)


def _record(stats: ShardStats, summary: JobSummary, done: dict[str, ShardStats], progress: Progress) -> None:
    if stats.failed:
        log.error("shard %s failed after %d attempts: %s", stats.shard_id, SHARD_ATTEMPTS, stats.failed)
        summary.failed[stats.shard_id] = stats.failed
        return
    done[stats.shard_id] = stats
    summary.shards_done += 1
    summary.images += stats.images
    summary.rows += stats.rows
    summary.errors += stats.errors
    for stage, seconds in stats.seconds.items():
        summary.stage_seconds[stage] = summary.stage_seconds.get(stage, 0.0) + seconds
    progress.update(shards=1, images=stats.images, errors=stats.errors)
