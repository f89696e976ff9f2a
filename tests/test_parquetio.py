"""Parquet encoding shared by every dataset: zstd, byte_stream_split on float columns (nested ones too), no
dictionary for floats, the ``cnnbatch`` schema metadata, ``_errors`` rows, row groups of nested vector tables."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cnnbatch import parquetio
from cnnbatch.extract import embeddings_table, feature_schema
from cnnbatch.parquetio import ERRORS_SCHEMA, errors_table, read_metadata, table_to_parquet_bytes, with_metadata


def small_table(dim: int = 8, rows: int = 5):
    schema = feature_schema(dim, {"backbone": "vgg16", "dim": dim})
    vectors = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
    return embeddings_table([f"k{i}" for i in range(rows)], ["a", None, "b", "a", "b"][:rows], vectors, schema), vectors


def encodings(data: bytes) -> dict[str, tuple[str, ...]]:
    """Each column chunk's encodings in the first row group, by its leaf path."""
    meta = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0)
    return {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}


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


def test_nested_float_columns_get_byte_stream_split_at_their_leaf() -> None:
    table = pa.table({
        "key": pa.array(["a", "b"]),
        "label": pa.array(["x", "y"]),
        "views": pa.array([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]],
                          pa.list_(pa.list_(pa.float32(), 2), 2)),
        "scores": pa.array([[0.5], [0.25, 0.75]], pa.list_(pa.float32())),
        "count": pa.array([1, 2], pa.int64()),
    })
    data = table_to_parquet_bytes(table)
    found = encodings(data)
    assert "BYTE_STREAM_SPLIT" in found["views.list.element.list.element"]
    assert "BYTE_STREAM_SPLIT" in found["scores.list.element"]
    assert "BYTE_STREAM_SPLIT" not in found["count"]
    assert any("DICTIONARY" in e for e in found["label"])  # strings other than the key are dictionary-encoded
    assert not any("DICTIONARY" in e for e in found["key"])  # keys are unique: no dictionary
    assert pq.read_table(io.BytesIO(data)).equals(table)


def test_tables_without_floats_write_plainly() -> None:
    table = pa.table({"key": ["a"], "n": [1]})
    assert pq.read_table(io.BytesIO(table_to_parquet_bytes(table))).equals(table)


def test_metadata_round_trips_through_a_file_and_reads_empty_without_it() -> None:
    metadata = {"backbone": "vgg16", "dim": 4, "weights": {"kind": "random", "seed": 7}, "labels": ["a", "é"]}
    schema = with_metadata([("key", pa.string()), ("x", pa.float32())], metadata)
    table = pa.Table.from_pylist([{"key": "k", "x": 1.0}], schema=schema)
    back = pq.read_schema(io.BytesIO(table_to_parquet_bytes(table)))
    assert read_metadata(back) == metadata
    assert parquetio.METADATA_KEY in back.metadata
    assert read_metadata(pa.schema([("key", pa.string())])) == {}


def test_errors_table_has_key_and_error_even_when_empty() -> None:
    rows = [("a.jpg", "cannot decode image: truncated"), ("b.png", "image is null")]
    table = errors_table(rows)
    assert table.schema.equals(ERRORS_SCHEMA)
    assert table.to_pylist() == [{"key": k, "error": e} for k, e in rows]
    empty = pq.read_table(io.BytesIO(table_to_parquet_bytes(errors_table([]))))
    assert empty.num_rows == 0 and empty.schema.names == ["key", "error"]


def test_nested_vector_tables_are_cut_into_bounded_row_groups(monkeypatch) -> None:
    monkeypatch.setattr(parquetio, "NESTED_ROW_GROUP_BYTES", 4096)
    views = np.arange(64 * 3 * 8, dtype=np.float32).reshape(64, 3, 8)
    table = pa.table({"key": [f"k{i}" for i in range(64)],
                      "views": pa.FixedSizeListArray.from_arrays(
                          pa.FixedSizeListArray.from_arrays(pa.array(views.reshape(-1)), 8), 3)})
    parquet = pq.ParquetFile(io.BytesIO(table_to_parquet_bytes(table)))
    per_row = table.nbytes // table.num_rows
    assert parquet.metadata.num_row_groups == -(-64 // (4096 // per_row)) > 1
    assert {parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups - 1)} == {
        4096 // per_row}
    flat, _ = small_table(rows=5)
    assert pq.ParquetFile(io.BytesIO(table_to_parquet_bytes(flat))).metadata.num_row_groups == 1
