"""Progress: a tqdm bar on a terminal, periodic plain log lines elsewhere (Ray job logs, CI)."""

from __future__ import annotations

import io
import logging

import pytest

from cnnbatch import progress
from cnnbatch.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_counts_add_up_and_the_rate_is_images_over_elapsed_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 104.0, 104.0])  # started at 100; the rate is read at 104
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar = Progress(stream=io.StringIO())
    bar.update(shards=1, images=30, errors=2)
    assert (bar.shards, bar.images, bar.errors) == (1, 30, 2)
    assert bar.rate == pytest.approx(30 / 4)


def test_without_a_terminal_it_logs_a_line_once_the_interval_passed(monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    stream = io.StringIO()
    bar = Progress(what="images", stream=stream)
    with caplog.at_level(logging.INFO, logger="cnnbatch.progress"):
        now[0] = progress.LOG_EVERY_SECONDS / 2
        bar.update(shards=1, images=10)
        assert caplog.records == []  # too soon
        now[0] = progress.LOG_EVERY_SECONDS
        bar.update(shards=1, images=20, errors=1)
    (record,) = caplog.records
    assert record.getMessage() == (f"progress: 2 shards, 30 images, 1 errors, "
                                   f"{30 / progress.LOG_EVERY_SECONDS:.1f} images/s")
    assert stream.getvalue() == ""  # no bar drawn where nobody watches
    bar.close()


def test_on_a_terminal_it_draws_a_bar_instead(caplog: pytest.LogCaptureFixture) -> None:
    terminal = Terminal()
    bar = Progress(what="images", total_shards=4, stream=terminal)
    with caplog.at_level(logging.INFO, logger="cnnbatch.progress"):
        bar.update(shards=2, images=64, errors=1)
    bar.close()
    drawn = terminal.getvalue()
    assert "2/4" in drawn and "64 images, 1 errors" in drawn
    assert caplog.records == []
