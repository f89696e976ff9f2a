"""TensorFlow's runtime in a cnnbatch process: configured once, CPU threads that yield (set before the runtime
starts: tested in a fresh process, tests/integration/test_tfruntime_process.py), XLA per device, ``auto``
resolved for the device this process sees, where it runs."""

from __future__ import annotations

import os

from cnnbatch import tfruntime
from cnnbatch.precision import local_precision
from cnnbatch.tfruntime import (
    device_type,
    jit_compile_for,
    keras_module,
    placement,
    resolve_precision,
    share_gpus,
    tensorflow,
)


def test_the_module_is_configured_once_and_keras_rides_on_it() -> None:
    tf = tensorflow()
    assert tensorflow() is tf and tfruntime._configured
    assert keras_module().backend.backend() == "tensorflow"
    assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") is not None  # set before TensorFlow was imported


def test_on_this_cpu_only_machine() -> None:
    assert device_type() == "CPU"
    assert jit_compile_for("CPU") is False and jit_compile_for("GPU") is False and jit_compile_for("TPU") is False
    assert resolve_precision("auto") == local_precision(gpu=False)
    assert resolve_precision("float16") == "float16"  # explicit: as asked
    where = placement()
    assert where["device"] == "CPU" and where["node_id"] == "" and where["hostname"]  # outside Ray: no node


def test_sharing_no_gpu_is_a_no_op_and_a_started_gpu_keeps_its_setting() -> None:
    calls = []

    class FakeExperimental:
        @staticmethod
        def set_memory_growth(gpu, enabled):
            calls.append((gpu, enabled))
            if gpu == "started":
                raise RuntimeError("Physical devices cannot be modified after being initialized")

    class FakeTf:
        class config:
            experimental = FakeExperimental

    share_gpus(FakeTf, [])
    share_gpus(FakeTf, ["gpu0", "started", "gpu2"])
    assert calls == [("gpu0", True), ("started", True), ("gpu2", True)]
