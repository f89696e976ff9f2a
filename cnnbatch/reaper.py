"""A private local cluster dies with its driver: when a job's driver is killed (SIGKILL, OOM), its Ray processes
(GCS, raylet, dashboard and runtime-env agents, the actors) would live on. :func:`watch` starts this module as a
small process of its own session that waits on the driver's exit (a pidfd, no polling) and then stops every
process of the cluster: the ones Ray started, their descendants, every process carrying the cluster's marker in
its environment (set before Ray starts, so the processes Ray spawns inherit it) and every process holding a file
open under the cluster's session directory (Ray's agents, re-parented to init when the raylet died).

Linux only (``/proc`` and ``pidfd_open``); elsewhere nothing is watched and Ray's own cleanup applies.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence

GRACE_SECONDS = 3.0


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open") and os.path.isdir("/proc")


def children_map() -> dict[int, list[int]]:
    """Every process's children, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    return children


def descendants(roots: Iterable[int]) -> set[int]:
    """``roots`` and every process below them."""
    tree = children_map()
    found: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(tree.get(pid, []))
    return found


MARKER = "CNNBATCH_PRIVATE_CLUSTER"


def marked_processes(*assignments: str) -> set[int]:
    """Processes whose environment holds one of ``assignments`` (``NAME=value``; this user's processes only:
    others' environments are unreadable)."""
    needles = {assignment.encode() for assignment in assignments if assignment.partition("=")[2]}
    if not needles:
        return set()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    if needles & set(handle.read().split(b"\0")):
                        found.add(int(entry))
            except OSError:
                continue
    return found


def session_processes(session_dir: str) -> set[int]:
    """Processes holding a file open under the session directory (each Ray process writes its logs there,
    even one whose environment and command line its process title has overwritten)."""
    if not session_dir:
        return set()
    prefix = session_dir.rstrip("/") + "/"
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(prefix):
                    found.add(int(entry))
                    break
        except OSError:
            continue
    return found


def mark_environment() -> str:
    """Put a fresh marker in this process's environment (before Ray starts) and return its token."""
    token = f"{os.getpid()}-{time.time_ns()}"
    os.environ[MARKER] = token
    return token


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet waited for by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def stop(pids: set[int], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                continue
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)


def reap(driver: int, cluster: Sequence[int], token: str, session_dir: str = "") -> bool:
    """Wait until the driver ends, then stop what is left of its cluster (nothing, after a clean shutdown; the
    GCS itself may go first when the driver is killed). Returns whether it could watch."""
    try:
        driver_fd: int | None = os.pidfd_open(driver)
    except ProcessLookupError:  # it ended before this process could watch it: stop the cluster now
        driver_fd = None
    except (OSError, AttributeError):
        return False
    # pidfds hold on to these very processes: a pid reused by another process after the cluster ended is not one
    handles = {}
    for pid in cluster:
        try:
            handles[pid] = os.pidfd_open(pid)
        except OSError:
            continue
    if driver_fd is not None:
        select.select([driver_fd], [], [])
    ended, _, _ = select.select(list(handles.values()), [], [], 0)
    cluster = [pid for pid, handle in handles.items() if handle not in ended]
    # Ray's agents get an environment of their own (no marker), their process titles overwrite their command
    # lines, and they outlive a killed raylet, re-parented to init: their open log files name the session.
    doomed = descendants(cluster) | marked_processes(f"{MARKER}={token}") | session_processes(session_dir)
    stop(doomed - {os.getpid()})
    return True


def watch(cluster: Sequence[int], token: str, session_dir: str = "") -> subprocess.Popen[bytes] | None:
    """Start the reaper for this driver and its private cluster's processes (Ray's ``all_processes``, and every
    process carrying ``token``: see :func:`mark_environment`)."""
    if not supported() or not cluster:
        return None
    env = {k: v for k, v in os.environ.items() if k != MARKER}  # the reaper is not one of the cluster's
    command = [sys.executable, "-m", "cnnbatch.reaper", "--driver", str(os.getpid()), "--token", token,
               "--session-dir", session_dir, *map(str, cluster)]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="stop a private Ray cluster when its driver dies")
    parser.add_argument("--driver", type=int, required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--session-dir", default="")
    parser.add_argument("cluster", type=int, nargs="+")
    args = parser.parse_args(argv)
    reap(args.driver, args.cluster, args.token, args.session_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
