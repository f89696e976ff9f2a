"""Batch sizes when --batch-size is left out: 32 on CPUs, sized to the GPU's memory share on GPUs."""

from __future__ import annotations

import pytest

from cnnbatch import batching
from cnnbatch.backbones import BACKBONES

GIB = 2**30
# VGG16 at 224 px in float16: its largest layer output is 224 x 224 x 64 values.
VGG16_224_FP16 = batching.ACTIVATION_FACTOR * 224 * 224 * 64 * 2
VGG16_WEIGHTS = 14_714_688 * 4


def test_a_whole_big_gpu_takes_the_largest_batch() -> None:
    assert batching.gpu_batch_size(80 * GIB, 1.0, VGG16_WEIGHTS, VGG16_224_FP16) == 256


@pytest.mark.parametrize(("memory_gib", "share", "expected"), [
    (16, 1.0, 256),    # a whole T4: 8 GiB for activations, 19 MB each -> 442 -> capped
    (16, 0.25, 64),    # a quarter of it: 2 GiB - weights -> 108 -> 64
    (80, 0.125, 256),  # an eighth of an H100 (8 actors sharing it): 5 GiB -> 275 -> capped
    (40, 0.125, 128),  # an eighth of a 40 GB A100: 2.5 GiB -> 137 -> 128
    (8, 0.125, 16),    # an eighth of a small card: 512 MiB -> 24 -> 16
])
def test_a_share_of_a_gpu_takes_the_largest_power_of_two_that_fits(memory_gib: int, share: float,
                                                                     expected: int) -> None:
    batch = batching.gpu_batch_size(memory_gib * GIB, share, VGG16_WEIGHTS, VGG16_224_FP16)
    assert batch == expected
    budget = memory_gib * GIB * share * batching.GPU_MEMORY_FRACTION - VGG16_WEIGHTS
    assert batch * VGG16_224_FP16 <= budget and (batch == 256 or 2 * batch * VGG16_224_FP16 > budget)


def test_memory_too_small_for_one_image_still_runs_one_at_a_time() -> None:
    assert batching.gpu_batch_size(GIB // 8, 0.1, VGG16_WEIGHTS, VGG16_224_FP16) == 1


def test_nvidia_smi_output_is_parsed_in_mib() -> None:
    assert batching.parse_memory_mib("81559\n") == 81559 * 2**20
    assert batching.parse_memory_mib("143771\n81559\n") == 143771 * 2**20  # the first GPU listed
    assert batching.parse_memory_mib("") is None
    assert batching.parse_memory_mib("No devices were found\n") is None


def test_cpu_actors_use_32_without_looking_at_the_model() -> None:
    assert batching.auto_batch_size(None, "bfloat16", 0.0) == batching.CPU_BATCH == 32


def test_without_nvidia_smi_a_gpu_actor_falls_back_to_32(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi to run
    assert batching.gpu_memory_bytes() is None
    assert batching.auto_batch_size(None, "float16", 1.0) == 32
    assert "set --batch-size to choose" in caplog.text


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_activation_bytes_come_from_the_largest_layer_output(name: str, smallest_model) -> None:
    import keras

    model = smallest_model(name)
    largest = max(int(layer.output.shape[1]) * int(layer.output.shape[2]) * int(layer.output.shape[3])
                  for layer in model.layers if len(layer.output.shape) == 4)
    assert batching.activation_bytes_per_image(model, "float16") == batching.ACTIVATION_FACTOR * largest * 2
    assert batching.activation_bytes_per_image(model, "float32") == batching.ACTIVATION_FACTOR * largest * 4
    assert batching.weights_bytes(model) == model.count_params() * 4
    keras.backend.clear_session()
