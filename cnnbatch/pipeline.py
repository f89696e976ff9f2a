"""The driver: shards -> a pool of Ray actors -> the output dataset, exactly once per shard.

Shared by every sharded job (extract, predict). The driver lists shards lazily, skips the ones already done for
this configuration, and hands one shard to each free actor of a ``ray.util.ActorPool``, so the listing stays lazy.
An actor gone for good is replaced and its shard handed out again; whole-shard failures are retried, then
recorded. The deterministic, atomic per-shard writes make every redo harmless: a shard's part file is replaced
whole, never appended to.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import storage
from .cluster import fill_cluster, init_ray, node_resources
from .lock import OutputLock
from .output import OutputDataset, OutputError
from .pool import PoolOptions, WorkerPool
from .progress import Progress
from .shards import Shard, list_shards
from .shardstats import ShardStats, steady_images_per_second
from .worker import ShardTask

log = logging.getLogger(__name__)

SHARD_ATTEMPTS = 3  # whole-shard failures (not crashes) are retried this many times before being reported
REST = "(rest)"  # the failure entry for shards never handed out because the run stopped early


def fingerprint_of(parts: dict[str, Any]) -> str:
    """A short stable hash of what makes two runs' outputs interchangeable."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


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
    done_here: list[ShardStats] = field(default_factory=list, repr=False)  # the shards this run did
    counts: dict[str, int] = field(default_factory=dict)  # the task's counts over every done shard

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def steady_images_per_second(self) -> float | None:
        """images/s once the workers are warm (see ``output.steady_images_per_second``)."""
        return steady_images_per_second(self.done_here)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(self.stage_seconds.items()))
        text = (f"{self.images} images ({self.rows} rows, {self.errors} errors) in {self.shards_done} shards "
                f"[{self.shards_skipped} already done] in {self.seconds:.1f}s, {self.images_per_second:.1f} images/s"
                f" -> {storage.redact(self.output)}")
        steady = self.steady_images_per_second
        if steady is not None:
            text += f"; {steady:.1f} images/s after start-up"
        if stages:
            text += f"; per-stage worker time: {stages}"
        labelled = self.counts.get("labelled", 0)
        if labelled:
            text += (f"; accuracy {self.counts.get('correct', 0) / labelled:.4f} on the {labelled} images whose "
                     "label is one of the model's classes")
        if self.failed:
            text += f"; FAILED shards: {', '.join(sorted(self.failed))}"
        return text


def pending_shards(shards: Iterable[Shard], output: OutputDataset, fingerprint: str, summary: JobSummary,
                   done: dict[str, ShardStats], seen: dict[str, str]) -> Iterator[Shard]:
    """Shards that still need work; records every shard's kind in ``seen`` and the finished ones in ``done``.
    The time spent listing (and checking what is done) is the job's ``list`` stage."""
    listing = iter(shards)
    while True:
        started = time.perf_counter()
        shard = next(listing, None)
        stats = None if shard is None else output.done_stats(shard.shard_id, shard.signature, fingerprint)
        summary.stage_seconds["list"] = summary.stage_seconds.get("list", 0.0) + time.perf_counter() - started
        if shard is None:
            return
        summary.shards_total += 1
        seen[shard.shard_id] = shard.kind
        if stats is not None:
            summary.shards_skipped += 1
            done[shard.shard_id] = stats
        else:
            yield shard


@dataclass(frozen=True)
class ShardedJob:
    """Everything a sharded job's driver needs, as the job prepared it (extract.prepare_extract, predict...)."""

    input_uri: str
    shard_size: int
    output_uri: str
    task: ShardTask
    fingerprint: str  # what makes two runs' outputs interchangeable (the resume key)
    config: dict[str, Any]  # recorded in _cnnbatch.json and _SUCCESS (redacted)
    pool: PoolOptions
    overwrite: bool = False


