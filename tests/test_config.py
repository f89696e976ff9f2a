"""Config dataclasses as command lines: ``option`` fields become argparse flags and parse back into the dataclass,
so the CLI and ``python -m jobs.<job>`` share one parser; validation messages; redaction for logs."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass

import pytest

from cnnbatch.config import add_arguments, from_namespace, log_config, option, require, to_dict


@dataclass(frozen=True)
class Toy:
    source: str = option("where from", metavar="URI")
    inputs: tuple[str, ...] = option("one or more", metavar="URI", nargs="+")
    size: int | None = option("pixels", None, metavar="N")
    rate: float = option("a fraction", 0.5)
    mode: str = option("how", "fast", choices=("fast", "slow"))
    verbose: bool = option("say more", False)
    cache: bool = option("keep things", True)
    flip: bool | None = option("mirror (default: the base recipe's)", None, group="recipe")
    shift: float | None = option("move", None, flag="--move-by", group="recipe")

    def __post_init__(self) -> None:
        require(self.rate > 0, f"--rate must be positive, got {self.rate}")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_arguments(parser, Toy)
    return parser


def parse(*argv: str) -> Toy:
    return from_namespace(Toy, parser().parse_args(list(argv)))


def test_flags_parse_into_the_dataclass_with_its_defaults() -> None:
    toy = parse("--source", "s3://b/x", "--inputs", "a", "b")
    assert toy == Toy(source="s3://b/x", inputs=("a", "b"))  # nargs lists become tuples: the config stays hashable
    assert (toy.size, toy.rate, toy.mode, toy.verbose, toy.cache, toy.flip, toy.shift) == (
        None, 0.5, "fast", False, True, None, None)


def test_every_kind_of_flag() -> None:
    toy = parse("--source", "x", "--inputs", "a", "--size", "64", "--rate", "0.25", "--mode", "slow", "--verbose",
                "--no-cache", "--no-flip", "--move-by", "0.1")
    assert (toy.size, toy.rate, toy.mode, toy.verbose, toy.cache, toy.flip, toy.shift) == (
        64, 0.25, "slow", True, False, False, 0.1)
    assert parse("--source", "x", "--inputs", "a", "--flip").flip is True


def test_required_flags_types_and_choices_are_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in ((["--inputs", "a"], "the following arguments are required: --source"),
                          (["--source", "x", "--inputs", "a", "--size", "big"], "invalid int value: 'big'"),
                          (["--source", "x", "--inputs", "a", "--mode", "medium"], "invalid choice: 'medium'")):
        exiting = argparse.ArgumentParser(prog="toy")
        add_arguments(exiting, Toy)
        with pytest.raises(SystemExit) as exited:
            exiting.parse_args(argv)
        assert exited.value.code == 2 and message in capsys.readouterr().err


def test_help_shows_defaults_metavars_and_the_groups_last() -> None:
    text = parser().format_help()
    assert "--size N" in text and "--source URI" in text and "--inputs URI [URI ...]" in text
    assert "a fraction (default: 0.5)" in text and "pixels (default" not in text  # None defaults are not shown
    assert "--move-by SHIFT" in text  # its own flag name, the field's name as the destination
    options, recipe = text.split("\nrecipe:\n")  # the group's heading after the job's own flags
    assert "--cache" in options and "--flip, --no-flip" in recipe and "--move-by" in recipe


def test_validation_is_a_value_error_naming_expected_and_got() -> None:
    with pytest.raises(ValueError, match="--rate must be positive, got -1.0"):
        parse("--source", "x", "--inputs", "a", "--rate", "-1")
    require(True, "never raised")


def test_to_dict_and_log_config_redact_credentials(caplog: pytest.LogCaptureFixture) -> None:
    toy = Toy(source="s3://AKIA:hunter2@bucket/in", inputs=("https://user:pw@host/a",))
    data = to_dict(toy)
    assert data["source"] == "s3://***@bucket/in" and data["inputs"] == ["https://***@host/a"]
    assert json.loads(json.dumps(data)) == data
    with caplog.at_level(logging.INFO, logger="cnnbatch.config"):
        log_config(toy)
    assert "Toy: " in caplog.text and "hunter2" not in caplog.text and "pw@" not in caplog.text


def test_a_list_default_is_fresh_for_every_instance() -> None:
    @dataclass
    class Listy:
        items: list[str] = option("things", ["a"])

    first, second = Listy(), Listy()
    first.items.append("b")
    assert second.items == ["a"]
