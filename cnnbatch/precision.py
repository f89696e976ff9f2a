"""Compute precision: what ``--precision auto`` means on a machine, without importing TensorFlow or Ray."""

from __future__ import annotations

import subprocess

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
RESOLVED_PRECISIONS = PRECISIONS[1:]
KERAS_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def check_precision(requested: str) -> str:
    if requested not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    return requested


def policy_name(precision: str) -> str:
    """The Keras mixed-precision policy of a resolved precision."""
    try:
        return KERAS_POLICIES[precision]
    except KeyError:
        raise ValueError(f"a model's precision must be resolved to one of {', '.join(RESOLVED_PRECISIONS)}, "
                         f"got {precision!r}") from None


def local_precision(gpu: bool) -> str:
    """What ``auto`` means on this machine: mixed float16 on GPUs with tensor cores (compute capability 7.0 and
    up), bfloat16 on CPUs with native bf16 (AVX512-BF16 or AMX), float32 otherwise."""
    if gpu:
        return "float16" if gpu_compute_capability() >= (7, 0) else "float32"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def gpu_compute_capability() -> tuple[int, int]:
    """The first visible GPU's compute capability from ``nvidia-smi`` (no CUDA context), (0, 0) if unknown."""
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
