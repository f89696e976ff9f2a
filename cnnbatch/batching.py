"""Images per model call when ``--batch-size`` is left out: sized to the device each actor holds.

CPUs: 32 (larger batches gained nothing measurable on CPUs). GPUs: the largest power of two up to 256 whose
activations fit half of the actor's share of its GPU's memory, the rest left for weights, cuDNN workspaces and the
allocator: large batches are much faster on a GPU (docs/benchmarks.md, "GPU"), while a quarter of a small GPU
(``--gpus-per-worker 0.25`` on 16 GB) holds far less than 256 VGG16 images at 224 px. Each actor decides for
itself, since a cluster's GPUs need not all be alike.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
from typing import Any

log = logging.getLogger(__name__)

CPU_BATCH = 32
GPU_MAX_BATCH = 256
GPU_MEMORY_FRACTION = 0.5  # of the actor's share of the GPU, for activations
# Live activations per image, as a multiple of the largest layer output: a layer's input and output coexist, and
# an Inception block keeps its input while its four branches fill the concatenation.
ACTIVATION_FACTOR = 3
WEIGHT_BYTES = 4  # variables stay float32 under Keras' mixed-precision policies


def value_bytes(precision: str) -> int:
    """Bytes per activation value: float16 and bfloat16 models compute in 16 bits."""
    return 4 if precision == "float32" else 2


def activation_bytes_per_image(model: Any, precision: str) -> int:
    """Peak activation memory per image of a functional Keras model: its largest layer output, times
    :data:`ACTIVATION_FACTOR`, at the precision's bytes per value."""
    largest = max(math.prod(int(d) for d in layer.output.shape[1:]) for layer in model.layers)
    return ACTIVATION_FACTOR * largest * value_bytes(precision)


def weights_bytes(model: Any) -> int:
    return sum(math.prod(int(d) for d in weight.shape) for weight in model.weights) * WEIGHT_BYTES


def gpu_batch_size(memory_bytes: int, gpu_share: float, weights: int, per_image: int) -> int:
    """The largest power of two up to :data:`GPU_MAX_BATCH` whose activations fit the budget (at least 1)."""
    budget = memory_bytes * min(gpu_share, 1.0) * GPU_MEMORY_FRACTION - weights
    fits = int(budget // per_image) if per_image > 0 else GPU_MAX_BATCH
    if fits < 1:
        return 1
    return min(GPU_MAX_BATCH, 2 ** int(math.log2(fits)))


def parse_memory_mib(text: str) -> int | None:
    """``nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits`` output -> bytes (first GPU listed)."""
    try:
        return int(float(text.strip().splitlines()[0].strip())) * 2**20
    except (ValueError, IndexError):
        return None


def gpu_memory_bytes() -> int | None:
    """Total memory of this process's first visible GPU (``CUDA_VISIBLE_DEVICES``, set by Ray, names it by index
    or UUID; nvidia-smi itself ignores that variable), or None when nvidia-smi cannot tell."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    command = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
    if visible:
        command += ["--id", visible]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_memory_mib(result.stdout)


def auto_batch_size(model: Any, precision: str, gpu_share: float) -> int:
    """The batch an actor uses when ``--batch-size`` is left out; ``model`` is the built Keras backbone."""
    if gpu_share <= 0:
        return CPU_BATCH
    memory = gpu_memory_bytes()
    if memory is None:
        log.warning("cannot read the GPU's memory (nvidia-smi): %d images per model call; set --batch-size to "
                    "choose", CPU_BATCH)
        return CPU_BATCH
    per_image, weights = activation_bytes_per_image(model, precision), weights_bytes(model)
    batch = gpu_batch_size(memory, gpu_share, weights, per_image)
    log.info("--batch-size %d: GPU memory %.1f GiB x share %g, %.1f MB of activations per image (%s)", batch,
             memory / 2**30, gpu_share, per_image / 1e6, precision)
    return batch
