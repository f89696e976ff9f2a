"""Reading Parquet shards: the image column (binary, large_binary, the Hugging Face struct; other types one error per
row), keys unique or error rows, the per-image limit per cell, row groups that are decompression bombs not decoded.
(Moved here from the reader tests.)"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cnnbatch import parquetfiles, readers
from cnnbatch.shards import iter_records, list_shards

from .conftest import one_shard, read_all

# --- Parquet ---------------------------------------------------------------------------------------------------

def test_parquet_shards_read_image_key_and_label(tmp_path: Path) -> None:
    table = pa.table({"image": pa.array([b"i0", None, b"i2"], pa.binary()),
                      "label": ["x", "y", None]})
    pq.write_table(table, tmp_path / "batch.parquet")
    records = list(iter_records(one_shard(tmp_path)))
    assert [(r.key, r.label) for r in records] == [("batch/0", "x"), ("batch/1", "y"), ("batch/2", None)]
    assert records[1].error == "image is null" and records[2].load() == b"i2"
    keyed = pa.table({"image": pa.array([b"a"], pa.binary()), "key": ["mine-1"]})
    pq.write_table(keyed, tmp_path / "batch.parquet")
    assert [r.key for r in iter_records(one_shard(tmp_path))] == ["batch/mine-1"]


def test_parquet_duplicate_and_null_keys_become_error_rows(tmp_path: Path) -> None:
    keys = ["a", "b", "a", None, "3", None, "5#6", "a"]
    pq.write_table(pa.table({"image": [f"i{i}".encode() for i in range(len(keys))], "key": keys}),
                   tmp_path / "p.parquet")
    records = read_all(one_shard(tmp_path))
    assert records == {
        "p/a": (None, b"i0"),
        "p/b": (None, b"i1"),
        "p/a#2": (None, "duplicate key 'a': row 0 of this file has it too; only the first is used"),
        "p/3": (None, b"i3"),  # a null key: <file stem>/<row>
        "p/3#4": (None, "duplicate key '3': row 3 of this file has it too; only the first is used"),
        "p/5": (None, b"i5"),
        "p/5#6": (None, b"i6"),
        "p/a#7": (None, "duplicate key 'a': row 0 of this file has it too; only the first is used"),
    }
    pq.write_table(pa.table({"image": [b"x", b"y"], "key": ["1", None]}), tmp_path / "p.parquet")
    assert read_all(one_shard(tmp_path)) == {
        "p/1": (None, b"x"),
        "p/1#1": (None, "null key, and its fallback 'p/1' (<file>/<row>) is already the key of row 0 of this "
                        "file; not used")}


HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def test_parquet_image_columns_binary_large_binary_and_the_hugging_face_struct(tmp_path: Path) -> None:
    pq.write_table(pa.table({"image": pa.array([b"L0", None], pa.large_binary())}), tmp_path / "large.parquet")
    hf = pa.array([{"bytes": b"H0", "path": "a.png"}, {"bytes": None, "path": "/etc/passwd"}, None,
                   {"bytes": None, "path": None}], HF_IMAGE)
    pq.write_table(pa.table({"image": hf, "label": pa.array([0, 1, 2, None], pa.int64())}), tmp_path / "hf.parquet")
    records = {k: v for s in list_shards(str(tmp_path)) for k, v in read_all(s).items()}
    assert records == {
        "large/0": (None, b"L0"), "large/1": (None, "image is null"),
        "hf/0": ("0", b"H0"),
        "hf/1": ("1", "image bytes missing (path '/etc/passwd'); paths are not followed"),
        "hf/2": ("2", "image is null"), "hf/3": (None, "image is null"),
    }


@pytest.mark.parametrize("column, found", [
    (pa.array([300_000_000, 5], pa.int64()), "int64"),
    (pa.array(["a.jpg", "b.jpg"], pa.string()), "string"),
    (pa.array([{"path": "a.jpg"}, {"path": "b.jpg"}], pa.struct([("path", pa.string())])), "struct<path: string>"),
])
def test_other_image_column_types_make_every_row_an_error_naming_the_type(tmp_path: Path, column: pa.Array,
                                                                          found: str) -> None:
    pq.write_table(pa.table({"image": column, "key": ["k0", "k1"]}), tmp_path / "bad.parquet")
    expected = f"the 'image' column is {found}, expected {parquetfiles.IMAGE_TYPES}"
    assert read_all(one_shard(tmp_path)) == {"bad/k0": (None, expected), "bad/k1": (None, expected)}


def test_a_parquet_file_without_image_column_or_with_odd_keys_names_what_it_found(tmp_path: Path) -> None:
    pq.write_table(pa.table({"pixels": [b"x", b"y"]}), tmp_path / "bad.parquet")
    expected = f"no 'image' column (found columns ['pixels']); expected one of {parquetfiles.IMAGE_TYPES}"
    assert read_all(one_shard(tmp_path)) == {"bad/0": (None, expected), "bad/1": (None, expected)}
    pq.write_table(pa.table({"image": [b"x"], "key": [1.5]}), tmp_path / "bad.parquet")
    assert read_all(one_shard(tmp_path)) == {"bad/0": (None, "the 'key' column is double, expected strings or "
                                                             "integers")}


def test_parquet_cells_over_the_limit_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 1000)
    pq.write_table(pa.table({"image": [os.urandom(2000), b"ok", os.urandom(1000)]}), tmp_path / "cells.parquet")
    records = read_all(one_shard(tmp_path))
    assert records["cells/0"] == (None, "image cell is 2000 bytes, over the limit of 1000 bytes per image")
    assert records["cells/1"] == (None, b"ok") and len(records["cells/2"][1]) == 1000


def test_a_parquet_row_group_that_is_a_decompression_bomb_is_not_decoded(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    limit = 1 << 20
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", limit)
    schema = pa.schema([("image", pa.binary()), ("key", pa.string())])
    with pq.ParquetWriter(tmp_path / "bomb.parquet", schema, compression="zstd") as writer:
        writer.write_table(pa.table({"image": [bytes(30 << 20)], "key": ["zeros"]}, schema=schema))
        writer.write_table(pa.table({"image": [b"fine"], "key": ["after"]}, schema=schema))
    assert (tmp_path / "bomb.parquet").stat().st_size < 100_000
    reads: list[tuple] = []
    real_iter = pq.ParquetFile.iter_batches

    def iter_batches(self, *args, **kwargs):
        reads.append((tuple(kwargs["row_groups"]), tuple(kwargs["columns"])))
        return real_iter(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
    records = read_all(one_shard(tmp_path))
    assert set(records) == {"bomb/zeros", "bomb/after"} and records["bomb/after"] == (None, b"fine")
    assert re.fullmatch(r"row group 0 not decoded: its image data decompresses to (\d+) bytes from (\d+) "
                        r"\((\d+)x, over 64x\); refused as a decompression bomb", str(records["bomb/zeros"][1]))
    assert reads == [((0,), ("key",)), ((1,), ("key", "image"))]  # the bomb's image column was never read
