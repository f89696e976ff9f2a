"""One writer per output: the ``_LOCK`` file, its heartbeat, and taking over the lock of a run that died."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import fsspec

from . import storage

log = logging.getLogger(__name__)

# A lock not refreshed for this long belongs to a dead run and may be taken over; the holder refreshes it from a
# background thread every LOCK_HEARTBEAT_SECONDS, so only a dead (or frozen) driver lets it go stale.
LOCK_STALE_SECONDS = 300
LOCK_HEARTBEAT_SECONDS = 30


def heartbeat_of(holder: dict[str, Any]) -> float | None:
    """The Unix time of a lock's last heartbeat, or None when the lock file does not say (garbage, foreign)."""
    try:
        value = float(holder["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return None
    return value if value > 0 else None


class LockHeld(RuntimeError):
    """The lock belongs to a run that is alive; the message says whose and what to do."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _process_started(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, Linux), to tell a live owner from a reused pid; None if the
    process does not exist, "" when it exists but this platform cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            # Field 22 is the start time; the command name (field 2) may hold spaces, so split after its ")".
            return handle.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


class OutputLock:
    """One writer per output: an exclusively created ``_LOCK`` with its owner and a heartbeat time.

    The owner refreshes the heartbeat from a daemon thread. Another run takes the lock over when the heartbeat
    is older than ``LOCK_STALE_SECONDS``, or at once when the owner ran on the same machine and its process is
    gone (a driver killed with SIGKILL). Object stores cannot delete conditionally, so two runs taking over the
    same stale lock at the same instant could both believe they hold it: each beat re-reads the lock, and a run
    that finds another owner there sets :attr:`lost`, and the pipeline stops handing out shards.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, heartbeat_seconds: float = LOCK_HEARTBEAT_SECONDS):
        self.fs, self.path = fs, path
        self.host = socket.gethostname()
        self.machine = f"{self.host}/{_boot_id()}"
        self.pid = os.getpid()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:12]}"
        self.heartbeat_seconds = heartbeat_seconds
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "machine": self.machine, "pid": self.pid,
                           "pid_started": _process_started(self.pid), "heartbeat": time.time()}).encode()

    def acquire(self, uri: str, wait_seconds: float) -> None:
        deadline = time.monotonic() + wait_seconds
        while True:
            if storage.create_exclusive(self.fs, self.path, self._body()):
                self._start_heartbeat()
                return
            holder = self._read()
            if holder is None:  # released between our attempt and this read: try again
                continue
            reason = self.stale_reason(holder)
            if reason:
                log.warning("taking over the lock on %s: %s", storage.redact(uri), reason)
                self._remove_if_unchanged(holder)
                continue
            if time.monotonic() >= deadline:
                age = time.time() - (heartbeat_of(holder) or time.time())
                raise LockHeld(
                    f"output {storage.redact(uri)} is being written by another run ({holder.get('owner', '?')}, "
                    f"heartbeat {age:.0f}s ago); wait for it to finish or use another --output (a lock whose run "
                    f"died is taken over after {LOCK_STALE_SECONDS}s without heartbeat, at once on its own machine)"
                )
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))

    def stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why ``holder``'s lock may be taken over, or None while its run may be alive."""
        heartbeat = heartbeat_of(holder)
        if heartbeat is None:
            return "the lock file is unreadable (no owner or heartbeat in it)"
        age = time.time() - heartbeat
        if age > LOCK_STALE_SECONDS:
            return f"last heartbeat {age:.0f}s ago"
        pid = holder.get("pid")
        if holder.get("machine") == self.machine and isinstance(pid, int):
            started = _process_started(pid)
            if started is None:
                return f"its process {pid} on this machine is gone"
            if started and holder.get("pid_started") and started != holder["pid_started"]:
                return f"its process {pid} on this machine is gone (the pid now belongs to another process)"
        return None

    def _remove_if_unchanged(self, holder: dict[str, Any]) -> None:
        current = self._read()
        if current is not None and current.get("owner") == holder.get("owner") \
                and current.get("heartbeat") == holder.get("heartbeat"):
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

    def _read(self) -> dict[str, Any] | None:
        """The lock's content; None when there is no lock; {} for an unreadable one (treated as stale)."""
        try:
            data = json.loads(storage.read_bytes(self.fs, self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat_forever, name="cnnbatch-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat_forever(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self.heartbeat()
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried at the next one
                log.warning("could not refresh the output lock: %s", storage.describe_error(exc))

    def heartbeat(self) -> None:
        holder = self._read()
        if holder is not None and holder.get("owner") == self.owner:
            storage.write_bytes_atomic(self.fs, self.path, self._body())
        elif not self.lost:
            self.lost = True
            log.error("the lock on this output is now held by %s; this run stops handing out shards",
                      (holder or {}).get("owner", "nobody"))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        holder = self._read()
        if holder is not None and holder.get("owner") == self.owner:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass
