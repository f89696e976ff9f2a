"""The Ray cluster a job runs on: start or join it, what every worker's environment holds, the GPUs it offers,
and the launcher that runs one function on one worker (the fit of ``train`` and ``finetune``).

Ray is imported inside the functions: the CLI and the unit tests do not pay for it.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from . import storage
from .logs import setup_logging
from .precision import check_precision, local_precision

log = logging.getLogger(__name__)
T = TypeVar("T")

# A private local cluster lives only for one job and nobody watches it: no dashboard, no metrics, no idle workers
# started ahead (Ray's default: one per CPU); docs/benchmarks.md has what they cost.
PRIVATE_CLUSTER_CONFIG = {"prestart_worker_first_driver": False, "enable_metrics_collection": False}


# Actors per GPU when --workers and --gpus-per-worker are left out: one process's decode threads cannot feed a
# fast GPU (docs/benchmarks.md, "GPU": 4-8 processes per GPU paid on the H100).
ACTORS_PER_GPU = 4


@dataclass(frozen=True)
class Placement:
    """How many actors a sharded job runs and what each reserves."""

    workers: int
    gpus_per_worker: float
    cpus_per_worker: float


def fill_cluster(nodes: list[tuple[float, float]], gpus_per_worker: float | None) -> Placement:
    """The actors that fill what the cluster offers now, from each alive node's ``(CPUs, GPUs)``: with GPUs,
    ``ACTORS_PER_GPU`` per GPU (or as many as ``gpus_per_worker`` allows), each reserving its share of its
    node's CPUs up to one; without, one actor per node holding the CPUs of the smallest node (TensorFlow uses
    every core of its process, so two actors on one node would only contend). Always at least one actor: on
    an autoscaling cluster it is pending until a node joins."""
    gpu_nodes = [(cpus, gpus) for cpus, gpus in nodes if gpus > 0]
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 / ACTORS_PER_GPU if gpu_nodes else 0.0
    if gpus_per_worker > 0:
        per_node = [(cpus, int(gpus / gpus_per_worker + 1e-9)) for cpus, gpus in gpu_nodes]
        per_node = [(cpus, actors) for cpus, actors in per_node if actors > 0]
        cpus_each = min([1.0] + [cpus / actors for cpus, actors in per_node])
        return Placement(max(1, sum(actors for _, actors in per_node)), gpus_per_worker, round(cpus_each, 4))
    cpu_nodes = [cpus for cpus, _ in nodes if cpus >= 1]
    cpus_each = float(int(min(cpu_nodes))) if cpu_nodes else 1.0
    return Placement(max(1, len(cpu_nodes)), 0.0, cpus_each)


def node_resources() -> list[tuple[float, float]]:
    """``(CPUs, GPUs)`` of each alive node of the cluster (joined or started by :func:`init_ray`)."""
    import ray

    init_ray()
    return [(float(node.get("Resources", {}).get("CPU", 0.0)), float(node.get("Resources", {}).get("GPU", 0.0)))
            for node in ray.nodes() if node.get("Alive", True)]


class ClusterError(ValueError):
    """A request the cluster cannot satisfy (more GPUs than any node has), with a one-line reason."""


def init_ray() -> None:
    """Attach to ``RAY_ADDRESS`` (or the cluster of ``ray job submit``); else start a private local one."""
    import ray

    if ray.is_initialized():
        return
    # "local" rather than None: without RAY_ADDRESS, start a private cluster instead of joining whatever
    # `ray start` cluster happens to run on this machine (ray job submit sets RAY_ADDRESS for its drivers).
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, configure_logging=False)
        return
    from . import reaper

    token = reaper.mark_environment() if reaper.supported() else ""  # inherited by every process Ray starts
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, configure_logging=False,
             include_dashboard=False, _system_config=PRIVATE_CLUSTER_CONFIG)
    _watch_private_cluster(token)


def _watch_private_cluster(token: str) -> None:
    """The private cluster dies with this driver, even a killed one (reaper.py)."""
    import ray

    from . import reaper

    try:
        node: Any = ray._private.worker._global_node
        pids = [info.process.pid for name in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor")
                for info in node.all_processes.get(name, []) if info.process is not None]
        session = str(node.get_session_dir_path())
    except (AttributeError, TypeError):  # another Ray's internals: Ray's own cleanup applies
        log.debug("cannot watch the private cluster's processes", exc_info=True)
        return
    reaper.watch(pids, token, session)


def actor_env(gpus: float) -> dict[str, str]:
    """``runtime_env`` variables for workers: non-secret storage settings (endpoint, region: so workers on every
    node reach the same buckets), quiet TensorFlow start-up, and no GPU for workers that did not reserve one (TF
    would otherwise take them all). Secrets travel as an argument: Ray logs runtime_envs verbatim."""
    env = storage.storage_env()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    if gpus == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def node_gpus() -> list[float]:
    """GPUs of each alive node of the cluster (joined or started by :func:`init_ray`)."""
    return [gpus for _, gpus in node_resources()]


def default_gpus(requested: float | None) -> float:
    """An explicit value wins; otherwise one GPU when the cluster has any (an actor's or a head fit's share)."""
    if requested is not None:
        return requested
    return 1.0 if max(node_gpus(), default=0.0) >= 1 else 0.0


def one_node_gpus(requested: int | None) -> int:
    """GPUs for a data-parallel fit on one node: an explicit value if one node has that many, else all the GPUs
    of the largest GPU node (0 on a CPU-only cluster). Keras 3 cannot ``fit`` across nodes
    (MultiWorkerMirroredStrategy, keras-team/keras#20585), so a request over one node's GPUs is refused."""
    largest = int(max(node_gpus(), default=0.0))
    if requested is None:
        return largest
    if requested > largest:
        raise ClusterError(f"--gpus {requested} is more than any one node of the cluster has (largest: {largest} "
                           "GPUs): fine-tuning runs on the GPUs of one node (Keras 3 cannot fit across nodes, "
                           "keras-team/keras#20585); ask for at most that many")
    return requested


def resolve_precision_for_workers(requested: str, gpus_per_worker: float, cpus_per_worker: float = 1.0) -> str:
    """``auto`` for a sharded job: decided on a node where its actors run, which need not be like the driver's
    (a CPU-only head node, workers of another CPU generation). A small Ray task with the actors' resources asks
    that node; ``bfloat16`` on a CPU without native support would be emulated and several times slower."""
    if check_precision(requested) != "auto":
        return requested
    import ray

    init_ray()
    probe = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(local_precision)
    precision = str(ray.get(probe.remote(gpus_per_worker > 0)))
    log.info("--precision auto: %s (as decided on a worker node)", precision)
    return precision


def _in_worker(fn: Callable[..., T], args: tuple[Any, ...], secrets: storage.SecretEnv) -> T:
    secrets.apply()  # before any filesystem is built in this process
    setup_logging()
    return fn(*args)


def run_on_worker(fn: Callable[..., T], *args: Any, gpus: float,
                  errors: tuple[type[BaseException], ...] = (), fresh_process: bool = False) -> T:
    """``fn(*args)`` as one Ray task holding ``gpus`` GPUs (of one node), with the driver's storage credentials.

    Ray retries the task when its worker dies (``max_retries=2``), not when ``fn`` raises; an exception of one of
    the ``errors`` types is re-raised here as itself (a one-line message), any other as Ray's error.
    ``fresh_process``: a worker process of its own (``max_calls=1``), for a function that configures TensorFlow's
    devices before its runtime starts."""
    import ray
    from ray.exceptions import RayTaskError

    init_ray()
    env = actor_env(gpus)
    if fresh_process:  # a runtime_env of its own: Ray starts a worker process for it, never an idle one reused
        env["CNNBATCH_TASK_PROCESS"] = uuid.uuid4().hex
    remote: Any = ray.remote(max_calls=1)(_in_worker) if fresh_process else ray.remote(_in_worker)  # else Ray's default
    task: Any = remote.options(num_cpus=1, num_gpus=gpus, max_retries=2, retry_exceptions=False,
                               runtime_env={"env_vars": env})
    try:
        return ray.get(task.remote(fn, args, storage.SecretEnv.from_environ()))
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, errors):
            raise cause from None
        raise
