"""The actor pool's arithmetic without Ray: the CPUs an actor decodes with, and the root cause of a remote error."""

from __future__ import annotations

from cnnbatch.pool import PoolOptions, decode_cpus, root_cause


def test_gpu_actors_take_their_share_of_the_node_cpus_for_decoding() -> None:
    assert decode_cpus(PoolOptions(gpus_per_worker=1), node_cpus=32, node_gpus=4) == 8
    assert decode_cpus(PoolOptions(gpus_per_worker=0.5), node_cpus=16, node_gpus=2) == 4
    assert decode_cpus(PoolOptions(gpus_per_worker=0, cpus_per_worker=3), node_cpus=64, node_gpus=0) == 3
    assert decode_cpus(PoolOptions(gpus_per_worker=1, cpus_per_worker=2), node_cpus=2, node_gpus=4) == 2


def test_cpu_actors_decode_with_the_cpus_they_reserved_whatever_the_node_has() -> None:
    assert decode_cpus(PoolOptions(gpus_per_worker=0, cpus_per_worker=1), node_cpus=16, node_gpus=4) == 1
    assert decode_cpus(PoolOptions(gpus_per_worker=1), node_cpus=8, node_gpus=0) == 1  # no GPU there to feed


def test_root_cause_is_the_last_error_line_of_a_remote_traceback() -> None:
    text = """ray.exceptions.RayActorError: The actor died because of an error raised in its creation task
Traceback (most recent call last):
  File "pool.py", line 60, in __init__
    self.model = task.make_model()
cnnbatch.weights.WeightsError: cannot load weights s3://key:secret@bucket/w.h5 into vgg16 at 32 px: bad file
"""
    assert root_cause(text) == "WeightsError: cannot load weights s3://***@bucket/w.h5 into vgg16 at 32 px: bad file"


def test_root_cause_without_an_error_line_is_the_last_line() -> None:
    assert root_cause("the actor died\n  unexpectedly\n\n") == "unexpectedly"
    assert root_cause("") == "unknown error"
    assert root_cause("OSError: [Errno 28] No space left on device") == "OSError: [Errno 28] No space left on device"
