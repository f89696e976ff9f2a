"""One writer per output: the ``_LOCK`` on a local folder (acquire, release, refusal, stale and dead-owner
takeover, losing it) and on moto's S3 (exactly one exclusive create wins, takeover, the heartbeat thread)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest

from cnnbatch import lock as lockmod
from cnnbatch import storage
from cnnbatch.lock import LOCK_STALE_SECONDS, LockHeld, OutputLock
from cnnbatch.output import OutputDataset, OutputError

from .conftest import S3Server


def local_lock(tmp_path: Path, **kwargs) -> OutputLock:
    return OutputLock(fsspec.filesystem("file"), str(tmp_path / "_LOCK"), **kwargs)


def read_lock(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "_LOCK").read_text())


def write_holder(tmp_path: Path, **fields) -> dict:
    holder = {"owner": "other:1:abc", "machine": "other-host/boot", "pid": 1, "pid_started": "1",
              "heartbeat": time.time(), **fields}
    (tmp_path / "_LOCK").write_text(json.dumps(holder))
    return holder


def gone_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_acquire_records_the_owner_and_release_removes_it(tmp_path: Path) -> None:
    lock = local_lock(tmp_path)
    lock.acquire(str(tmp_path), wait_seconds=0)
    try:
        holder = read_lock(tmp_path)
        assert holder["owner"] == lock.owner and holder["pid"] == lock.pid and holder["machine"] == lock.machine
        assert holder["pid_started"] and abs(holder["heartbeat"] - time.time()) < 60
    finally:
        lock.release()
    assert not (tmp_path / "_LOCK").exists()
    lock.release()  # twice: nothing left to remove, no error


def test_a_live_holder_is_refused_naming_it(tmp_path: Path) -> None:
    write_holder(tmp_path, owner="busy-host:7:f00d")
    with pytest.raises(LockHeld, match=r"being written by another run \(busy-host:7:f00d, heartbeat \d+s ago\)"):
        local_lock(tmp_path).acquire(str(tmp_path), wait_seconds=0)
    assert read_lock(tmp_path)["owner"] == "busy-host:7:f00d"  # untouched


@pytest.mark.parametrize("what, fields, reason", [
    ("stale heartbeat", {"heartbeat": time.time() - LOCK_STALE_SECONDS - 60}, "last heartbeat"),
    ("unreadable lock", None, "the lock file is unreadable"),
])
def test_a_stale_or_unreadable_lock_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture, what: str,
                                                  fields: dict | None, reason: str) -> None:
    if fields is None:
        (tmp_path / "_LOCK").write_text("{not json")
    else:
        write_holder(tmp_path, **fields)
    lock = local_lock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cnnbatch.lock"):
        lock.acquire(str(tmp_path), wait_seconds=0)
    try:
        assert read_lock(tmp_path)["owner"] == lock.owner, what
        assert "taking over the lock" in caplog.text and reason in caplog.text
    finally:
        lock.release()


def test_a_dead_owner_on_this_machine_is_taken_over_at_once(tmp_path: Path) -> None:
    lock = local_lock(tmp_path)
    write_holder(tmp_path, machine=lock.machine, pid=gone_pid())  # fresh heartbeat, but its process is gone
    assert "on this machine is gone" in lock.stale_reason(read_lock(tmp_path))
    lock.acquire(str(tmp_path), wait_seconds=0)
    try:
        assert read_lock(tmp_path)["owner"] == lock.owner
    finally:
        lock.release()


def test_a_reused_pid_is_told_from_the_live_owner(tmp_path: Path) -> None:
    lock = local_lock(tmp_path)
    started = lockmod._process_started(lock.pid)
    alive = {"machine": lock.machine, "pid": lock.pid, "pid_started": started, "heartbeat": time.time()}
    assert lock.stale_reason(alive) is None
    reused = {**alive, "pid_started": f"{started}0"}
    assert "the pid now belongs to another process" in lock.stale_reason(reused)
    elsewhere = {**alive, "machine": "other-host/boot", "pid": gone_pid()}
    assert lock.stale_reason(elsewhere) is None  # another machine's pids say nothing here: only the heartbeat


def test_heartbeat_refreshes_its_own_lock_and_notices_another_owner(tmp_path: Path) -> None:
    lock = local_lock(tmp_path)
    lock.acquire(str(tmp_path), wait_seconds=0)
    try:
        holder = read_lock(tmp_path)
        holder["heartbeat"] = 1.0
        (tmp_path / "_LOCK").write_text(json.dumps(holder))
        lock.heartbeat()
        assert read_lock(tmp_path)["heartbeat"] > 1.0 and not lock.lost
        other = write_holder(tmp_path, owner="thief:2:beef")
        lock.heartbeat()
        assert lock.lost and read_lock(tmp_path) == other  # noticed, and the other run's lock left as it is
    finally:
        lock.release()
    assert read_lock(tmp_path)["owner"] == "thief:2:beef"  # not ours: release leaves it


def test_the_output_maps_a_held_lock_to_an_output_error(tmp_path: Path) -> None:
    out = OutputDataset(str(tmp_path))
    lock = out.acquire_lock()
    try:
        with pytest.raises(OutputError, match="being written by another run"):
            OutputDataset(str(tmp_path)).acquire_lock()
    finally:
        lock.release()


# --- on S3 (moto's server over real HTTP) ----------------------------------------------------------------------

def s3fs_for(env: S3Server):
    """A client configured by the environment alone (``s3_env`` set it), as cnnbatch's own are."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def test_create_exclusive_on_s3_has_exactly_one_winner(s3_env: S3Server) -> None:
    fs = s3fs_for(s3_env)
    path = f"{s3_env.new_bucket()}/out/_LOCK"
    contenders = 8
    barrier = threading.Barrier(contenders)
    results: dict[int, bool] = {}

    def contend(index: int) -> None:
        barrier.wait()
        results[index] = storage.create_exclusive(fs, path, f"owner {index}".encode())

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    assert fs.cat_file(path) == f"owner {winners[0]}".encode()
    assert storage.create_exclusive(fs, path, b"late") is False


