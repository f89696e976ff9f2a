"""Reading a shard's records for the three input layouts (folder files, WebDataset tar members, Parquet rows), with
no Ray and no TensorFlow; hostile inputs (duplicate keys, links, special files, oversized records, bombs) generated
by the tests themselves, every input accounted for exactly once, as one record or one error row. (Which shards an
input makes: tests/test_shards.py.)"""

from __future__ import annotations

import bz2
import gzip
import io
import os
import re
import tarfile
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cnnbatch import parquetfiles, readers, tarfiles
from cnnbatch.shards import InputError, folder_label, iter_records, list_shards

from .conftest import one_shard, read_all, special, tar_bytes, touch, write_tar

# --- folders ---------------------------------------------------------------------------------------------------

def test_folder_labels_follow_flow_from_directory() -> None:
    assert folder_label("cats/a.jpg") == "cats"
    assert folder_label("cats/kittens/a.jpg") == "cats"
    assert folder_label("a.jpg") is None


def test_folder_records_carry_key_label_and_bytes(tmp_path: Path) -> None:
    touch(tmp_path, "cats/a.jpg", b"AAA")
    touch(tmp_path, "top.jpg", b"TTT")
    records = {r.key: (r.label, r.load()) for r in iter_records(one_shard(tmp_path, shard_size=10))}
    assert records == {"cats/a.jpg": ("cats", b"AAA"), "top.jpg": (None, b"TTT")}


def hostile_folder(tmp_path: Path) -> Path:
    """Links inside and outside the root, a link to /dev/zero, links to folders, a broken link, FIFOs."""
    root, outside = tmp_path / "input", tmp_path / "outside"
    touch(root, "cats/a.jpg", b"A")
    touch(outside, "o.jpg", b"O")
    (root / "cats" / "alias.jpg").symlink_to("a.jpg")
    (root / "cats" / "out.jpg").symlink_to(outside / "o.jpg")
    (root / "zero.jpg").symlink_to("/dev/zero")
    (root / "extdir").symlink_to(outside, target_is_directory=True)
    (root / "cats_again").symlink_to("cats", target_is_directory=True)
    (root / "gone.jpg").symlink_to("missing.jpg")
    os.mkfifo(root / "pipe.jpg")
    os.mkfifo(root / "pipe")  # no image name: not an input
    (root / "passwd.txt").symlink_to("/etc/passwd")  # no image name: not an input
    touch(root, "notes.txt", b"not an image")
    return root


def test_folder_links_and_special_files_are_error_rows_never_opened(tmp_path: Path) -> None:
    root = hostile_folder(tmp_path)
    shard = one_shard(root)
    assert shard.paths == ("cats/a.jpg", "cats/alias.jpg", "cats/out.jpg", "cats_again", "extdir", "gone.jpg",
                           "pipe.jpg", "zero.jpg")
    records = read_all(shard)
    assert records["cats/a.jpg"] == ("cats", b"A")
    assert records["cats/alias.jpg"] == ("cats", b"A")  # inside the root: followed
    outside = "symlink to outside the input root, not followed"
    assert records["cats/out.jpg"][1] == f"{outside} (-> {str(tmp_path / 'outside' / 'o.jpg')!r})"
    assert records["zero.jpg"][1] == f"{outside} (-> '/dev/zero')"
    assert records["extdir"] == (None, f"{outside} (-> {str(tmp_path / 'outside')!r})")
    assert records["cats_again"][1].startswith("symlink to a folder, not followed")
    assert records["gone.jpg"][1] == "broken symlink (-> 'missing.jpg'), nothing to read"
    assert records["pipe.jpg"][1] == "not a regular file (a FIFO), not read"
    # A symlinked input root is resolved first: the same records.
    (tmp_path / "root-link").symlink_to(root, target_is_directory=True)
    assert read_all(one_shard(tmp_path / "root-link")) == records


def test_a_fifo_swapped_in_after_the_listing_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "late.jpg")
    with pytest.raises(InputError, match=r"not a regular file \(a FIFO\), not read"):
        readers._read_local(str(tmp_path / "late.jpg"), 100)


def test_folder_files_over_the_byte_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 100)
    touch(tmp_path, "big.jpg", b"b" * 101)
    touch(tmp_path, "edge.jpg", b"e" * 100)
    touch(tmp_path, "grows.jpg", b"g" * 50)
    records = {r.key: r for r in iter_records(one_shard(tmp_path))}
    assert records["big.jpg"].error == "file is 101 bytes, over the limit of 100 bytes per image"
    assert records["edge.jpg"].error is None and records["edge.jpg"].load() == b"e" * 100
    (tmp_path / "grows.jpg").write_bytes(b"g" * 150)  # grew between the listing and the read
    with pytest.raises(readers.ImageTooLarge, match="file is 150 bytes, over the limit of 100 bytes per image"):
        records["grows.jpg"].load()


