"""The output dataset: Parquet layout and metadata, done markers, configuration refusal, the lock."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from cnnbatch.extract import embeddings_table, feature_schema
from cnnbatch.output import OutputDataset, OutputError
from cnnbatch.parquetio import read_metadata, table_to_parquet_bytes
from cnnbatch.shardstats import ShardStats


def small_table(dim: int = 8, rows: int = 5):
    schema = feature_schema(dim, {"backbone": "vgg16", "dim": dim})
    vectors = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
    return embeddings_table([f"k{i}" for i in range(rows)], ["a", None, "b", "a", "b"][:rows], vectors, schema), vectors


def test_feature_parquet_schema_encodings_and_metadata() -> None:
    table, vectors = small_table()
    data = table_to_parquet_bytes(table)
    parquet = pq.ParquetFile(io.BytesIO(data))
    schema = parquet.schema_arrow
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[8]"
    assert schema.field("key").type == "string" and schema.field("label").type == "string"
    assert read_metadata(schema) == {"backbone": "vgg16", "dim": 8}
    column = parquet.metadata.row_group(0).column(2)
    assert column.compression == "ZSTD"
    assert "BYTE_STREAM_SPLIT" in column.encodings
    assert not any("DICTIONARY" in e for e in column.encodings)
    back = parquet.read()
    np.testing.assert_array_equal(np.stack(back.column("embedding").to_numpy(zero_copy_only=False)), vectors)


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


def test_steady_images_per_second_leaves_out_each_workers_start_up() -> None:
    from cnnbatch.shardstats import steady_images_per_second

    def shard(worker: str, started: float, first_batch: float, finished: float, rows: int, **kw) -> ShardStats:
        return ShardStats(f"{worker}{started}", "sig", "fp", rows=rows, worker=worker, started_at=started,
                          first_batch_at=first_batch, first_batch_images=10, finished_at=finished, **kw)

    # Worker a: warm-up until t=20, then 90 + 100 images by t=39 (gaps included): 190 / 19 = 10 images/s.
    # Worker b, side by side: 40 images after its first batch in 8 s = 5 images/s. The failed shard does not count.
    shards = [shard("a", 0.0, 20.0, 29.0, 100), shard("a", 29.5, 30.0, 39.0, 100),
              shard("b", 1.0, 22.0, 26.0, 30), shard("b", 26.0, 26.5, 30.0, 20),
              shard("b", 30.0, 31.0, 90.0, 500, failed="worker died")]
    assert steady_images_per_second(shards) == pytest.approx(10.0 + 5.0)
    assert steady_images_per_second([shard("c", 0.0, 5.0, 5.0, 10)]) is None  # only the warm-up batch
    assert steady_images_per_second([ShardStats("x", "s", "f", rows=5)]) is None  # stats from before timestamps
