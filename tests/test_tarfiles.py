"""Reading WebDataset tar shards: members grouped by key with their labels, every member used once or an error row
(duplicates, links, FIFOs, second images, labels without images), the per-image limit checked from headers,
compressed tars and huge extended headers read in bounded memory. (Moved here from the reader tests.)"""

from __future__ import annotations

import bz2
import gzip
import io
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from cnnbatch import readers, tarfiles
from cnnbatch.shards import InputError, iter_records, list_shards

from .conftest import one_shard, read_all, special, tar_bytes, write_tar

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
