"""Run a measured command in its own process and watch its process tree: wall time, peak RSS, foreign CPU load.

Peak RSS is sampled (every ``interval`` seconds) per role: the ``driver`` (the command's own process) and the Ray
``workers`` (processes titled ``ray::ShardWorker``); Ray's own services are reported apart. The CPU time that
processes outside the tree used meanwhile is recorded too: on a shared machine it says how much a figure was
disturbed.

The sampler itself runs on the measured machine: one sample of a Ray job's ~11 processes takes ~2 ms of a core
(psutil reading /proc), against ~0.2 ms for a one-process run, so sampling 5 times a second charged a job ~0.5% of
this 2-core machine more than the bare model it is compared with. Twice a second is enough for peaks that build up
over a shard.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
WORKER_TITLE = "ray::ShardWorker"


def psutil_module() -> Any:
    """psutil, from the environment or from the copy Ray ships (``import ray`` puts it on the path)."""
    import psutil  # the test extra's

    return psutil


@dataclass
class RunResult:
    """One measured command: its JSON result line, wall time and memory."""

    argv: list[str]
    seconds: float
    returncode: int
    result: dict[str, Any] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # driver, worker (largest), workers (sum), ray
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # CPU time per role: driver, worker, ray
    foreign_cpu: float = 0.0  # CPU-seconds per second used by processes outside the tree (0..cores)
    stderr_tail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _role(proc: Any, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "driver"
    try:
        title = " ".join(proc.cmdline()[:1])
    except Exception:  # noqa: BLE001 - a process that just ended has no cmdline
        return "ray"
    return "worker" if title.startswith(WORKER_TITLE) else "ray"


SAMPLE_SECONDS = 0.5


class TreeSampler(threading.Thread):
    """Samples the RSS of a process tree and the machine's CPU use until stopped."""

    def __init__(self, pid: int, interval: float = SAMPLE_SECONDS):
        super().__init__(daemon=True)
        self.psutil = psutil_module()
        self.pid, self.interval = pid, interval
        self.peak: dict[str, float] = {"driver": 0.0, "worker": 0.0, "workers": 0.0, "ray": 0.0}
        self.tree_cpu: dict[int, float] = {}
        self.roles: dict[int, str] = {}
        self._stop_event = threading.Event()
        self._cpu_start = self._busy()

    def _busy(self) -> float:
        times = self.psutil.cpu_times()
        return times.user + times.nice + times.system + getattr(times, "irq", 0) + getattr(times, "softirq", 0)

    def sample(self) -> None:
        try:
            root = self.psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except self.psutil.NoSuchProcess:
            return
        totals = {"driver": 0.0, "workers": 0.0, "ray": 0.0}
        for proc in procs:
            try:
                rss = proc.memory_info().rss / 2**20
                cpu = proc.cpu_times()
                self.tree_cpu[proc.pid] = cpu.user + cpu.system
            except self.psutil.Error:
                continue
            role = _role(proc, self.pid)
            if self.roles.get(proc.pid) != "worker":  # an idle Ray worker becomes the actor: keep "worker"
                self.roles[proc.pid] = role
            if role == "worker":
                self.peak["worker"] = max(self.peak["worker"], rss)
                totals["workers"] += rss
            else:
                totals[role] += rss
        for role, value in totals.items():
            self.peak[role] = max(self.peak[role], value)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def cpu_by_role(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for pid, seconds in self.tree_cpu.items():
            role = self.roles.get(pid, "ray")
            totals[role] = round(totals.get(role, 0.0) + seconds, 2)
        return totals

    def stop(self, elapsed: float) -> float:
        """Stop sampling; return the foreign CPU load (cores busy outside the tree, on average)."""
        self._stop_event.set()
        self.join()
        busy = self._busy() - self._cpu_start
        return max(0.0, (busy - sum(self.tree_cpu.values())) / elapsed) if elapsed > 0 else 0.0


def measured_env() -> dict[str, str]:
    """Every measured process at the same priority (Ray's workers default to nice 15, a user's script to 0), and
    each job on a Ray cluster of its own: ``local`` never attaches to a cluster some other program started."""
    return {**os.environ, "RAY_worker_niceness": "0", "RAY_ADDRESS": "local", "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONUNBUFFERED": "1", "CNNBATCH_LOG_LEVEL": "WARNING"}


def run_measured(argv: list[str], timeout: float = 400, interval: float = SAMPLE_SECONDS) -> RunResult:
    """Run ``argv`` (from the repo root), sample its tree, and parse the last stdout line as JSON."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=measured_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    sampler = TreeSampler(proc.pid, interval)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    elapsed = time.perf_counter() - started
    foreign = sampler.stop(elapsed)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    result = RunResult(argv=argv, seconds=elapsed, returncode=proc.returncode,
                       result=json.loads(lines[-1]) if lines else {},
                       peak_rss_mb={k: round(v, 1) for k, v in sampler.peak.items()},
                       cpu_seconds=sampler.cpu_by_role(), foreign_cpu=round(foreign, 3), stderr_tail=err[-2000:])
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark command failed (exit {proc.returncode}): {' '.join(argv)}\n{err[-2000:]}")
    return result


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
