"""The Makefile's job targets hand their variables to the CLI the tests run: ``make -n`` (nothing is executed)
prints each target's command line. No Ray, no TensorFlow."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


def command_of(target: str, *variables: str) -> list[str]:
    """The cnnbatch command line ``make TARGET VARS`` would run (the install step, if due, is left aside)."""
    out = subprocess.run(["make", "-n", "-s", "-C", str(REPO), target, *variables], capture_output=True, text=True,
                         check=True).stdout
    lines = [line for line in out.replace("\\\n", " ").splitlines() if "/cnnbatch " in line]
    assert lines, f"make -n {target} printed no cnnbatch command:\n{out}"
    words = shlex.split(lines[-1])
    return words[next(i for i, w in enumerate(words) if w.endswith("/cnnbatch")) + 1:]


def test_make_finetune_passes_input_model_output_and_extra() -> None:
    assert command_of("finetune", "INPUT=s3://b/images", "MODEL=m", "OUTPUT=out",
                      "EXTRA=--epochs 2 --cache-mb 0") == [
        "finetune", "--input", "s3://b/images", "--model", "m", "--output", "out", "--epochs", "2", "--cache-mb", "0"]


def test_make_finetune_defaults_its_output_apart_from_extracts() -> None:
    assert command_of("finetune", "INPUT=images")[-2:] == ["--output", "data/model-finetuned"]


def test_make_extract_passes_the_augmentation_flags_through_extra() -> None:
    words = command_of("extract", "INPUT=in", "OUTPUT=out", "WEIGHTS=random",
                       "EXTRA=--augment-views 4 --no-horizontal-flip")
    assert words[:9] == ["extract", "--input", "in", "--output", "out", "--backbone", "vgg16", "--weights", "random"]
    assert words[-3:] == ["--augment-views", "4", "--no-horizontal-flip"]


def test_make_predict_passes_tta() -> None:
    words = command_of("predict", "INPUT=new", "MODEL=m", "OUTPUT=p", "EXTRA=--tta 4")
    assert words == ["predict", "--model", "m", "--top-k", "1", "--input", "new", "--output", "p", "--tta", "4"]
