"""A local run's private cluster dies with its driver: SIGKILL the driver of a running extract and every process it
started (GCS, raylet, agents, the actor) is gone within seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cnnbatch import reaper
from cnnbatch.sample import write_sample

from ..conftest import REPO


def test_a_killed_driver_takes_its_private_cluster_with_it(tmp_path: Path) -> None:
    images = write_sample(tmp_path / "in", per_class=40, size=64) / "train"
    output = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local cluster
    driver = subprocess.Popen([sys.executable, "-m", "cnnbatch", "extract", "--input", str(images), "--output",
                               str(output), "--weights", "random", "--image-size", "64", "--shard-size", "20",
                               "--batch-size", "4"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (output / "_stats" / "000000.json").exists():  # the actor is at work
            assert driver.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no shard finished"
            time.sleep(0.05)
        cluster = reaper.descendants([driver.pid]) - {driver.pid}
        assert len(cluster) >= 4, cluster  # GCS, raylet, agents, the actor: all started by this driver
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    deadline = time.monotonic() + 30
    while any(reaper.alive(pid) for pid in cluster):
        assert time.monotonic() < deadline, [_command(pid) for pid in cluster if reaper.alive(pid)]
        time.sleep(0.1)


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return f"{pid} (gone)"
