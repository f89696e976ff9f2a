"""The driver: shards -> a pool of Ray actors -> the output dataset, exactly once per shard.

Shared by every sharded job (extract, predict). The driver lists shards lazily, skips the ones already done for
this configuration, and hands one shard to each free actor of a ``ray.util.ActorPool``, so the listing stays lazy.
Ray restarts a crashed actor and retries its call (``max_restarts``/``max_task_retries``); an actor that is gone
for good is dropped by the pool, replaced by a fresh one, and its shard handed out again. Whole-shard failures are retried, then recorded. The deterministic, atomic per-shard writes make
every redo harmless: a shard's part file is replaced whole, never appended to.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from . import storage
from .output import OutputDataset, OutputError, OutputLock, ShardStats, steady_images_per_second
from .progress import Progress
from .shards import Shard, list_shards
from .worker import ShardTask, decode_threads_for, process_shard

log = logging.getLogger(__name__)

ACTOR_RESTARTS = 4  # a node or actor crash is redone by Ray this many times per actor
SHARD_ATTEMPTS = 3  # whole-shard failures (not crashes) are retried this many times before being reported
REST = "(rest)"  # the failure entry for shards never handed out because the run stopped early


class WorkerStartError(RuntimeError):
    """The actors could not build their model; the message is the root cause, on one line."""


def root_cause(error_text: str) -> str:
    """The last ``SomeError: message`` line of a remote traceback (Ray wraps the actor's own exception)."""
    lines = [line.strip() for line in error_text.splitlines() if line.strip()]
    for line in reversed(lines):
        name, sep, message = line.partition(": ")
        if sep and name.replace(".", "").replace("_", "").isalnum() and name.split(".")[-1][:1].isupper():
            return storage.redact(f"{name.split('.')[-1]}: {message}")
    return storage.redact(lines[-1] if lines else "unknown error")


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
    done_here: list[ShardStats] = field(default_factory=list, repr=False)  # the shards this run did

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
        if self.failed:
            text += f"; FAILED shards: {', '.join(sorted(self.failed))}"
        return text


# A private local cluster lives only for one job and nobody watches it: no dashboard, no metrics, no idle workers
# started ahead (Ray's default: one per CPU). On 2 cores these cost ~2% of the machine for the whole job (measured
# with bench: services' CPU while the job is steady, 0.037 -> 0.023 cores).
PRIVATE_CLUSTER_CONFIG = {"prestart_worker_first_driver": False, "enable_metrics_collection": False}


def init_ray() -> None:
    """Attach to ``RAY_ADDRESS`` (or the cluster of ``ray job submit``); else start a local one."""
    import ray

    if ray.is_initialized():
        return
    # "local" rather than None: without RAY_ADDRESS, start a private cluster instead of joining whatever
    # `ray start` cluster happens to run on this machine (ray job submit sets RAY_ADDRESS for its drivers).
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, configure_logging=False)
        return
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, configure_logging=False,
             include_dashboard=False, _system_config=PRIVATE_CLUSTER_CONFIG)


def decode_cpus(options: PoolOptions, node_cpus: float, node_gpus: float) -> float:
    """CPUs an actor's decode threads may use. A GPU actor decodes for its GPU, and GPU nodes run nothing else:
    it takes its GPU share of the node's CPUs (8 CPUs, 2 GPUs, 1 GPU per actor: 4). A CPU actor takes the CPUs
    it reserved."""
    if options.gpus_per_worker > 0 and node_gpus > 0:
        return max(options.cpus_per_worker, node_cpus * options.gpus_per_worker / node_gpus)
    return options.cpus_per_worker


def _make_actor_class() -> Any:
    import ray

    class ShardWorker:
        """A Ray actor holding one model, processing whole shards."""

        def __init__(self, task: ShardTask, output_uri: str, fingerprint: str, options: PoolOptions,
                     secrets: storage.SecretEnv):
            from .cli import setup_logging

            secrets.apply()  # before any filesystem is built in this process
            setup_logging()
            self.node = ray.get_runtime_context().get_node_id()
            resources = next((n.get("Resources", {}) for n in ray.nodes() if n.get("NodeID") == self.node), {})
            cpus = decode_cpus(options, resources.get("CPU", 0.0), resources.get("GPU", 0.0))
            self.output = OutputDataset(output_uri, node=self.node)
            self.fingerprint = fingerprint
            self.decode_threads = decode_threads_for(cpus)
            self.model = task.make_model()
            self.task = task.with_batch_size_for(self.model, options.gpus_per_worker)

        def process(self, shard: Shard) -> ShardStats:
            try:
                return process_shard(shard, self.task, self.model, self.output, self.fingerprint,
                                     self.decode_threads)
            except Exception as exc:  # noqa: BLE001 - reported to the driver, which retries then records it
                log.exception("shard %s failed", shard.shard_id)
                return ShardStats(shard.shard_id, shard.signature, self.fingerprint,
                                  failed=storage.describe_error(exc), node=self.node)

        def pid(self) -> int:
            return os.getpid()

    return ray.remote(ShardWorker)


def actor_env(options: PoolOptions) -> dict[str, str]:
    """``runtime_env`` variables for actors: non-secret storage settings (endpoint, region: so actors on every
    node reach the same buckets), quiet TensorFlow start-up, and no GPU for actors that did not reserve one (TF
    would otherwise take them all). Secrets travel as a constructor argument: Ray logs runtime_envs verbatim.
    """
    env = storage.storage_env()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    if options.gpus_per_worker == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


class _Pool:
    """The job's actors, with a factory to replace one that is gone for good."""

    def __init__(self, task: ShardTask, output_uri: str, fingerprint: str, options: PoolOptions):
        self._cls = _make_actor_class().options(
            num_cpus=options.cpus_per_worker,
            num_gpus=options.gpus_per_worker,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=ACTOR_RESTARTS,
            runtime_env={"env_vars": actor_env(options)},
        )
        self._args = (task, output_uri, fingerprint, options, storage.SecretEnv.from_environ())
        self.actors = [self.new_actor() for _ in range(options.workers)]

    def new_actor(self) -> Any:
        return self._cls.remote(*self._args)

    def replace(self, actor_id: str) -> Any:
        """Swap the actor with this id for a fresh one (killing the old one, should it merely be unreachable,
        so that it stops holding its CPU/GPU)."""
        import ray

        index = next(i for i, a in enumerate(self.actors) if a._actor_id.hex() == actor_id)
        ray.kill(self.actors[index])
        self.actors[index] = self.new_actor()
        return self.actors[index]

    def wait_ready(self) -> None:
        """Surface model-build failures (bad weights, no memory) before any shard is handed out, as one line."""
        import ray
        from ray.exceptions import RayActorError

        try:
            ray.get([actor.pid.remote() for actor in self.actors])
        except RayActorError as exc:
            raise WorkerStartError(f"workers could not start: {root_cause(str(exc))}") from None

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


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
        summary.seconds = time.perf_counter() - started
        _finish(output, fingerprint, config, summary, done)
        return summary
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
    pool = _Pool(task, output.uri, fingerprint, options)
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
