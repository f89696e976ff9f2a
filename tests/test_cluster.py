"""The cluster a job runs on, without starting one: what every worker's environment holds (never a secret), and the
GPU defaults over the nodes' GPUs (``node_gpus`` stands in for the cluster)."""

from __future__ import annotations

import pytest

from cnnbatch import cluster
from cnnbatch.cluster import ClusterError, actor_env, default_gpus, one_node_gpus, resolve_precision_for_workers

from .conftest import FAKE_AWS_KEY_ID, FAKE_AWS_SECRET


@pytest.fixture()
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_AWS_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "cnnbatch-fake-session-token")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/secret/adc.json")
    monkeypatch.setenv("UNRELATED_SETTING", "1")


def test_cpu_workers_see_no_gpu_and_get_the_storage_settings_but_no_secret(aws_env) -> None:
    env = actor_env(0)
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # TensorFlow would otherwise take every GPU of the node
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["AWS_DEFAULT_REGION"] == "eu-west-3"
    for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "GOOGLE_APPLICATION_CREDENTIALS"):
        assert secret not in env
    values = " ".join(env.values())
    assert FAKE_AWS_SECRET not in values and FAKE_AWS_KEY_ID not in values
    assert "UNRELATED_SETTING" not in env


def test_gpu_workers_keep_the_gpus_ray_gives_them(aws_env) -> None:
    assert "CUDA_VISIBLE_DEVICES" not in actor_env(1)
    assert "CUDA_VISIBLE_DEVICES" not in actor_env(0.25)


def test_tensorflow_start_up_stays_quiet_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    assert actor_env(0)["TF_CPP_MIN_LOG_LEVEL"] == "2"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    assert actor_env(0)["TF_CPP_MIN_LOG_LEVEL"] == "0"


@pytest.mark.parametrize("nodes, expected", [([], 0.0), ([0.0, 0.0], 0.0), ([0.0, 4.0], 1.0), ([0.5], 0.0)])
def test_default_gpus_is_one_when_a_node_has_a_whole_gpu(monkeypatch: pytest.MonkeyPatch, nodes: list[float],
                                                         expected: float) -> None:
    monkeypatch.setattr(cluster, "node_gpus", lambda: nodes)
    assert default_gpus(None) == expected


def test_an_explicit_gpu_count_never_asks_the_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cluster() -> list[float]:
        raise AssertionError("asked the cluster")

    monkeypatch.setattr(cluster, "node_gpus", no_cluster)
    assert default_gpus(0.5) == 0.5 and default_gpus(0) == 0
    assert resolve_precision_for_workers("float16", gpus_per_worker=0) == "float16"  # explicit: no probe
    assert resolve_precision_for_workers("float32", gpus_per_worker=1) == "float32"


def test_one_node_gpus_takes_the_largest_node_or_refuses_more(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "node_gpus", lambda: [0.0, 2.0, 8.0, 4.0])
    assert one_node_gpus(None) == 8 and one_node_gpus(3) == 3 and one_node_gpus(8) == 8
    with pytest.raises(ClusterError, match=r"--gpus 9 is more than any one node of the cluster has \(largest: 8 "
                                           r"GPUs\).*keras-team/keras#20585"):
        one_node_gpus(9)
    monkeypatch.setattr(cluster, "node_gpus", lambda: [0.0])
    assert one_node_gpus(None) == 0
    with pytest.raises(ClusterError, match="largest: 0 GPUs"):
        one_node_gpus(1)


def test_unknown_precisions_are_refused_before_any_probe() -> None:
    with pytest.raises(ValueError, match="--precision must be one of auto, float32, bfloat16, float16, got 'int8'"):
        resolve_precision_for_workers("int8", gpus_per_worker=0)


# --- filling the cluster (--workers left out) ------------------------------------------------------------------

def test_fill_cluster_puts_actors_on_gpus_sharing_each_nodes_cpus() -> None:
    from cnnbatch.cluster import ACTORS_PER_GPU, Placement, fill_cluster

    # a CPU-only head (0 CPUs for work) and two GPU nodes: 8 CPUs + 2 GPUs, 16 CPUs + 4 GPUs
    nodes = [(0.0, 0.0), (8.0, 2.0), (16.0, 4.0)]
    placement = fill_cluster(nodes, None)
    assert placement == Placement(6 * ACTORS_PER_GPU, 1 / ACTORS_PER_GPU, 1.0)
    assert fill_cluster(nodes, 1.0) == Placement(6, 1.0, 1.0)
    assert fill_cluster([(2.0, 1.0)], None) == Placement(ACTORS_PER_GPU, 0.25, 0.5)  # the CPUs shared out
    assert fill_cluster([(4.0, 0.0)], 1.0) == Placement(1, 1.0, 1.0)  # no GPU yet: one, pending until one joins


def test_fill_cluster_without_gpus_is_one_actor_per_node() -> None:
    from cnnbatch.cluster import Placement, fill_cluster

    assert fill_cluster([(2.0, 0.0)], None) == Placement(1, 0.0, 2.0)
    assert fill_cluster([(0.0, 0.0), (16.0, 0.0), (8.0, 0.0)], None) == Placement(2, 0.0, 8.0)
    assert fill_cluster([(0.5, 0.0)], 0.0) == Placement(1, 0.0, 1.0)
