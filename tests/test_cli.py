"""The command line in this process: one parser per job built from its config, errors as one line with exit 1 (the
job could not run) or 2 (bad arguments), the summary report. (The same in a fresh process, as a user runs it:
tests/integration/test_cli.py.)"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from cnnbatch import cli
from cnnbatch.cli import JOBS, build_parser, main, report
from cnnbatch.output import OutputError

from .conftest import learnable, write_features


@pytest.fixture(autouse=True)
def _drop_the_cli_log_handler():
    """``main`` installs cnnbatch's stderr handler on the root logger; each test starts and ends without it."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_cnnbatch", False)]:
        root.removeHandler(handler)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


def test_train_exit_codes(tmp_path: Path, capsys) -> None:
    """Moved here from the train tests: a bad value is 2, features that cannot be trained on are 1."""
    x, labels = learnable(4, 8)
    first = write_features(tmp_path / "a", x, labels)
    second = write_features(tmp_path / "b", x, labels, image_size=64)
    assert main(["train", "--features", str(first), "--output", str(tmp_path / "m"),
                 "--validation-split", "1.5"]) == 2
    assert main(["train", "--features", str(first), str(second), "--output", str(tmp_path / "m")]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].startswith("cnnbatch train: error: feature sets differ in image_size")
    assert "--validation-split must be between 0 and 1, got 1.5" in errors[0]



def test_every_job_has_a_subcommand_with_its_config_flags() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "job")
    assert set(sub.choices) == set(JOBS) >= {"extract", "train", "predict", "plan"}
    extract = sub.choices["extract"].format_help()
    assert "--input URI" in extract and "--gpus-per-worker F" in extract and "--log-level" not in extract


def test_the_recipe_and_cache_flags_reach_the_job_configs() -> None:
    """extract, finetune and predict read the augmentation flags as ImageDataGenerator's arguments, through the
    parser every entrypoint shares (``python -m jobs.*`` calls the same main)."""
    from cnnbatch.config import from_namespace
    from cnnbatch.extract import ExtractConfig
    from cnnbatch.finetune import FinetuneConfig
    from cnnbatch.predict import PredictConfig

    parser = build_parser()
    recipe = ["--rotation-range", "10", "--shear-range", "5", "--no-horizontal-flip", "--fill-mode", "reflect"]
    extract = from_namespace(ExtractConfig, parser.parse_args(
        ["extract", "--input", "in", "--output", "out", "--augment-views", "3", *recipe]))
    made = extract.recipe()
    assert extract.augment_views == 3
    assert (made.rotation_range, made.shear_range, made.horizontal_flip, made.fill_mode) == (10, 5, False, "reflect")
    assert made.zoom_range == 0.2  # the classic recipe's default where no flag is given
    tune = from_namespace(FinetuneConfig, parser.parse_args(
        ["finetune", "--input", "in", "--model", "m", "--output", "o", "--cache-mb", "0", *recipe]))
    assert tune.cache_mb == 0 and tune.recipe().shear_range == 5.0 and not tune.recipe().horizontal_flip
    predict = from_namespace(PredictConfig, parser.parse_args(
        ["predict", "--input", "in", "--model", "m", "--output", "o", "--tta", "4"]))
    assert predict.tta == 4


def test_parse_errors_exit_2_with_argparse_s_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in ((["extract", "--input", "x"], "the following arguments are required: --output"),
                          (["frobnicate"], "invalid choice: 'frobnicate'"),
                          (["extract", "--input", "x", "--output", "y", "--workers", "many"],
                           "invalid int value: 'many'")):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert message in line


def test_a_config_that_fails_validation_exits_2_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["extract", "--input", "x", "--output", "y", "--batch-size", "0"]) == 2
    assert main(["extract", "--input", "x", "--output", "y", "--image-size", "16"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == ["cnnbatch extract: error: --batch-size must be at least 1, got 0",
                     "cnnbatch extract: error: --image-size for vgg16 must be at least 32 px, got 16"]


def test_a_missing_input_exits_1_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["extract", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out"),
                 "--weights", "random", "--gpus-per-worker", "0"]) == 1
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert line.startswith("cnnbatch extract: error:") and "does not exist" in line and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_known_errors_are_one_redacted_line(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    def locked(job, namespace):
        raise OutputError("output s3://AKIAFAKE:hunter2@bucket/out is being written by another run")

    monkeypatch.setattr(cli, "run_job", locked)
    assert main(["train", "--features", "f", "--output", "o"]) == 1
    assert error_lines(capsys.readouterr().err) == [
        "cnnbatch train: error: output s3://***@bucket/out is being written by another run"]


def test_an_interrupt_says_how_to_resume(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(job, namespace):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_job", interrupted)
    assert main(["plan", "--input", "x"]) == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err


def test_report_prints_the_line_and_fails_on_failed_shards(capsys: pytest.CaptureFixture[str]) -> None:
    job = JOBS["extract"]
    assert report(job, SimpleNamespace(line=lambda: "10 images", failed={})) == 0
    assert capsys.readouterr().out == "cnnbatch extract: 10 images\n"
    assert report(job, SimpleNamespace(line=lambda: "8 images", failed={"b": "ReadError", "a": "died"})) == 1
    captured = capsys.readouterr()
    assert captured.out == "cnnbatch extract: 8 images\n"
    assert captured.err.splitlines() == ["cnnbatch extract: shard a failed: died", "cnnbatch extract: shard b failed: "
                                         "ReadError", "cnnbatch extract: error: 2 shards failed; rerun the same "
                                         "command to retry them"]
    assert report(JOBS["predict"], SimpleNamespace(line=lambda: '{"label": "cat"}', bare=True)) == 0
    assert capsys.readouterr().out == '{"label": "cat"}\n'  # the answer itself: nothing but it on stdout


def test_help_names_the_tool_and_where_to_start(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "cnnbatch plan --input URI" in out and "Exit status: 0 success" in out
