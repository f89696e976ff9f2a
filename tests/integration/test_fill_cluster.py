"""With --workers left out a sharded job fills the cluster (``ray.cluster_utils.Cluster``, nodes declaring fake
GPUs): actors per GPU on the GPU nodes, and more actors when a GPU node joins while the job runs (an autoscaling
worker group scaling up)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from ..conftest import TEST_IMAGE_SIZE
from .conftest import held, wait_until_held


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    first = cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, logging_level="WARNING", configure_logging=False)
    cluster.wait_for_nodes()
    yield cluster, first.node_id
    ray.shutdown()
    cluster.shutdown()


def test_the_default_fills_the_gpu_nodes(cluster) -> None:
    from cnnbatch.cluster import ACTORS_PER_GPU
    from cnnbatch.pool import pool_options

    options = pool_options(None, None)
    assert options.grow and options.workers == ACTORS_PER_GPU and options.gpus_per_worker == 1 / ACTORS_PER_GPU
    assert options.cpus_per_worker == 2 / ACTORS_PER_GPU  # each actor its share of the GPU node's CPUs
    explicit = pool_options(3, None)
    assert (explicit.workers, explicit.gpus_per_worker, explicit.grow) == (3, 1.0, False)


def test_the_pool_grows_when_a_gpu_node_joins(cluster, sample_root: Path, tmp_path: Path) -> None:
    """The only actor is held on its first shard until the second GPU node has joined; from the next finished
    shard on the pool holds two actors, and the second node does shards too."""
    from cnnbatch.extract import ExtractConfig, prepare_extract
    from cnnbatch.pipeline import run_sharded_job

    ray_cluster, first_node = cluster
    root, output, gate = sample_root / "train", tmp_path / "out", tmp_path / "gate"
    gate.mkdir()
    config = ExtractConfig(input=str(root), output=str(output), weights="random", image_size=TEST_IMAGE_SIZE,
                           shard_size=3, batch_size=3, gpus_per_worker=1.0, precision="float32")
    job = prepare_extract(config)
    assert job.pool.grow and job.pool.workers == 1

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_sharded_job, held(job, gate))
        wait_until_held(gate, running)
        second = ray_cluster.add_node(num_cpus=2, num_gpus=1)
        ray_cluster.wait_for_nodes()
        (gate / "release").write_text("go")
        summary = running.result(timeout=300)
    assert summary.ok and summary.shards_done == 6
    nodes = {json.loads(p.read_text())["node"] for p in (output / "_stats").glob("*.json")}
    assert nodes == {first_node, second.node_id}, nodes
    keys = ds.dataset(str(output)).to_table().column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 18
