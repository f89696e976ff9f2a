"""Stage 3: the model as a callable class (Ray Data's batch-inference pattern).

``Embedder.__init__`` builds the backbone once; ``__call__(batch) -> batch`` is pure: uint8 images in, float32
embeddings out. uint8 crosses process boundaries (4x smaller than float32) and is cast and preprocessed inside
one compiled ``tf.function``, so the whole step is one graph call per batch.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backbones import Backbone, get_backbone
from .storage import describe_error, redact
from .weights import WeightsError, WeightsRef, keras_weights_arg

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
RESOLVED_PRECISIONS = PRECISIONS[1:]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the same backbone on any node."""

    backbone: str
    image_size: int
    weights: WeightsRef
    precision: str = "float32"  # already resolved: float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        if self.precision not in RESOLVED_PRECISIONS:
            raise ValueError(f"a model's precision must be resolved to one of {', '.join(RESOLVED_PRECISIONS)}, "
                             f"got {self.precision!r}")

    @property
    def backbone_spec(self) -> Backbone:
        return get_backbone(self.backbone)


def check_precision(requested: str) -> str:
    if requested not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    return requested


def resolve_precision(requested: str) -> str:
    """``auto`` for a model built in this process (the single-image path): see :func:`local_precision`."""
    if check_precision(requested) != "auto":
        return requested
    import tensorflow as tf

    return local_precision(gpu=bool(tf.config.list_physical_devices("GPU")))


def resolve_precision_for_workers(requested: str, gpus_per_worker: float, cpus_per_worker: float = 1.0) -> str:
    """``auto`` for a sharded job: decided on a node where its actors run, which need not be like the driver's
    (a CPU-only head node, workers of another CPU generation). A small Ray task with the actors' resources asks
    that node; ``bfloat16`` on a CPU without native support would be emulated and several times slower."""
    if check_precision(requested) != "auto":
        return requested
    import ray

    from .pipeline import init_ray

    init_ray()  # the job starts or joins its cluster next anyway
    probe = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(local_precision)
    precision = ray.get(probe.remote(gpus_per_worker > 0))
    log.info("--precision auto: %s (as decided on a worker node)", precision)
    return precision


def local_precision(gpu: bool) -> str:
    """What ``auto`` means on this machine: mixed float16 on GPUs with tensor cores (compute capability 7.0 and
    up), bfloat16 on CPUs with native bf16 (AVX512-BF16 or AMX), float32 otherwise."""
    if gpu:
        return "float16" if gpu_compute_capability() >= (7, 0) else "float32"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def gpu_compute_capability() -> tuple[int, int]:
    """The first visible GPU's compute capability from ``nvidia-smi`` (no CUDA context), (0, 0) if unknown."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        major, minor = out.splitlines()[0].strip().split(".")
        return int(major), int(minor)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return (0, 0)


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags.split() or "amx_bf16" in flags.split()


# XLA (jit_compile) per device type, only where it measured faster (docs/benchmarks.md): on this project's CPU
# it made VGG16 2.4x slower at bfloat16. TensorFlow with CUDA could not be measured on the lent GPU, so GPUs keep
# cuDNN's kernels too until a measurement says otherwise.
XLA_BY_DEVICE = {"CPU": False, "GPU": False}


def jit_compile_for(device_type: str) -> bool:
    return XLA_BY_DEVICE.get(device_type, False)


def _policy_name(precision: str) -> str:
    return {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[precision]


def build_model(spec: ModelSpec) -> Any:
    """Build the pooled backbone with its weights under the spec's precision policy."""
    import keras

    backbone = spec.backbone_spec
    if spec.weights.kind == "random":
        keras.utils.set_random_seed(int(spec.weights.seed or 0))
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(_policy_name(spec.precision))
    try:
        return backbone.build(spec.image_size, weights=keras_weights_arg(spec.weights))
    except WeightsError:
        raise
    except (OSError, ValueError) as exc:  # not an HDF5 file, or weights of another architecture
        source = spec.weights.uri or spec.weights.kind
        raise WeightsError(f"cannot load weights {redact(source)} into {backbone.name} at {spec.image_size} px: "
                           f"{describe_error(exc)}") from None
    finally:
        keras.mixed_precision.set_global_policy(previous)


def variables_digest(model: Any) -> str:
    """sha256 over the model's weights, so that a seeded random backbone is still identified by content."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def share_gpus(tf: Any) -> None:
    """Allocate GPU memory as needed instead of all of it up front, so that several actors can share a GPU
    (``--gpus-per-worker 0.25``): one GPU's worth of decoding needs several processes' CPUs (docs/benchmarks.md)."""
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # this process already initialised the GPU: its setting stands
            pass


def quiet_idle_threads() -> bool:
    """On a CPU, let TensorFlow's thread pools sleep as soon as they run out of work instead of spinning first, so
    that the moments they wait (between ops, at each op's barrier) go to the decode threads sharing their cores.

    Measured with the worker alone (decode threads + model, 400 JPEGs at 160 px, 5 interleaved pairs of processes,
    26 Nov 2026): 0.971 of the bare model against 0.962 with spinning (ahead in 4 of 5); the bare model itself ran
    as fast either way. Must run before TensorFlow's runtime starts; returns whether it took effect. There is no
    public setter for this ConfigProto field, hence the eager context's own attribute.
    """
    try:
        from tensorflow.core.protobuf import config_pb2
        from tensorflow.python.eager import context

        ctx = context.context()
        if ctx._context_handle is not None:  # already started: keep its settings
            return False
        config = config_pb2.ConfigProto()
        if ctx._config is not None:
            config.CopyFrom(ctx._config)
        config.experimental.disable_thread_spinning = True
        ctx._config = config
        return True
    except (ImportError, AttributeError):  # another TensorFlow's internals: run with its defaults
        log.debug("cannot turn TensorFlow's thread spinning off", exc_info=True)
        return False


class Embedder:
    """Backbone features for a batch of uint8 images: ``{"image": (N, S, S, 3) uint8, ...} -> {..., "embedding"}``."""

    def __init__(self, spec: ModelSpec):
        import tensorflow as tf

        share_gpus(tf)
        if not tf.config.list_physical_devices("GPU"):
            quiet_idle_threads()
        self.spec = spec
        self.backbone = spec.backbone_spec
        self.image_size = self.backbone.check_size(spec.image_size)
        self.model = build_model(spec)
        self.weights_sha256 = spec.weights.sha256 or variables_digest(self.model)
        preprocess = self.backbone.preprocess_fn()
        model = self.model

        self.device_type = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"

        @tf.function(
            input_signature=[tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.uint8)],
            jit_compile=jit_compile_for(self.device_type),
        )
        def embed(images: tf.Tensor) -> tf.Tensor:
            pixels = preprocess(tf.cast(images, tf.float32))
            return tf.cast(model(pixels, training=False), tf.float32)

        self._embed = embed

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def embed(self, images: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 -> ``(N, D)`` float32."""
        expected = (self.image_size, self.image_size, 3)
        if images.dtype != np.uint8 or images.shape[1:] != expected:
            raise ValueError(f"expected uint8 images of shape (N, {expected[0]}, {expected[1]}, 3), "
                             f"got {images.dtype} {images.shape}")
        if len(images) == 0:
            return np.zeros((0, self.feature_dim), np.float32)
        return self._embed(images).numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {name: value for name, value in batch.items() if name != "image"}
        out["embedding"] = self.embed(batch["image"])
        return out