def run_sharded_job(job: ShardedJob, lock_wait_seconds: float = 0.0) -> JobSummary:
    """Run the job's task over every pending shard of its input into its output; the shared body of every job."""
    input_uri, shard_size, task, fingerprint = job.input_uri, job.shard_size, job.task, job.fingerprint
    config, pool, overwrite = job.config, job.pool, job.overwrite
    output = OutputDataset(job.output_uri)
    started = time.perf_counter()
    summary = JobSummary(output=output.uri)
    lock = output.acquire_lock(lock_wait_seconds)
    stamped = False
    try:
        # The input's first shard before anything is written: an empty input leaves no configuration stamp.
        listing = list_shards(input_uri, shard_size)
        first_shard = next(listing, None)
        stamped = output.prepare(fingerprint, config, overwrite)
        done: dict[str, ShardStats] = {}
        seen: dict[str, str] = {}
        shards = itertools.chain([first_shard], listing) if first_shard is not None else iter(())
        todo = pending_shards(shards, output, fingerprint, summary, done, seen)
        first = next(todo, None)
        if first is not None:
            output.remove_success()  # stale until this run finishes
            _run_pool(itertools.chain([first], todo), task, output, fingerprint, pool, summary, done, lock)
        if lock.lost:
            raise OutputError(f"output {storage.redact(output.uri)} was taken over by another run while this one "
                              f"wrote it; {summary.shards_done} shards were done here. Let the other run finish, "
                              "then rerun to check")
        if "folder" in seen.values() and REST not in summary.failed:
            # Folder shards are chunks of the sorted listing: if the folder shrank, the last chunks are gone and
            # their old outputs would duplicate keys that moved into earlier shards.
            summary.stale_removed = output.remove_stale_parts(set(seen))
            if summary.stale_removed:
                log.info("removed outputs of %d shards no longer in the input: %s",
                         len(summary.stale_removed), ", ".join(summary.stale_removed[:10]))
        for stats in done.values():
            for name, value in stats.counts.items():
                summary.counts[name] = summary.counts.get(name, 0) + int(value)
        summary.seconds = time.perf_counter() - started
        _finish(output, fingerprint, config, summary, done)
        return summary
    except BaseException:
        if stamped and not output.list_parts():  # this run made the output and wrote no shard: leave no stamp
            output.remove_config()
        raise
    finally:
        lock.release()


def _finish(output: OutputDataset, fingerprint: str, config: dict[str, Any], summary: JobSummary,
            done: dict[str, ShardStats]) -> None:
    """Write ``_SUCCESS`` last when every shard is done (not again on a run that changed nothing), else
    ``_FAILED`` with the failed shards and their reasons."""
    if not summary.ok:
        output.write_failures(fingerprint, summary.failed)
        return
    previous = output.read_success()
    unchanged = (not summary.shards_done and not summary.stale_removed and previous is not None
                 and previous.get("fingerprint") == fingerprint and set(previous.get("shards", {})) == set(done))
    if not unchanged:
        output.write_success(fingerprint, config, done.values())
    output.remove_failures()