def test_remote_folder_files_are_read_with_a_bounded_ranged_read(monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 100)
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/hostile-remote/big.jpg", b"b" * 1000)
    fs.pipe_file("/hostile-remote/ok.jpg", b"o" * 10)
    calls: list[tuple] = []
    real_cat = type(fs).cat_file

    def cat_file(self, path, start=None, end=None, **kwargs):
        calls.append((path.rsplit("/", 1)[-1], start, end))
        return real_cat(self, path, start=start, end=end, **kwargs)

    monkeypatch.setattr(type(fs), "cat_file", cat_file)
    try:
        records = {r.key: r for r in iter_records(one_shard("memory://hostile-remote"))}
        assert records["ok.jpg"].load() == b"o" * 10
        with pytest.raises(readers.ImageTooLarge, match="file is 1000 bytes, over the limit of 100 bytes"):
            records["big.jpg"].load()
        assert calls == [("ok.jpg", 0, 101), ("big.jpg", 0, 101)]
    finally:
        fs.rm("/hostile-remote", recursive=True)



# --- tars ------------------------------------------------------------------------------------------------------

def test_tar_shards_group_members_by_key_with_labels(tmp_path: Path) -> None:
    write_tar(tmp_path / "train-0001.tar", {
        "s1.jpg": b"img1", "s1.cls": b"cat\n",
        "dir/s2.png": b"img2", "dir/s2.txt": b"dog",
        "s3.jpg": b"img3", "s3.json": b"{}",
        "s4.json": b"{}",
    })
    write_tar(tmp_path / "train-0000.tar", {"k.jpg": b"x"})
    shards = list(list_shards(str(tmp_path)))
    assert [s.shard_id for s in shards] == ["train-0000", "train-0001"]
    records = read_all(shards[1])
    assert records == {"train-0001/s1": ("cat", b"img1"), "train-0001/dir/s2": ("dog", b"img2"),
                       "train-0001/s3": (None, b"img3"),  # its .json is a sidecar of the sample: no row
                       "train-0001/s4": (None, "no image member (found s4.json)")}


def test_every_tar_member_is_used_once_or_an_error_row(tmp_path: Path) -> None:
    entries = [
        ("a.jpg", b"A"), ("a.cls", b"cat"), ("a.jpg", b"A-again"),  # the same name twice, adjacent
        ("b.jpg", b"B"), ("b.png", b"B2"),  # two images for one key
        ("c.jpg", b"C"), ("d.jpg", b"D"), ("c.png", b"C2"),  # key c again, not adjacent
        ("d.jpg", b"D-again"),  # the same name twice, not adjacent
        special("e.jpg", tarfile.SYMTYPE, "a.jpg"), special("f.jpg", tarfile.LNKTYPE, "a.jpg"),
        special("g.jpg", tarfile.FIFOTYPE), special("sub", tarfile.DIRTYPE),
        ("sub/_DSC0001.jpg", b"S"), ("sub/._DSC0001.jpg", b"apple double"),  # hidden: skipped
        ("h.cls", b"dog"),  # a label without an image
        ("README", b"text"),  # no extension
        ("i.jpg", b"I"), ("i.json", b"{}"),  # a sidecar: part of sample i
        ("j.jpg", b"J"), ("j.cls", b"fox"), ("j.CLS", b"wolf"),  # two labels of one kind
        ("k.heic", b"K"),  # an image format cnnbatch does not read
        ("./l.jpg", b"L"),  # "./" is not hidden
    ]
    (tmp_path / "t.tar").write_bytes(tar_bytes(entries))
    shard = one_shard(tmp_path)
    records = read_all(shard)
    assert records == {
        "t/a": ("cat", b"A"),
        "t/a.jpg": (None, "a.jpg: a second member of that name in this tar; only the first is read"),
        "t/b": (None, b"B"),
        "t/b.png": (None, "b.png: a second image for key 't/b' (b.jpg is used)"),
        "t/c": (None, b"C"),
        "t/d": (None, b"D"),
        "t/c.png": (None, "c.png: sample 't/c' came earlier in this tar, not adjacent (a sample's members must be "
                          "adjacent); not used"),
        "t/d.jpg": (None, "d.jpg: sample 't/d' came earlier in this tar, not adjacent (a sample's members must be "
                          "adjacent); not used"),
        "t/e.jpg": (None, "e.jpg: symbolic link member (-> 'a.jpg'), not followed"),
        "t/f.jpg": (None, "f.jpg: hard link member (to 'a.jpg'), not followed"),
        "t/g.jpg": (None, "g.jpg: not a regular file (a FIFO), not read"),
        "t/sub/_DSC0001": (None, b"S"),
        "t/h": ("dog", "no image member (found h.cls)"),
        "t/README": (None, "no image member (found README)"),
        "t/i": (None, b"I"),
        "t/j": ("fox", b"J"),
        "t/j.CLS": (None, "j.CLS: a second .cls label for key 't/j'"),
        "t/k": (None, "no image member (found k.heic)"),
        "t/./l": (None, b"L"),
    }
    assert [r.key for r in iter_records(shard)] == [r.key for r in iter_records(shard)]  # deterministic order


