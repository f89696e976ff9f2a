"""The command line in a fresh process, as a user runs it: bad flags, missing inputs, unusable weights and
incompatible outputs are one clear line on stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cnnbatch.output import OutputDataset

from ..conftest import REPO, run_cli


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if "error:" in line]
    assert len(error_lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        (["extract", "--input", "x"], 2, ["the following arguments are required: --output"]),
        (["extract", "--input", "x", "--output", "y", "--backbone", "resnet"], 2, ["invalid choice: 'resnet'"]),
        (["extract", "--input", "x", "--output", "y", "--batch-size", "0"], 2,
         ["--batch-size must be at least 1, got 0"]),
        (["extract", "--input", "x", "--output", "y", "--image-size", "16"], 2,
         ["--image-size for vgg16 must be at least 32 px, got 16"]),
        (["extract", "--input", "x", "--output", "y", "--workers", "many"], 2, ["invalid int value: 'many'"]),
        (["frobnicate"], 2, ["invalid choice: 'frobnicate'"]),
    ],
)
def test_bad_arguments(args: list[str], code: int, fragments: list[str]) -> None:
    assert_one_line_error(run_cli(*args), code, *fragments)


def test_missing_input(tmp_path: Path) -> None:
    result = run_cli("extract", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out"),
                     "--weights", "random")
    assert_one_line_error(result, 1, "does not exist")


def test_unusable_weights(tmp_path: Path, sample_root: Path) -> None:
    images = str(sample_root / "train")
    result = run_cli("extract", "--input", images, "--output", str(tmp_path / "o"), "--weights", "weights.bin")
    # a malformed value is a bad argument (exit 2); a well-formed one that cannot be read is a failure (exit 1)
    assert_one_line_error(result, 2, "--weights must be imagenet, random, or a notop weights file", "weights.bin")
    result = run_cli("extract", "--input", images, "--output", str(tmp_path / "o"),
                     "--weights", str(tmp_path / "missing.weights.h5"))
    assert_one_line_error(result, 1, "weights file", "does not exist")


def test_output_of_another_backbone_is_refused(tmp_path: Path, sample_root: Path) -> None:
    out = tmp_path / "features"
    OutputDataset(str(out)).prepare("another-fingerprint", {"backbone": "inceptionv3"}, overwrite=False)
    result = run_cli("extract", "--input", str(sample_root / "train"), "--output", str(out),
                     "--weights", "random", "--gpus-per-worker", "0", "--precision", "float32")
    assert_one_line_error(result, 1, "holds results of another configuration",
                          "backbone: existing 'inceptionv3', now 'vgg16'", "--overwrite")


def test_jobs_entrypoint_takes_the_same_flags() -> None:
    job = subprocess.run([sys.executable, "-m", "jobs.extract", "--help"], capture_output=True, text=True, cwd=REPO)
    cli = run_cli("extract", "--help")
    assert job.returncode == cli.returncode == 0
    flags = lambda text: sorted(word for word in text.split() if word.startswith("--"))  # noqa: E731
    assert flags(job.stdout) == flags(cli.stdout) and "--gpus-per-worker" in flags(job.stdout)


def test_weights_file_that_is_not_hdf5_fails_in_one_line(tmp_path: Path, sample_root: Path) -> None:
    bad = tmp_path / "vgg16.weights.h5"
    bad.write_bytes(b"this is not HDF5")
    result = run_cli("extract", "--input", str(sample_root / "train"), "--output", str(tmp_path / "o"),
                     "--weights", str(bad), "--image-size", "32", "--gpus-per-worker", "0")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cnnbatch extract: error: workers could not start: WeightsError: cannot load weights"), \
        result.stderr[-3000:]
    assert "into vgg16 at 32 px" in last
