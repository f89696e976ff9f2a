"""Compute precision: what ``--precision auto`` means on a machine (CPU flags, GPU compute capability), the Keras
policy of each resolved precision, and the messages naming the choices. (Features within cosine 0.999 of float32
under each policy: tests/test_embed.py; the precision in metadata and fingerprint: tests/test_extract.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnbatch import precision
from cnnbatch.precision import (
    KERAS_POLICIES,
    RESOLVED_PRECISIONS,
    check_precision,
    cpu_has_native_bf16,
    gpu_compute_capability,
    local_precision,
    policy_name,
)


def test_auto_follows_the_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text().split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_has_native_bf16() is native
    assert local_precision(gpu=False) == ("bfloat16" if native else "float32")


@pytest.mark.parametrize("capability, expected", [((9, 0), "float16"), ((7, 0), "float16"), ((6, 1), "float32"),
                                                  ((0, 0), "float32")])
def test_auto_on_a_gpu_takes_float16_with_tensor_cores_only(monkeypatch: pytest.MonkeyPatch,
                                                            capability: tuple[int, int], expected: str) -> None:
    monkeypatch.setattr(precision, "gpu_compute_capability", lambda: capability)
    assert local_precision(gpu=True) == expected


def test_without_nvidia_smi_the_capability_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert gpu_compute_capability() == (0, 0)


def test_unknown_precisions_fail_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"--precision must be one of auto, float32, bfloat16, float16, got 'fp8'"):
        check_precision("fp8")
    assert [check_precision(p) for p in ("auto", *RESOLVED_PRECISIONS)] == ["auto", *RESOLVED_PRECISIONS]


def test_each_resolved_precision_has_its_keras_policy_and_auto_has_none() -> None:
    assert {p: policy_name(p) for p in RESOLVED_PRECISIONS} == KERAS_POLICIES == {
        "float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
    with pytest.raises(ValueError, match=r"must be resolved to one of float32, bfloat16, float16, got 'auto'"):
        policy_name("auto")
