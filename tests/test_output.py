"""The output dataset: done markers, readers seeing only features, configuration refusal, the lock, crash
leftovers (local and on moto's S3) never read as done, temporary files cleaned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from cnnbatch.extract import embeddings_table, feature_schema
from cnnbatch.output import OutputDataset, OutputError
from cnnbatch.shardstats import ShardStats

from .conftest import S3Server


def small_table(dim: int = 8, rows: int = 5):
    schema = feature_schema(dim, {"backbone": "vgg16", "dim": dim})
    vectors = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
    return embeddings_table([f"k{i}" for i in range(rows)], ["a", None, "b", "a", "b"][:rows], vectors, schema), vectors


def test_done_marker_requires_fingerprint_signature_and_part_size(tmp_path: Path) -> None:
    out = OutputDataset(str(tmp_path / "out"))
    out.prepare("fp1", {"backbone": "vgg16"}, overwrite=False)
    table, _ = small_table()
    stats = out.write_shard(ShardStats("000000", "sig", "fp1"), table, [("bad.jpg", "cannot decode image: x")])
    assert stats.rows == 5 and stats.errors == 1 and stats.seconds["write"] >= 0
    assert out.done_stats("000000", "sig", "fp1") is not None
    assert out.done_stats("000000", "other-sig", "fp1") is None  # the input changed
    assert out.done_stats("000000", "sig", "fp2") is None  # another configuration
    Path(out.part_path("000000")).write_bytes(b"torn write")  # a crash's leftover is never "done"
    assert out.done_stats("000000", "sig", "fp1") is None
    errors = pq.read_table(tmp_path / "out" / "_errors" / "part-000000.parquet").to_pylist()
    assert errors == [{"key": "bad.jpg", "error": "cannot decode image: x"}]


def test_readers_see_only_the_features(tmp_path: Path) -> None:
    out = OutputDataset(str(tmp_path))
    out.prepare("fp", {}, overwrite=False)
    table, _ = small_table()
    out.write_shard(ShardStats("000000", "s", "fp"), table, [("x", "broken")])
    out.write_success("fp", {}, [out.read_stats("000000")])
    (tmp_path / ".part-000001.parquet.abcd.tmp").write_bytes(b"half")
    assert ds.dataset(str(tmp_path)).to_table().num_rows == 5
    duckdb = pytest.importorskip("duckdb")
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{tmp_path}/*.parquet')").fetchall() == [(5,)]


def test_another_configuration_is_refused_naming_the_difference(tmp_path: Path) -> None:
    out = OutputDataset(str(tmp_path))
    out.prepare("fp-a", {"backbone": "vgg16"}, overwrite=False)
    with pytest.raises(OutputError, match="backbone: existing 'vgg16', now 'inceptionv3'"):
        out.prepare("fp-b", {"backbone": "inceptionv3"}, overwrite=False)
    out.prepare("fp-b", {"backbone": "inceptionv3"}, overwrite=True)
    assert out.read_config()["fingerprint"] == "fp-b"


def test_foreign_part_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "part-0.parquet").write_bytes(b"someone else's")
    with pytest.raises(OutputError, match="not written by cnnbatch"):
        OutputDataset(str(tmp_path)).prepare("fp", {}, overwrite=False)


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    out = OutputDataset(str(tmp_path))
    lock = out.acquire_lock()
    with pytest.raises(OutputError, match="being written by another run"):
        out.acquire_lock()
    lock.release()
    out.acquire_lock().release()


# --- leftovers of a crash are never taken for done (moved here from the fault tests) ------------------------

@pytest.fixture(params=["local", "s3"])
def output_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    s3: S3Server = request.getfixturevalue("s3_env")
    return f"s3://{s3.new_bucket()}/out"


def keyed_table(keys: list[str]) -> pa.Table:
    schema = feature_schema(4, {"backbone": "test"})
    return embeddings_table(keys, [None] * len(keys), np.ones((len(keys), 4), np.float32), schema)


def test_crash_leftovers_are_never_read_as_done(output_uri: str) -> None:
    out = OutputDataset(output_uri)
    out.prepare("fp", {"backbone": "test"}, overwrite=False)
    for shard in ("a", "b", "c", "d"):
        out.write_shard(ShardStats(shard, "sig", "fp"), keyed_table([f"{shard}1", f"{shard}2"]), [])
    assert all(out.done_stats(s, "sig", "fp") for s in "abcd")

    fs, stats_of = out.fs, (lambda shard: f"{out.path}/_stats/{shard}.json")
    fs.pipe_file(out.part_path("a"), b"PAR1 half a part")  # the part was replaced, its stats is stale
    fs.rm_file(stats_of("b"))
    fs.pipe_file(out.part_path("b"), b"garbage without any stats")  # a part written, then the crash
    fs.pipe_file(stats_of("c"), b'{"shard_id": "c", "fingerpr')  # a torn stats record
    assert out.done_stats("d", "sig", "other-fingerprint") is None  # done for another configuration only
    assert out.done_stats("d", "other-input", "fp") is None  # the input changed since
    assert [s for s in "abcd" if out.done_stats(s, "sig", "fp")] == ["d"]


def test_hidden_temporary_files_are_ignored_then_cleaned(tmp_path: Path) -> None:
    out = OutputDataset(str(tmp_path / "out"))
    out.prepare("fp", {}, overwrite=False)
    out.write_shard(ShardStats("000000", "sig", "fp"), keyed_table(["k1", "k2"]), [])
    leftovers = [tmp_path / "out" / ".part-000001.parquet.0a1b2c3d.tmp",
                 tmp_path / "out" / "_stats" / ".000001.json.deadbeef.tmp"]
    for path in leftovers:
        path.write_bytes(b"half written")
    assert out.list_parts() == ["part-000000.parquet"]
    assert out.done_stats("000001", "sig", "fp") is None
    assert ds.dataset(str(tmp_path / "out")).to_table().num_rows == 2
    out.prepare("fp", {}, overwrite=False)  # what a rerun does under the lock
    assert not any(path.exists() for path in leftovers)


# --- job-level files ---------------------------------------------------------------------------------------------

def test_success_manifest_totals_and_failures_record(tmp_path: Path) -> None:
    out = OutputDataset(str(tmp_path))
    out.prepare("fp", {"input": "s3://user:pw@bucket/in"}, overwrite=False)
    table, _ = small_table()
    first = out.write_shard(ShardStats("000000", "s", "fp"), table, [("x", "broken")])
    second = out.write_shard(ShardStats("000001", "s", "fp"), small_table(rows=2)[0], [])
    manifest = out.write_success("fp", {"input": "s3://user:pw@bucket/in"}, [second, first])
    assert out.read_success() == manifest
    assert list(manifest["shards"]) == ["000000", "000001"]
    assert manifest["totals"] == {"shards": 2, "rows": 7, "errors": 1}
    assert "pw" not in json_text(tmp_path / "_SUCCESS") and "pw" not in json_text(tmp_path / "_cnnbatch.json")

    out.write_failures("fp", {"b": "ReadError: x", "a": "worker died"})
    assert list(out.read_failures()["failed"]) == ["a", "b"]
    out.remove_failures()
    out.remove_success()
    assert out.read_failures() is None and out.read_success() is None


def json_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_stale_parts_of_a_shrunken_folder_are_removed_with_their_stats(tmp_path: Path) -> None:
    out = OutputDataset(str(tmp_path))
    out.prepare("fp", {}, overwrite=False)
    for shard in ("000000", "000001", "000002"):
        out.write_shard(ShardStats(shard, "s", "fp"), small_table(rows=2)[0], [])
    assert out.remove_stale_parts({"000000", "000001"}) == ["000002"]
    assert out.list_parts() == ["part-000000.parquet", "part-000001.parquet"]
    assert not (tmp_path / "_stats" / "000002.json").exists()
    assert not (tmp_path / "_errors" / "part-000002.parquet").exists()


def test_overwrite_clears_cnnbatch_files_only(tmp_path: Path) -> None:
    out = OutputDataset(str(tmp_path))
    out.prepare("fp-a", {"backbone": "vgg16"}, overwrite=False)
    out.write_shard(ShardStats("000000", "s", "fp-a"), small_table()[0], [])
    (tmp_path / "notes.txt").write_text("mine")
    out.prepare("fp-b", {"backbone": "vgg16"}, overwrite=True)
    assert out.list_parts() == [] and out.read_stats("000000") is None
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert out.read_config() == {"fingerprint": "fp-b", "config": {"backbone": "vgg16"}}
