"""Logging and quiet native start-up: TensorFlow's C++ lines filtered from file descriptor 2 while every other line
(from C, from a child process, from Python) still reaches stderr, in order; cnnbatch's log handler."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest

from cnnbatch import logs
from cnnbatch.logs import NATIVE_NOISE, filter_native_lines, native_stderr_filtered, setup_logging

NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1.0 1 cpu_feature_guard.cc:210] oneDNN custom operations are on. You may see slightly different",
    "I0000 cuda_executor.cc] Could not find cuda drivers on your machine, GPU will not be used.",
    "E0000 cuda_executor.cc:1] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "E0000 cuda_dnn.cc] Unable to register cuDNN factory: Attempting to register factory for plugin cuDNN when one "
    "has already been registered",
    "E0000 computation placer already registered. Please check linkage and avoid linking the same target more "
    "than once.",
    "W0000 TF-TRT Warning: Could not find TensorRT",
    "I0000 This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.",
]


def test_every_known_start_up_line_is_noise_and_real_lines_are_kept() -> None:
    assert all(NATIVE_NOISE.search(line) for line in NOISE)
    text = "\n".join([NOISE[1], "W0000 real problem: out of memory", NOISE[3], "Traceback (most recent call last):",
                      ""])
    assert filter_native_lines(text) == "W0000 real problem: out of memory\nTraceback (most recent call last):\n"
    assert filter_native_lines("no newline at the end") == "no newline at the end"
    assert filter_native_lines("") == ""


def test_another_noise_pattern_can_be_given() -> None:
    assert filter_native_lines("drop me\nkeep me\n", re.compile("drop")) == "keep me\n"


def test_what_c_code_writes_to_fd_2_is_filtered_and_the_rest_replayed(capfd: pytest.CaptureFixture[str]) -> None:
    with native_stderr_filtered():
        os.write(2, f"{NOISE[1]}\nW0000 a real warning from C\n{NOISE[2]}\n".encode())
        os.write(1, b"stdout is left alone\n")
    captured = capfd.readouterr()
    assert captured.err == "W0000 a real warning from C\n"
    assert captured.out == "stdout is left alone\n"


def test_nothing_is_written_when_everything_was_noise(capfd: pytest.CaptureFixture[str]) -> None:
    with native_stderr_filtered():
        os.write(2, (NOISE[0] + "\n").encode())
    assert capfd.readouterr().err == ""


def test_the_descriptor_is_restored_when_the_block_raises(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError, match="inside"):
        with native_stderr_filtered():
            os.write(2, b"before the error\n")
            raise RuntimeError("inside")
    os.write(2, b"after the block\n")
    assert capfd.readouterr().err == "before the error\nafter the block\n"


def test_a_child_process_and_python_writes_keep_their_order() -> None:
    """In a fresh process, where ``sys.stderr`` is descriptor 2: a child's lines, Python's and C's, interleaved,
    come out in the order they were written, less the noise."""
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        from cnnbatch.logs import native_stderr_filtered
        with native_stderr_filtered():
            os.write(2, b{NOISE[1]!r} + b"\\n" + b"1 from C\\n")
            print("2 from Python", file=sys.stderr)
            subprocess.run([sys.executable, "-c",
                            "import os; os.write(2, b'3 from a child\\\\n' + b{NOISE[3]!r} + b'\\\\n')"], check=True)
            print("4 from Python again", file=sys.stderr)
        print("5 after the block", file=sys.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["1 from C", "2 from Python", "3 from a child", "4 from Python again",
                                          "5 after the block"]


@pytest.fixture()
def clean_root_logger():
    root = logging.getLogger()
    before = list(root.handlers), root.level, logging.getLogger("cnnbatch").level
    yield root
    for handler in [h for h in root.handlers if h not in before[0]]:
        root.removeHandler(handler)
    root.setLevel(before[1])
    logging.getLogger("cnnbatch").setLevel(before[2])


def test_setup_logging_installs_one_handler_writing_to_the_current_stderr(
        clean_root_logger: logging.Logger, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # as in a fresh process: no cnnbatch handler yet (the original list comes back after the test)
    monkeypatch.setattr(clean_root_logger, "handlers",
                        [h for h in clean_root_logger.handlers if not getattr(h, "_cnnbatch", False)])
    monkeypatch.delenv("CNNBATCH_LOG_LEVEL", raising=False)
    setup_logging()
    setup_logging("debug")  # a second call adds no second handler
    ours = [h for h in clean_root_logger.handlers if getattr(h, "_cnnbatch", False)]
    assert len(ours) == 1
    assert logging.getLogger("cnnbatch").level == logging.DEBUG and clean_root_logger.level == logging.WARNING
    logging.getLogger("cnnbatch.test").debug("hello from cnnbatch")
    logging.getLogger("some.library").info("chatter")  # other libraries: WARNING and up only
    err = capsys.readouterr().err
    assert "DEBUG cnnbatch.test: hello from cnnbatch" in err and "chatter" not in err


def test_log_level_comes_from_the_environment(clean_root_logger: logging.Logger,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNBATCH_LOG_LEVEL", "warning")
    setup_logging()
    assert logging.getLogger("cnnbatch").level == logging.WARNING


def test_quiet_native_logs_sets_a_default_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    logs.quiet_native_logs()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # a user asking for everything gets it
    logs.quiet_native_logs()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
