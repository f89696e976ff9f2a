"""Reading a folder shard's files, with no Ray and no TensorFlow: keys, labels and bytes; links and special files
as error rows never opened; the per-image byte limit, locally and with a bounded ranged read remotely. (Tar members:
tests/test_tarfiles.py; Parquet rows: tests/test_parquetfiles.py; which shards an input makes: tests/test_shards.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cnnbatch import readers
from cnnbatch.shards import InputError, folder_label, iter_records

from .conftest import one_shard, read_all, touch

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
