"""TensorFlow's runtime settings in a fresh process: they are fixed once the runtime starts, so only a new
interpreter shows what the Embedder sets before it (a TensorFlow import and a VGG16 build: out of the fast lane)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_cpu_embedder_turns_tensorflow_thread_spinning_off_before_the_runtime_starts() -> None:
    """In a fresh process (TensorFlow's runtime settings are fixed once it starts): the Embedder sets it, and a
    runtime already started is left as it is."""
    script = (
        "from tensorflow.python.eager import context\n"
        "import tensorflow as tf\n"
        "from cnnbatch.embed import Embedder, ModelSpec\n"
        "from cnnbatch.tfruntime import quiet_idle_threads\n"
        "from cnnbatch.weights import WeightsRef\n"
        "embedder = Embedder(ModelSpec('vgg16', 32, WeightsRef('random', seed=1), 'float32'))\n"
        "print(context.context().config.experimental.disable_thread_spinning, quiet_idle_threads(),\n"
        "      embedder.embed(__import__('numpy').zeros((2, 32, 32, 3), 'uint8')).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "True False (2, 512)"
