"""Several nodes: a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``), a CPU-only head and a
worker declaring two (fake) GPUs. GPU actors must land on the GPU node, one per GPU; CPU actors see no GPU;
a driver started elsewhere attaches through ``RAY_ADDRESS``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from ..conftest import TEST_IMAGE_SIZE, run_cli


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=cluster.address, logging_level="WARNING", configure_logging=False)
    cluster.wait_for_nodes()
    yield cluster, gpu_node.node_id
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def images(sample_root: Path) -> str:
    return str(sample_root / "train")  # 18 images


def shard_stats(output: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((output / "_stats").glob("*.json"))]


def keys(output: Path) -> list[str]:
    return ds.dataset(str(output)).to_table().column("key").to_pylist()


@pytest.mark.parametrize("gpus_per_worker", [1.0, 0.5])
def test_gpu_actors_are_placed_on_the_gpu_node(two_nodes, images: str, tmp_path: Path,
                                               gpus_per_worker: float) -> None:
    from cnnbatch.extract import ExtractConfig, run_extract

    _, gpu_node = two_nodes
    output = tmp_path / "out"
    config = ExtractConfig(input=images, output=str(output), weights="random", image_size=TEST_IMAGE_SIZE,
                           shard_size=5, batch_size=8, workers=2, gpus_per_worker=gpus_per_worker,
                           precision="float32")
    summary = run_extract(config)
    assert summary.ok and summary.shards_done == 4
    assert len(keys(output)) == len(set(keys(output))) == 18
    stats = shard_stats(output)
    assert {s["node"] for s in stats} == {gpu_node}
    devices = {s["cuda_visible_devices"] for s in stats}
    if gpus_per_worker == 1.0:
        # Two actors, one GPU each: both worked (4 shards handed out two by two) on different GPUs.
        assert len({s["worker"] for s in stats}) == 2 and devices == {"0", "1"}
    else:
        assert devices <= {"0", "1"} and "" not in devices


def test_cpu_actors_see_no_gpu_and_a_driver_attaches_through_ray_address(two_nodes, images: str,
                                                                         tmp_path: Path) -> None:
    cluster, _ = two_nodes
    output = tmp_path / "out"
    run = run_cli("extract", "--input", images, "--output", str(output), "--weights", "random",
                  "--image-size", str(TEST_IMAGE_SIZE), "--shard-size", "9", "--workers", "1",
                  "--gpus-per-worker", "0", env={"RAY_ADDRESS": cluster.address})
    assert run.returncode == 0, run.stderr[-3000:]
    import ray

    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    stats = shard_stats(output)
    assert len(stats) == 2 and {s["node"] for s in stats} <= nodes
    assert {s["cuda_visible_devices"] for s in stats} == {""}
    assert len(set(keys(output))) == 18
