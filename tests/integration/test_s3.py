"""S3 end to end against moto's server over real HTTP: s3 -> s3 extraction through the CLI, and actors that get
their storage settings from the driver. (Listing: tests/test_shards.py; exclusive creates and the lock:
tests/test_lock.py.)

Credentials and the endpoint come only from the standard ``AWS_*`` environment. The secret is fake but distinctive:
it must never show up in the CLI's output, Ray's logs, or anything written to the bucket.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from ..conftest import FAKE_AWS_KEY_ID, FAKE_AWS_SECRET, TEST_IMAGE_SIZE, S3Server, run_cli


def s3fs_for(env: S3Server):
    """A client configured by the environment alone (``s3_env`` set it), as cnnbatch's own are."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def upload_tree(fs, local: Path, bucket_prefix: str) -> list[str]:
    keys = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    for key in keys:
        fs.pipe_file(f"{bucket_prefix}/{key}", (local / key).read_bytes())
    return keys


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
