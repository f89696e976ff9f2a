"""One line and the README's exit codes (2 bad arguments, 1 failure) for what went wrong, and nothing left behind
that would refuse the next run: an --output that is a file, an empty input, a garbage lock, an undecodable or
refused --image."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from cnnbatch.cli import main
from cnnbatch.train import TrainConfig, run_train

from ..conftest import learnable, write_features


@dataclass
class Result:
    returncode: int
    stderr: str


@pytest.fixture
def cli(ray_cluster, capsys):
    """``cnnbatch ARGS`` in this process, on the module's cluster (the same main() the console script runs)."""
    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main(list(args))
        return Result(code, capsys.readouterr().err)

    return run


def one_line(result: Result, code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def extract(cli, input_: Path, output: Path, *extra: str) -> Result:
    return cli("extract", "--input", str(input_), "--output", str(output), "--weights", "random",
               "--image-size", "32", "--workers", "1", *extra)


def test_an_output_that_is_a_file_is_one_line(cli, sample_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "features.parquet"
    output.write_bytes(b"I am a file")
    one_line(extract(cli, sample_root / "holdout", output / "sub"), 1, "cannot write to --output", "features.parquet")
    assert output.read_bytes() == b"I am a file"


def test_an_empty_input_leaves_no_configuration_stamp(cli, sample_root: Path, tmp_path: Path) -> None:
    empty, output = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    one_line(extract(cli, empty, output), 1, "holds no images")
    assert not (output / "_cnnbatch.json").exists()
    # so a run with another configuration on the same output is not refused
    result = extract(cli, sample_root / "holdout", output, "--image-size", "40")
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_garbage_lock_is_taken_over_and_named_for_what_it_is(cli, sample_root: Path, tmp_path: Path,
                                                               caplog) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "_LOCK").write_text("not json at all")
    result = extract(cli, sample_root / "holdout", output)
    result.stderr += caplog.text
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the lock file is unreadable" in result.stderr and "years" not in result.stderr


@pytest.fixture(scope="module")
def model(ray_cluster, tmp_path_factory) -> Path:
    x, labels = learnable(10, 512, seed=2)
    root = tmp_path_factory.mktemp("errors-model")
    features = write_features(root / "features", x, labels)
    output = root / "model"
    assert run_train(TrainConfig(features=(str(features),), output=str(output), epochs=2)).failed == {}
    return output


def test_an_undecodable_image_fails_with_status_1(cli, model: Path, tmp_path: Path) -> None:
    image = tmp_path / "broken.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    one_line(cli("predict", "--model", str(model), "--image", str(image)), 1, "broken.jpg", "cannot decode")


@pytest.mark.parametrize("uri, needle", [
    ("simplecache::http://127.0.0.1:9/x.jpg", "--image-url"),
    ("ftp://127.0.0.1/x.jpg", "ftp"),
])
def test_a_refused_image_uri_is_a_bad_argument(cli, model: Path, uri: str, needle: str) -> None:
    line = one_line(cli("predict", "--model", str(model), "--image", uri), 2, needle)
    assert json.dumps(line)  # printable, one line