def test_output_lock_on_s3_refuses_takes_over_and_notices_loss(s3_env: S3Server) -> None:
    uri = f"s3://{s3_env.new_bucket()}/features"
    output = OutputDataset(uri)
    lock = output.acquire_lock()
    with pytest.raises(OutputError, match="being written by another run"):
        OutputDataset(uri).acquire_lock()
    lock.release()
    assert not output.fs.exists(f"{output.path}/_LOCK")

    # A lock whose heartbeat stopped long ago (a driver on another machine that died) is taken over.
    dead = {"owner": "other-host:123:abc", "machine": "other-host/boot", "pid": 123, "heartbeat": 1.0}
    output.fs.pipe_file(f"{output.path}/_LOCK", json.dumps(dead).encode())
    lock = output.acquire_lock()
    assert json.loads(output.fs.cat_file(f"{output.path}/_LOCK"))["owner"] == lock.owner

    # Another run overwrote the lock (both took over the same stale lock): the next beat notices.
    output.fs.pipe_file(f"{output.path}/_LOCK", json.dumps({**dead, "heartbeat": 9e12}).encode())
    lock.heartbeat()
    assert lock.lost
    lock.release()  # not ours any more: left alone
    assert json.loads(output.fs.cat_file(f"{output.path}/_LOCK"))["owner"] == dead["owner"]


def test_lock_heartbeat_thread_refreshes_on_s3(s3_env: S3Server) -> None:
    uri = f"s3://{s3_env.new_bucket()}/features"
    output = OutputDataset(uri)
    lock = OutputLock(output.fs, f"{output.path}/_LOCK", heartbeat_seconds=0.2)
    beats = threading.Semaphore(0)
    beat = lock.heartbeat

    def counted_beat() -> None:  # the thread's own beat, then a signal: the test waits on beats, not on time
        beat()
        beats.release()

    lock.heartbeat = counted_beat  # type: ignore[method-assign]
    lock.acquire(uri, wait_seconds=0)
    try:
        first = json.loads(output.fs.cat_file(lock.path))["heartbeat"]
        assert beats.acquire(timeout=30) and beats.acquire(timeout=30), "the heartbeat thread did not beat twice"
        assert json.loads(output.fs.cat_file(lock.path))["heartbeat"] > first
        assert not lock.lost
    finally:
        lock.release()