def _run_pool(shards: Iterator[Shard], task: ShardTask, output: OutputDataset, fingerprint: str,
              options: PoolOptions, summary: JobSummary, done: dict[str, ShardStats], lock: OutputLock) -> None:
    """Hand shards to a ``ray.util.ActorPool``, one per free actor, until the listing and the retries run dry."""
    from ray.exceptions import ActorDiedError, RayActorError
    from ray.util import ActorPool

    init_ray()
    pool = WorkerPool(task, output.uri, fingerprint, options)
    progress = Progress(what="images")
    running: dict[str, Shard] = {}  # actor id -> its shard (an ActorPool gives each actor one call at a time)
    attempts: collections.Counter[str] = collections.Counter()
    retry: collections.deque[Shard] = collections.deque()
    listing = iter(shards)
    deaths_in_a_row = 0  # actors lost for good since the last finished shard
    max_deaths = 2 * len(pool.actors) + 2

    def run_on(actor: Any, shard: Shard) -> Any:
        running[actor._actor_id.hex()] = shard
        attempts[shard.shard_id] += 1
        return actor.process.remote(shard)

    def feed(actor_pool: ActorPool) -> None:
        # Only free actors get work, so the pool never buffers the listing: it stays lazy however long it is.
        while actor_pool.has_free() and not lock.lost and deaths_in_a_row <= max_deaths:
            shard = retry.popleft() if retry else next(listing, None)
            if shard is None:
                return
            actor_pool.submit(run_on, shard)

    try:
        pool.wait_ready()
        actor_pool = ActorPool(pool.actors)
        feed(actor_pool)
        while actor_pool.has_next():
            try:
                stats: ShardStats = actor_pool.get_next_unordered()
                actor_id = next(a for a, s in running.items() if s.shard_id == stats.shard_id)
            except RayActorError as exc:  # Ray's restarts and call retries are used up for this actor
                actor_id = exc.actor_id or ""
                if actor_id not in running:
                    raise  # an error that names no actor of ours: nothing safe to retry
                failed = running[actor_id]
                stats = ShardStats(failed.shard_id, failed.signature, fingerprint,
                                   failed=f"worker died: {storage.describe_error(exc)}")
                if isinstance(exc, ActorDiedError):  # the pool dropped it; keep the pool at full size
                    deaths_in_a_row += 1
                    log.warning("a worker died for good; starting a replacement (%s)", stats.failed)
                    actor_pool.push(pool.replace(actor_id))
            shard = running.pop(actor_id)
            if stats.failed and attempts[shard.shard_id] < SHARD_ATTEMPTS:
                log.warning("shard %s failed (attempt %d/%d), retrying: %s", shard.shard_id,
                            attempts[shard.shard_id], SHARD_ATTEMPTS, stats.failed)
                retry.append(shard)
            else:
                if not stats.failed:
                    deaths_in_a_row = 0
                _record(stats, summary, done, progress)
            if options.grow:
                grow(pool, actor_pool, options)
            feed(actor_pool)
        if lock.lost or deaths_in_a_row > max_deaths:
            # Stopped early: what was running finished whole; nothing more was handed out.
            reason = ("the output lock was taken over by another run" if lock.lost
                      else f"{deaths_in_a_row} workers died in a row without finishing a shard")
            log.error("stopping: %s", reason)
            summary.failed[REST] = f"not handed out: {reason}"
    finally:
        progress.close()
        pool.kill()


def grow(pool: WorkerPool, actor_pool: Any, options: PoolOptions) -> int:
    """Add actors while the cluster offers more than the pool holds (nodes that joined: an autoscaling GPU group
    scaled up); returns how many were added. Only for pools sized to the cluster (``--workers`` left out)."""
    target = fill_cluster(node_resources(), options.gpus_per_worker)
    if target.cpus_per_worker < options.cpus_per_worker:  # the new nodes take smaller actors: not these
        return 0
    added = 0
    while len(pool.actors) < target.workers:
        actor_pool.push(pool.add())
        added += 1
    if added:
        log.info("the cluster grew: %d more workers (%d in all)", added, len(pool.actors))
    return added


def _record(stats: ShardStats, summary: JobSummary, done: dict[str, ShardStats], progress: Progress) -> None:
    if stats.failed:
        log.error("shard %s failed after %d attempts: %s", stats.shard_id, SHARD_ATTEMPTS, stats.failed)
        summary.failed[stats.shard_id] = stats.failed
        return
    done[stats.shard_id] = stats
    summary.done_here.append(stats)
    summary.shards_done += 1
    summary.images += stats.images
    summary.rows += stats.rows
    summary.errors += stats.errors
    for stage, seconds in stats.seconds.items():
        summary.stage_seconds[stage] = summary.stage_seconds.get(stage, 0.0) + seconds
    progress.update(shards=1, images=stats.images, errors=stats.errors)
