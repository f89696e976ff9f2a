"""TensorFlow's runtime in a cnnbatch process: imported quietly, GPUs shared, CPU threads that yield, XLA per device.

Every module that needs TensorFlow gets it from :func:`tensorflow`, so the start-up lines of the C++ runtime are
filtered once (logs.native_stderr_filtered) and the runtime is configured before it starts.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from .logs import native_stderr_filtered, quiet_native_logs
from .precision import check_precision, local_precision

log = logging.getLogger(__name__)
_configured = False

# XLA (jit_compile) per device type, only where it measured faster (docs/benchmarks.md, "The fast path").
XLA_BY_DEVICE = {"CPU": False, "GPU": False}


def tensorflow() -> Any:
    """The ``tensorflow`` module, imported with its start-up chatter filtered and its devices configured."""
    global _configured
    quiet_native_logs()
    if _configured:
        import tensorflow as tf

        return tf
    with native_stderr_filtered():
        import keras  # noqa: F401 - imports TensorFlow as its backend, inside the filter
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")  # CUDA is initialised (or fails) here
    share_gpus(tf, gpus)
    if not gpus:
        quiet_idle_threads()
    _configured = True
    return tf


def keras_module() -> Any:
    """The ``keras`` module, with TensorFlow (its backend) imported through :func:`tensorflow` first."""
    tensorflow()
    import keras

    return keras


def share_gpus(tf: Any, gpus: list[Any]) -> None:
    """Allocate GPU memory as needed instead of all of it up front, so that several actors (or the training task
    and an actor) can share a GPU."""
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # this process already initialised the GPU: its setting stands
            pass


def quiet_idle_threads() -> bool:
    """On a CPU, let TensorFlow's thread pools sleep as soon as they run out of work instead of spinning first, so
    the moments they wait go to the decode threads sharing their cores (docs/benchmarks.md, "The fast path").

    Must run before TensorFlow's runtime starts; returns whether it took effect. There is no public setter for
    this ConfigProto field, hence the eager context's own attribute.
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


def jit_compile_for(device_type: str) -> bool:
    return XLA_BY_DEVICE.get(device_type, False)


def device_type() -> str:
    """``GPU`` when this process sees one, else ``CPU``."""
    return "GPU" if tensorflow().config.list_logical_devices("GPU") else "CPU"


def resolve_precision(requested: str) -> str:
    """``auto`` for a model built in this process (one-image predict, the training task)."""
    if check_precision(requested) != "auto":
        return requested
    return local_precision(gpu=device_type() == "GPU")


def placement() -> dict[str, str]:
    """Where this process runs: the Ray node id (inside Ray), the host name and the device TensorFlow uses."""
    tf = tensorflow()
    node_id = ""
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray there is no node id to record
        node_id = ""
    gpus = tf.config.list_physical_devices("GPU")
    device = "CPU"
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        device = f"GPU ({details.get('device_name', gpus[0].name)})" if len(gpus) == 1 else \
            f"{len(gpus)} GPUs ({details.get('device_name', gpus[0].name)})"
    return {"node_id": node_id, "hostname": socket.gethostname(), "device": device}
