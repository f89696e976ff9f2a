"""Faults with Ray: a killed actor, a killed driver, a shard that keeps failing, two runs on one output. After
each, every input image is in the output exactly once (features or ``_errors``). (Crash leftovers without Ray:
tests/test_output.py.)"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from ..conftest import REPO, run_cli
from .conftest import held, wait_until_held

FAULT_IMAGE_SIZE = 64  # ~2 s per 60-image shard on this CPU: slow enough to kill an actor mid-shard
SHARD_SIZE = 60
BROKEN = "dots/dots-0059.png"  # one input that cannot be decoded: it must land in _errors


# --- with Ray: a killed actor, a killed driver, a shard that keeps failing ---------------------------------------

@pytest.fixture(scope="module")
def fault_input(tmp_path_factory) -> Path:
    from cnnbatch.sample import write_sample

    root = tmp_path_factory.mktemp("fault-input")
    write_sample(root, per_class=SHARD_SIZE, size=48)  # 180 images: 3 shards of 60
    (root / "train" / "dots" / BROKEN.split("/")[1]).write_bytes(b"\x89PNG but not an image")
    return root / "train"


def input_keys(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def assert_exactly_once(output: Path, root: Path) -> None:
    features = ds.dataset(str(output)).to_table().column("key").to_pylist()
    errors = pq.read_table(output / "_errors").column("key").to_pylist()
    assert len(features) == len(set(features)) and not set(features) & set(errors)
    assert sorted(features + errors) == input_keys(root)
    assert errors == [BROKEN]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def stats_pid(output: Path, shard: str) -> int:
    return int(json.loads((output / "_stats" / f"{shard}.json").read_text())["worker"].rsplit(":", 1)[1])


def extract_config(root: Path, output: Path):
    from cnnbatch.extract import ExtractConfig

    return ExtractConfig(input=str(root), output=str(output), weights="random", image_size=FAULT_IMAGE_SIZE,
                         shard_size=SHARD_SIZE, batch_size=16, workers=1, gpus_per_worker=0)


def test_killed_actor_then_crash_leftovers_then_noop_rerun(ray_cluster, fault_input: Path, tmp_path: Path) -> None:
    """SIGKILL the actor while it works on shard 1 (held on its first image by a gate the test controls): Ray
    restarts it and redoes the shard. Then leave the debris of a crash in the output (a replaced part, a part
    without stats, a temp file): a rerun redoes exactly those shards. Then a rerun with nothing to do rewrites no
    file."""
    from concurrent.futures import ThreadPoolExecutor

    from cnnbatch.extract import prepare_extract, run_extract
    from cnnbatch.pipeline import run_sharded_job

    output, gate = tmp_path / "out", tmp_path / "gate"
    gate.mkdir()
    config = extract_config(fault_input, output)
    first_of_shard_1 = input_keys(fault_input)[SHARD_SIZE]
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(run_sharded_job, held(prepare_extract(config), gate, first_of_shard_1))
        killed = wait_until_held(gate, job)
        assert (output / "_stats" / "000000.json").exists() and not (output / "_stats" / "000001.json").exists()
        assert stats_pid(output, "000000") == killed
        os.kill(killed, signal.SIGKILL)
        summary = job.result(timeout=300)
    assert summary.ok and summary.shards_done == 3 and summary.images == 180
    assert stats_pid(output, "000001") != killed and stats_pid(output, "000002") != killed
    assert_exactly_once(output, fault_input)

    (output / "part-000001.parquet").write_bytes(b"PAR1 torn")
    (output / "_stats" / "000002.json").unlink()
    (output / "part-000002.parquet").write_bytes(b"garbage")
    leftover = output / ".part-000000.parquet.0badc0de.tmp"
    leftover.write_bytes(b"half")
    again = run_extract(config)
    assert again.ok and again.shards_skipped == 1 and again.shards_done == 2
    assert not leftover.exists()
    assert_exactly_once(output, fault_input)

    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in output.rglob("*") if p.is_file()}
    assert output / "_SUCCESS" in before
    noop = run_extract(config)
    assert noop.ok and noop.shards_done == 0 and noop.shards_skipped == 3
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in output.rglob("*") if p.is_file()} == before


def test_killed_driver_concurrent_run_refused_rerun_completes(ray_cluster, fault_input: Path,
                                                             tmp_path: Path) -> None:
    """Drivers attach to this module's cluster. A second run on the same output exits with a clear message and
    touches nothing; the first is killed with SIGKILL after a shard; a rerun takes over its lock (its process is
    gone), skips the done shards and finishes with every image once."""
    output = tmp_path / "out"
    args = ["extract", "--input", str(fault_input), "--output", str(output), "--weights", "random",
            "--image-size", str(FAULT_IMAGE_SIZE), "--shard-size", str(SHARD_SIZE), "--batch-size", "16",
            "--workers", "1", "--gpus-per-worker", "0"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "cnnbatch", *args], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (output / "_cnnbatch.json").exists() or driver.poll() is not None, 120, "the lock")
        lock, config_written = (output / "_LOCK").read_text(), (output / "_cnnbatch.json").stat().st_mtime_ns
        second = run_cli(*args, env={"RAY_ADDRESS": env["RAY_ADDRESS"]})
        assert second.returncode == 1
        assert "is being written by another run" in second.stderr and "Traceback" not in second.stderr
        assert json.loads((output / "_LOCK").read_text())["owner"] == json.loads(lock)["owner"]
        assert (output / "_cnnbatch.json").stat().st_mtime_ns == config_written
        wait_for(lambda: (output / "_stats" / "000000.json").exists() or driver.poll() is not None, 180,
                 "the first shard")
        assert driver.poll() is None, "the first run ended before it could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    done_before = {p.stem for p in (output / "_stats").glob("*.json")}
    assert (output / "_LOCK").exists() and not (output / "_SUCCESS").exists() and len(done_before) < 3

    rerun = run_cli(*args, env={"RAY_ADDRESS": env["RAY_ADDRESS"]})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"[{len(done_before)} already done]" in rerun.stdout
    assert "taking over the lock" in rerun.stderr
    assert not (output / "_LOCK").exists() and (output / "_SUCCESS").exists()
    assert_exactly_once(output, fault_input)


def webdataset_tar(images: list[Path]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for index, image in enumerate(images):
            for name, data in ((f"s{index:03d}{image.suffix}", image.read_bytes()),
                               (f"s{index:03d}.cls", image.parent.name.encode())):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def test_a_shard_that_keeps_failing_is_reported_then_retried_by_a_rerun(ray_cluster, sample_root: Path,
                                                                        tmp_path: Path, capsys) -> None:
    from cnnbatch.cli import main

    images = sorted((sample_root / "holdout").rglob("*.*"))
    tars = tmp_path / "tars"
    tars.mkdir()
    (tars / "good-0.tar").write_bytes(webdataset_tar(images[:3]))
    (tars / "good-1.tar").write_bytes(webdataset_tar(images[3:]))
    (tars / "mangled.tar").write_bytes(b"this is no tar archive " * 40)
    output = tmp_path / "out"
    args = ["extract", "--input", str(tars), "--output", str(output), "--weights", "random", "--image-size", "32",
            "--workers", "1", "--gpus-per-worker", "0"]

    assert main(args) == 1
    err = capsys.readouterr().err
    assert "shard mangled failed: ReadError" in err and "1 shards failed; rerun" in err
    failed = json.loads((output / "_FAILED").read_text())["failed"]
    assert list(failed) == ["mangled"] and "ReadError" in failed["mangled"]
    assert not (output / "_SUCCESS").exists()
    assert ds.dataset(str(output)).to_table().num_rows == 6  # the other shards were completed

    (tars / "mangled.tar").write_bytes(webdataset_tar(images[:2]))
    assert main(args) == 0
    assert "in 1 shards [2 already done]" in capsys.readouterr().out
    assert (output / "_SUCCESS").exists() and not (output / "_FAILED").exists()
    keys = ds.dataset(str(output)).to_table().column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 8