def test_error_row_keys_stay_unique_however_often_a_name_repeats(tmp_path: Path) -> None:
    # A link member named like the suffix a duplicate would get takes it first: the duplicate gets another.
    (tmp_path / "t.tar").write_bytes(tar_bytes([("x.jpg", b"1"), ("x.jpg", b"2"),
                                                special("x.jpg#4", tarfile.SYMTYPE, "x.jpg"), ("x.jpg", b"3"),
                                                ("y.jpg", b"y"), ("x.jpg", b"4")]))
    records = read_all(one_shard(tmp_path))
    assert set(records) == {"t/x", "t/x.jpg", "t/x.jpg#4", "t/x.jpg#4.2", "t/y", "t/x.jpg#6"}
    assert records["t/x"] == (None, b"1") and records["t/y"] == (None, b"y")
    assert records["t/x.jpg#4"][1] == "x.jpg#4: symbolic link member (-> 'x.jpg'), not followed"
    assert records["t/x.jpg#4.2"][1] == "x.jpg: a second member of that name in this tar; only the first is read"


def test_tar_member_over_the_limit_is_refused_without_reading_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 1000)
    extracted: list[str] = []
    real_extract = tarfiles._extract

    def spy(archive, member):
        extracted.append(member.name)
        return real_extract(archive, member)

    monkeypatch.setattr(tarfiles, "_extract", spy)
    (tmp_path / "t.tar").write_bytes(tar_bytes([("big.jpg", b"b" * 5000), ("big.cls", b"cat"),
                                                ("edge.jpg", b"e" * 1000)]))
    records = read_all(one_shard(tmp_path))
    assert records == {"t/big": ("cat", "member big.jpg is 5000 bytes, over the limit of 1000 bytes per image"),
                       "t/edge": (None, b"e" * 1000)}
    assert extracted == ["big.cls", "edge.jpg"]


def test_a_gzip_bomb_named_tar_is_read_in_bounded_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 20 KB gzip stream named .tar whose member is 20 MiB of zeros: an error row, and the next member read,
    without ever holding more than a few blocks of the stream."""
    limit = 1 << 20
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", limit)
    (tmp_path / "bomb.tar").write_bytes(gzip.compress(tar_bytes([("zeros.jpg", bytes(20 << 20)),
                                                                 ("after.jpg", b"fine")])))
    assert (tmp_path / "bomb.tar").stat().st_size < 100_000
    shard = one_shard(tmp_path)
    tracemalloc.start()
    try:
        records = read_all(shard)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert records == {"bomb/zeros": (None, f"member zeros.jpg is {20 << 20} bytes, over the limit of {limit} "
                                            "bytes per image"),
                       "bomb/after": (None, b"fine")}
    assert peak < 2 * limit, f"reading the bomb peaked at {peak} bytes, expected under {2 * limit}"


def test_a_bzip2_stream_expanding_past_the_ratio_fails_its_shard(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 1 << 20)
    (tmp_path / "bomb.tar").write_bytes(bz2.compress(tar_bytes([("zeros.jpg", bytes(8 << 20))])))
    stored = (tmp_path / "bomb.tar").stat().st_size
    with pytest.raises(InputError, match=rf"bomb.tar: its bzip2 stream expands past \d+ bytes from {stored}, more "
                                         r"than 2048x; refused as a decompression bomb"):
        list(iter_records(one_shard(tmp_path)))
    # A small compressed tar reads as any other.
    (tmp_path / "bomb.tar").write_bytes(bz2.compress(tar_bytes([("a.jpg", b"A"), ("a.cls", b"cat")])))
    assert read_all(one_shard(tmp_path)) == {"bomb/a": ("cat", b"A")}


def test_huge_tar_extended_headers_are_refused_before_tarfile_reads_them(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "MAX_TAR_HEADER_BYTES", 4096)
    info = tarfile.TarInfo("a.jpg")
    info.size = 1
    info.pax_headers = {"comment": "x" * 10_000}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(b"A"))
    (tmp_path / "pax.tar").write_bytes(buffer.getvalue())
    with pytest.raises(InputError, match=r"a tar extended header \(type b'x'\) of \d+ bytes, over the limit of "
                                         r"4096 bytes"):
        list(iter_records(one_shard(tmp_path)))
    (tmp_path / "pax.tar").write_bytes(tar_bytes([("a" * 300 + ".jpg", b"A")]))  # a GNU long name under the limit
    assert read_all(one_shard(tmp_path)) == {"pax/" + "a" * 300: (None, b"A")}



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
