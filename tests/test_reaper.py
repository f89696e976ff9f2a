"""reaper: finding a cluster's processes (descendants, the environment marker, files open under its session
directory) and stopping them; a reaper that stops what is left when its driver ends. Plain subprocesses, no Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnnbatch import reaper

pytestmark = pytest.mark.skipif(not reaper.supported(), reason="the reaper needs Linux's /proc and pidfd_open")

SLEEPER = "import sys, time; f = open(sys.argv[1], 'w') if len(sys.argv) > 1 else None; time.sleep(600)"


def sleeper(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", SLEEPER, *args], env={**os.environ, **(env or {})})


def test_processes_are_found_by_tree_marker_and_session_files(tmp_path: Path) -> None:
    session = tmp_path / "session"
    (session / "logs").mkdir(parents=True)
    plain, marked, logging = sleeper(), sleeper(env={reaper.MARKER: "tok-1"}), sleeper(str(session / "logs" / "a"))
    try:
        while not (session / "logs" / "a").exists():  # the log file is open once it exists
            assert logging.poll() is None
        assert plain.pid in reaper.descendants([os.getpid()])
        assert marked.pid in reaper.marked_processes(f"{reaper.MARKER}=tok-1")
        assert plain.pid not in reaper.marked_processes(f"{reaper.MARKER}=tok-1")
        assert reaper.marked_processes(f"{reaper.MARKER}=") == set()
        assert logging.pid in reaper.session_processes(str(session))
        assert plain.pid not in reaper.session_processes(str(session))
        reaper.stop({plain.pid, marked.pid, logging.pid}, grace=5)
        assert [p.wait(timeout=10) for p in (plain, marked, logging)] == [-15, -15, -15]
    finally:
        for process in (plain, marked, logging):
            process.kill()


def test_the_reaper_stops_the_cluster_when_its_driver_ends(tmp_path: Path) -> None:
    """A stand-in driver (a process that ends when told) and a stand-in cluster process carrying the marker."""
    driver = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    member = sleeper(env={reaper.MARKER: "tok-2"})
    watcher = subprocess.Popen([sys.executable, "-m", "cnnbatch.reaper", "--driver", str(driver.pid), "--token",
                                "tok-2", str(member.pid)])
    try:
        assert watcher.poll() is None and member.poll() is None
        driver.stdin.close()  # the driver ends
        driver.wait(timeout=10)
        assert watcher.wait(timeout=30) == 0
        assert member.wait(timeout=10) == -15
    finally:
        for process in (driver, member, watcher):
            process.kill()
