"""S3 end to end against moto's server over real HTTP: listing, exclusive creates, the lock, s3 -> s3 extraction.

Credentials and the endpoint come only from the standard ``AWS_*`` environment. The secret is fake but distinctive:
it must never show up in the CLI's output, Ray's logs, or anything written to the bucket.
"""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from cnnbatch import storage
from cnnbatch.lock import OutputLock
from cnnbatch.output import OutputDataset, OutputError
from cnnbatch.shards import list_shards

from .conftest import FAKE_AWS_KEY_ID, FAKE_AWS_SECRET, TEST_IMAGE_SIZE, S3Server, run_cli

# Names whose byte order trips naive sorts: "." < "/" < "0" < "A" < "_" < "a" < "é", a folder beside a file of
# the same stem, and a console-made "folder marker" key (ending in "/") that is no file.
TRICKY_NAMES = ["a.jpg", "a/b.jpg", "a/c/d.png", "a-b.jpg", "a0.jpg", "A.jpg", "a_b/x.jpg", "b.jpg",
                "z/é.jpg", "z/e.jpg", "z/y/0.jpg", "ab.jpg"]


def s3fs_for(env: S3Server):
    """A client configured by the environment alone (``s3_env`` set it), as cnnbatch's own are."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def upload_tree(fs, local: Path, bucket_prefix: str) -> list[str]:
    keys = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    for key in keys:
        fs.pipe_file(f"{bucket_prefix}/{key}", (local / key).read_bytes())
    return keys


def test_s3_listing_pages_stream_in_the_same_order_as_local(s3_env: S3Server, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "tree"
    for name in TRICKY_NAMES:
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(name.encode())
    bucket = s3_env.new_bucket()
    fs = s3fs_for(s3_env)
    upload_tree(fs, local, f"{bucket}/imgs")
    fs.pipe_file(f"{bucket}/imgs/z/", b"")  # a folder marker
    fs.pipe_file(f"{bucket}/imgs-sibling/a.jpg", b"x")  # shares the prefix string, not the folder

    local_fs, local_root = storage.filesystem(str(local))
    expected = [p[len(local_root) + 1:] for p in storage.iter_sorted_files(local_fs, local_root)]
    assert expected == sorted(TRICKY_NAMES)

    calls: list[dict] = []
    real_call = fs.call_s3

    def counting_call(method, *args, **kwargs):
        calls.append({"method": method, **kwargs})
        return real_call(method, *args, **kwargs)

    monkeypatch.setattr(fs, "call_s3", counting_call)
    listing = storage.iter_sorted_files(fs, f"{bucket}/imgs", page_size=3)
    first = next(listing)
    assert len(calls) == 1, "the first key must come from the first page, before the rest is listed"
    got = [first, *listing]
    assert [p[len(bucket) + len("/imgs/"):] for p in got] == expected
    pages = [c for c in calls if c["method"] == "list_objects_v2"]
    assert len(pages) == 5 and all(c["MaxKeys"] == 3 and "Delimiter" not in c for c in pages)

    # Shards (ids, keys, signatures aside) are the same whichever store holds the images.
    on_s3 = [(s.shard_id, s.paths) for s in list_shards(f"s3://{bucket}/imgs", shard_size=5)]
    on_disk = [(s.shard_id, s.paths) for s in list_shards(str(local), shard_size=5)]
    assert on_s3 == on_disk and len(on_s3) == 3


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
    lock.acquire(uri, wait_seconds=0)
    first = json.loads(output.fs.cat_file(lock.path))["heartbeat"]
    threading.Event().wait(0.8)
    assert json.loads(output.fs.cat_file(lock.path))["heartbeat"] > first
    lock.release()


# --- s3 -> s3 extraction through the CLI -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_extraction(s3_server: S3Server, sample_root: Path, vgg16_weights_file: Path, tmp_path_factory):
    """Images and the weights file uploaded to a bucket, then ``cnnbatch extract`` s3 -> s3 in a fresh process
    whose only credentials are the ``AWS_*`` variables (its own Ray cluster, logging into a temp dir we keep)."""
    import s3fs

    local = tmp_path_factory.mktemp("s3-input")
    for image in sorted((sample_root / "train").rglob("*.*")):
        target = local / image.relative_to(sample_root / "train")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(image.read_bytes())
    (local / "dots" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    fs = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint, key=FAKE_AWS_KEY_ID, secret=FAKE_AWS_SECRET,
                           skip_instance_cache=True, use_listings_cache=False)
    bucket = s3_server.new_bucket()
    keys = upload_tree(fs, local, f"{bucket}/images")
    fs.pipe_file(f"{bucket}/models/vgg16.weights.h5", vgg16_weights_file.read_bytes())
    ray_tmp = tempfile.mkdtemp(prefix="rs3", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    args = ["extract", "--input", f"s3://{bucket}/images", "--output", f"s3://{bucket}/features",
            "--weights", f"s3://{bucket}/models/vgg16.weights.h5", "--image-size", str(TEST_IMAGE_SIZE),
            "--shard-size", "5", "--batch-size", "4", "--workers", "1", "--gpus-per-worker", "0"]
    env = {**s3_server.env, "RAY_TMPDIR": ray_tmp, "CNNBATCH_CACHE": str(tmp_path_factory.mktemp("cache"))}
    first = run_cli(*args, env=env)
    return {"fs": fs, "bucket": bucket, "keys": keys, "args": args, "env": env, "first": first,
            "ray_tmp": Path(ray_tmp)}


def output_objects(fs, bucket: str) -> dict[str, dict]:
    return {info["name"][len(bucket) + len("/features/"):]: info
            for info in fs.find(f"{bucket}/features", detail=True).values()}


def test_s3_to_s3_every_image_exactly_once(s3_extraction) -> None:
    run, fs, bucket = s3_extraction["first"], s3_extraction["fs"], s3_extraction["bucket"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "19 images (18 rows, 1 errors) in 4 shards" in run.stdout
    features = ds.dataset(f"{bucket}/features", filesystem=fs, format="parquet").to_table()
    errors = pq.read_table(f"{bucket}/features/_errors", filesystem=fs).to_pylist()
    feature_keys = features.column("key").to_pylist()
    assert len(feature_keys) == len(set(feature_keys)) == 18
    assert [e["key"] for e in errors] == ["dots/broken.jpg"]
    assert sorted(feature_keys + ["dots/broken.jpg"]) == s3_extraction["keys"]


def test_s3_output_holds_only_whole_single_put_objects(s3_extraction) -> None:
    objects = output_objects(s3_extraction["fs"], s3_extraction["bucket"])
    shards = [f"00000{i}" for i in range(4)]
    assert set(objects) == ({f"part-{s}.parquet" for s in shards} | {f"_errors/part-{s}.parquet" for s in shards}
                            | {f"_stats/{s}.json" for s in shards} | {"_cnnbatch.json", "_SUCCESS"})
    # A multipart upload's ETag ends in "-<parts>": every object here went up in one PUT.
    assert all("-" not in info["ETag"] for info in objects.values())
    manifest = json.loads(s3_extraction["fs"].cat_file(f"{s3_extraction['bucket']}/features/_SUCCESS"))
    assert manifest["totals"] == {"shards": 4, "rows": 18, "errors": 1}


def test_secrets_never_in_output_logs_or_objects(s3_extraction) -> None:
    run, fs, bucket = s3_extraction["first"], s3_extraction["fs"], s3_extraction["bucket"]
    assert run.returncode == 0
    for secret in (FAKE_AWS_SECRET, FAKE_AWS_KEY_ID):
        assert secret not in run.stdout and secret not in run.stderr
        for name in output_objects(fs, bucket):
            assert secret.encode() not in fs.cat_file(f"{bucket}/features/{name}"), name
    logs = [p for p in s3_extraction["ray_tmp"].rglob("*") if p.is_file() and not p.is_symlink()]
    assert any("runtime_env" in p.name for p in logs), "Ray's logs were not where the test looks"
    for path in logs:
        data = path.read_bytes()
        assert FAKE_AWS_SECRET.encode() not in data and FAKE_AWS_KEY_ID.encode() not in data, path


def test_s3_rerun_skips_everything_and_rewrites_no_object(s3_extraction) -> None:
    fs, bucket = s3_extraction["fs"], s3_extraction["bucket"]
    before = {k: (v["ETag"], v["LastModified"]) for k, v in output_objects(fs, bucket).items()}
    again = run_cli(*s3_extraction["args"], env=s3_extraction["env"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "in 0 shards [4 already done]" in again.stdout
    after = {k: (v["ETag"], v["LastModified"]) for k, v in output_objects(fs, bucket).items()}
    assert after == before


# --- actors started before the credentials were set: they get them from the driver -----------------------------

def test_actors_get_storage_settings_from_the_driver(ray_cluster, s3_server: S3Server, sample_root: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray started without any AWS_* variable: only the driver's runtime_env/constructor hand-off can reach S3;
    the secret must not appear in that cluster's logs (Ray's runtime-env agent logs runtime_envs verbatim)."""
    import s3fs

    from cnnbatch.extract import ExtractConfig, run_extract

    @ray_cluster.remote
    def worker_env(name: str) -> str | None:
        import os

        return os.environ.get(name)

    assert ray_cluster.get(worker_env.remote("AWS_ENDPOINT_URL")) is None, "the premise: workers lack the env"
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs_for(s3_server)
    bucket = s3_server.new_bucket()
    keys = upload_tree(fs, sample_root / "holdout", f"{bucket}/images")
    config = ExtractConfig(input=f"s3://{bucket}/images", output=f"s3://{bucket}/features", weights="random",
                           image_size=TEST_IMAGE_SIZE, shard_size=4, batch_size=4, workers=1, gpus_per_worker=0)
    summary = run_extract(config)
    assert summary.ok and summary.shards_done == 2
    table = ds.dataset(f"{bucket}/features", filesystem=fs, format="parquet").to_table()
    assert sorted(table.column("key").to_pylist()) == keys
    session = Path(ray_cluster._private.worker._global_node.get_session_dir_path())
    for path in (p for p in session.rglob("*") if p.is_file() and not p.is_symlink()):
        assert FAKE_AWS_SECRET.encode() not in path.read_bytes(), path
    s3fs.S3FileSystem.clear_instance_cache()
