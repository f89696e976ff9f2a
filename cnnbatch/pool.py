"""The job's Ray actors: each holds one model (built once) and processes whole shards through worker.py.

Ray restarts a crashed actor and retries its call (``max_restarts``/``max_task_retries``); one that is gone for
good is replaced by :meth:`WorkerPool.replace`. Model-build failures surface before any shard is handed out.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from . import storage
from .cluster import actor_env, default_gpus, fill_cluster, node_resources
from .logs import setup_logging
from .output import OutputDataset
from .shards import Shard
from .shardstats import ShardStats
from .worker import ShardTask, decode_threads_for, process_shard

log = logging.getLogger(__name__)

ACTOR_RESTARTS = 4  # a node or actor crash is redone by Ray this many times per actor


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


@dataclass(frozen=True)
class PoolOptions:
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    grow: bool = False  # sized to the cluster (--workers left out): add actors when nodes join


def pool_options(workers: int | None, gpus_per_worker: float | None) -> PoolOptions:
    """The pool a sharded job asks for: ``--workers`` actors with ``--gpus-per-worker`` GPUs each (one GPU when
    the cluster has any), or, with ``--workers`` left out, what fills the cluster (cluster.fill_cluster)."""
    if workers is not None:
        return PoolOptions(workers=workers, gpus_per_worker=default_gpus(gpus_per_worker))
    placement = fill_cluster(node_resources(), gpus_per_worker)
    log.info("workers: %d (%s GPU and %s CPU each), to fill the cluster; --workers sets another number",
             placement.workers, f"{placement.gpus_per_worker:g}", f"{placement.cpus_per_worker:g}")
    return PoolOptions(placement.workers, placement.gpus_per_worker, placement.cpus_per_worker, grow=True)


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
            secrets.apply()  # before any filesystem is built in this process
            setup_logging()
            self.node = ray.get_runtime_context().get_node_id()
            resources: dict[str, float] = next(
                (n.get("Resources", {}) for n in ray.nodes() if n.get("NodeID") == self.node), {})
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


class WorkerPool:
    """The job's actors, with a factory to replace one that is gone for good."""

    def __init__(self, task: ShardTask, output_uri: str, fingerprint: str, options: PoolOptions):
        self._cls = _make_actor_class().options(
            num_cpus=options.cpus_per_worker,
            num_gpus=options.gpus_per_worker,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=ACTOR_RESTARTS,
            runtime_env={"env_vars": actor_env(options.gpus_per_worker)},
        )
        self._args = (task, output_uri, fingerprint, options, storage.SecretEnv.from_environ())
        self.actors = [self.new_actor() for _ in range(options.workers)]

    def new_actor(self) -> Any:
        return self._cls.remote(*self._args)

    def add(self) -> Any:
        """One more actor (the cluster grew)."""
        self.actors.append(self.new_actor())
        return self.actors[-1]

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
