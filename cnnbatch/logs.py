"""Logging for every process cnnbatch runs in (the CLI, Ray actors, the training task), and quiet native start-up.

TensorFlow's C++ runtime writes start-up lines straight to file descriptor 2 before Python's logging exists
(``oneDNN custom operations are on``, ``Could not find cuda drivers``, ``failed call to cuInit`` on a machine
without a GPU): nothing a user can act on, and read as failures. :func:`native_stderr_filtered` captures the
descriptor while such code runs and passes every other line through, so real warnings still reach the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

# Lines TensorFlow and absl print at start-up on every machine, or on one without CUDA. Anything else passes.
NATIVE_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|oneDNN custom operations are on"
    r"|Could not find cuda drivers on your machine"
    r"|failed call to cuInit"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|TF-TRT Warning: Could not find TensorRT"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow"
)
_capture_lock = threading.Lock()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (a redirected or captured stream), so a
    handler installed once never writes to a stream that has since been closed."""

    @property
    def stream(self) -> Any:  # logging's own attribute
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:  # logging.StreamHandler.__init__ assigns it; sys.stderr always wins
        pass


def setup_logging(level: str | None = None) -> None:
    """cnnbatch's loggers at ``level`` (or ``CNNBATCH_LOG_LEVEL``, default INFO), other libraries at WARNING."""
    level = (level or os.environ.get("CNNBATCH_LOG_LEVEL") or "INFO").upper()
    root = logging.getLogger()
    if not any(getattr(h, "_cnnbatch", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._cnnbatch = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    logging.getLogger("cnnbatch").setLevel(level)
    root.setLevel(logging.WARNING)
    quiet_native_logs()


def quiet_native_logs() -> None:
    """Environment settings that keep TensorFlow's C++ INFO and WARNING lines out of the log (its errors stay)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def filter_native_lines(text: str, noise: re.Pattern[str] = NATIVE_NOISE) -> str:
    """``text`` without the lines that match ``noise``."""
    return "".join(line for line in text.splitlines(keepends=True) if not noise.search(line))


@contextlib.contextmanager
def native_stderr_filtered(noise: re.Pattern[str] = NATIVE_NOISE) -> Iterator[None]:
    """Capture file descriptor 2 (what C++ code writes) while the block runs; replay the lines that are not noise.

    Python-level writes to ``sys.stderr`` in the meantime are captured and replayed too, in order."""
    with _capture_lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no usable descriptor 2 (embedded interpreter): nothing to filter
            yield
            return
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                kept = filter_native_lines(capture.read().decode("utf-8", "replace"), noise)
                if kept:
                    sys.stderr.write(kept)
                    sys.stderr.flush()
