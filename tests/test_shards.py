"""Listing an input as shards for the three layouts: sorted, chunked, stable ids and signatures, which names are
inputs, keys that cannot collide across files, refused layouts; on moto's S3 the sorted listing streams page by
page and gives the same shards as on disk. (Reading each shard's records: tests/test_readers.py.)"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cnnbatch import readers, storage, tarfiles
from cnnbatch.shards import (
    InputError,
    Record,
    _FileNamespaces,
    file_shard_id,
    iter_records,
    list_shards,
)

from .conftest import S3Server, one_shard, read_all, special, tar_bytes, touch, write_tar

# --- folders ---------------------------------------------------------------------------------------------------

def test_folder_listing_is_sorted_chunked_and_stable(tmp_path: Path) -> None:
    for rel in ["cats/b.jpg", "cats/a.png", "dogs/x.webp", "root.jpg", "a.jpg", "a/z.jpg", "notes.txt",
                ".hidden/h.jpg", "cats/.tmp.jpg", ".DS_Store"]:
        touch(tmp_path, rel)
    shards = list(list_shards(str(tmp_path), shard_size=2))
    keys = [k for s in shards for k in s.paths]
    assert keys == sorted(keys) == ["a.jpg", "a/z.jpg", "cats/a.png", "cats/b.jpg", "dogs/x.webp", "root.jpg"]
    assert [s.shard_id for s in shards] == ["000000", "000001", "000002"]
    # Pinned: resume of existing outputs depends on the ids and signatures of ordinary folders never changing.
    assert [s.signature for s in shards] == ["c2dfb2132b95a00b", "b3a9142225dcc5d5", "d97745f3b9876e88"]
    assert all(s.kind == "folder" for s in shards)
    again = list(list_shards(str(tmp_path), shard_size=2))
    assert [(s.shard_id, s.paths, s.signature) for s in again] == [(s.shard_id, s.paths, s.signature) for s in shards]
    touch(tmp_path, "zebra/new.jpg")
    grown = list(list_shards(str(tmp_path), shard_size=2))
    # appended keys leave old shards as they were
    assert [s.signature for s in grown[:3]] == [s.signature for s in shards]


def test_underscore_names_are_images_hidden_names_and_other_extensions_are_not_read(tmp_path: Path) -> None:
    for rel in ["_DSC0001.jpg", "_cls3/x.png", "cats/_DSC0002.JPG", ".git/objects/y.jpg", "cats/.DS_Store",
                "cats/._a.jpg", "notes.txt", "labels.csv"]:
        touch(tmp_path, rel, rel.encode())
    records = read_all(one_shard(tmp_path))
    assert records == {"_DSC0001.jpg": (None, b"_DSC0001.jpg"), "_cls3/x.png": ("_cls3", b"_cls3/x.png"),
                       "cats/_DSC0002.JPG": ("cats", b"cats/_DSC0002.JPG")}


def test_sorted_walk_equals_a_flat_sorted_listing(tmp_path: Path) -> None:
    for rel in ["a", "a.b", "a-b/c", "a0", "b/a", "B/a", "c/b-c/d", "c/b/c", "c/b.c"]:
        touch(tmp_path, rel)
    fs, root = storage.filesystem(str(tmp_path))
    walked = [p[len(root) + 1:] for p in storage.iter_sorted_files(fs, root)]
    assert walked == sorted(p[len(root) + 1:] for p in fs.find(root))



# --- tars ------------------------------------------------------------------------------------------------------

def test_single_tar_file_is_one_shard(tmp_path: Path) -> None:
    write_tar(tmp_path / "only.tar", {"a.jpg": b"x"})
    shard = one_shard(tmp_path / "only.tar")
    assert shard.shard_id == "only" and [r.key for r in iter_records(shard)] == ["only/a"]
    (tmp_path / "latest.tar").symlink_to("only.tar")  # a link the user names is followed: the file it names
    assert one_shard(tmp_path / "latest.tar") == shard


def test_tar_keys_cannot_collide_across_files(tmp_path: Path) -> None:
    write_tar(tmp_path / "a.tar", {"b/c.jpg": b"1"})  # key a/b/c
    (tmp_path / "a").mkdir()
    write_tar(tmp_path / "a" / "b.tar", {"c.jpg": b"2"})  # key a/b/c too
    with pytest.raises(InputError, match=r"a.tar and a/b.tar would give keys in one namespace .*a/ is both"):
        list(list_shards(str(tmp_path)))
    (tmp_path / "a.tar").rename(tmp_path / "ab.tar")  # a stem that is a string prefix, not a folder prefix
    write_tar(tmp_path / "a-b.tar", {"c.jpg": b"3"})
    shards = list(list_shards(str(tmp_path)))
    assert [s.shard_id for s in shards] == ["a-b", "a__b", "ab"]
    keys = [r.key for s in shards for r in iter_records(s)]
    assert keys == ["a-b/c", "a/b/c", "ab/b/c"]
    names = _FileNamespaces("in")  # the deeper file first (not an order a sorted listing gives): refused too
    names.add("x/y.parquet")
    with pytest.raises(InputError, match="x/y.parquet and x.parquet would give keys in one namespace"):
        names.add("x.parquet")


def test_tar_files_that_are_links_out_or_fifos_are_one_error_row(tmp_path: Path) -> None:
    write_tar(tmp_path / "ok.tar", {"a.jpg": b"A"})
    (tmp_path / "evil.tar").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "pipe.tar")
    shards = {s.shard_id: s for s in list_shards(str(tmp_path))}
    assert read_all(shards["evil"]) == {"evil": (None, "evil.tar: symlink to outside the input root, not followed "
                                                      "(-> '/dev/zero')")}
    assert read_all(shards["pipe"]) == {"pipe": (None, "pipe.tar: not a regular file (a FIFO), not read")}
    assert read_all(shards["ok"]) == {"ok/a": (None, b"A")}



# --- Parquet ---------------------------------------------------------------------------------------------------

def test_parquet_keys_are_namespaced_by_file(tmp_path: Path) -> None:
    for name in ("one", "two"):
        pq.write_table(pa.table({"image": [b"x"], "key": ["same"]}), tmp_path / f"{name}.parquet")
    keys = [r.key for s in list_shards(str(tmp_path)) for r in iter_records(s)]
    assert keys == ["one/same", "two/same"]
    (tmp_path / "one").mkdir()
    pq.write_table(pa.table({"image": [b"x"], "key": ["k"]}), tmp_path / "one" / "two.parquet")
    with pytest.raises(InputError, match="one.parquet and one/two.parquet would give keys in one namespace"):
        list(list_shards(str(tmp_path)))


def test_parquet_under_underscore_or_dot_names_is_skipped_as_pyarrow_does(tmp_path: Path) -> None:
    for rel in ["data.parquet", "_temporary/0/part-0.parquet", "_errors/part-0.parquet", ".x.parquet"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"image": [b"x"]}), tmp_path / rel)
    assert [s.paths for s in list_shards(str(tmp_path))] == [("data.parquet",)]



# --- layouts ---------------------------------------------------------------------------------------------------

def test_mixed_layouts_and_empty_inputs_are_refused(tmp_path: Path) -> None:
    touch(tmp_path, "a.jpg")
    touch(tmp_path, "b.tar")
    with pytest.raises(InputError, match="mixes layouts"):
        list(list_shards(str(tmp_path)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no images"):
        list(list_shards(str(empty)))
    with pytest.raises(storage.StorageError, match="does not exist"):
        list(list_shards(str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="--shard-size must be at least 1, got 0"):
        list(list_shards(str(tmp_path), shard_size=0))


def test_file_shard_ids_are_safe_names() -> None:
    assert file_shard_id("a/b/train-0001.tar") == "a__b__train-0001"
    assert file_shard_id("we ird#name.parquet") == "we_ird_name"


def test_the_public_names_others_import() -> None:
    from cnnbatch import shards

    assert shards.IMAGE_EXTENSIONS >= {"jpg", "png", "tif"} and shards.extension("a/B.JPG") == "jpg"
    assert Record("k", None, lambda: b"x").error is None and shards.MAX_RECORD_BYTES == 64 * 1024 * 1024


def test_a_dry_run_counts_the_rows_that_reading_gives(tmp_path: Path) -> None:
    """``tarfiles.count_tar_rows`` (for ``cnnbatch plan``) reads headers only and agrees with the reader, row for
    row, on a tar full of duplicates, links, second images and samples without an image."""
    entries = [("a.jpg", b"A"), ("a.cls", b"cat"), ("a.jpg", b"again"), ("b.jpg", b"B"), ("b.png", b"B2"),
               ("c.jpg", b"C"), ("d.jpg", b"D"), ("c.png", b"C2"), special("e.jpg", tarfile.SYMTYPE, "a.jpg"),
               special("f", tarfile.DIRTYPE), ("f/._x.jpg", b"hidden"), ("h.cls", b"dog"), ("README", b"t"),
               ("i.jpg", b"I"), ("i.json", b"{}")]
    (tmp_path / "t.tar").write_bytes(tar_bytes(entries))
    rows = read_all(one_shard(tmp_path))
    assert len(rows) == 11  # a, a.jpg, b, b.png, c, d, c.png, e.jpg, h, README, i
    with tarfile.open(tmp_path / "t.tar", "r:*") as archive:
        assert tarfiles.count_tar_rows(archive) == len(rows)


# --- on S3 (moto's server over real HTTP) ----------------------------------------------------------------------

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


def test_s3_folder_images_are_read_with_one_bounded_ranged_get(s3_env: S3Server,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 100)
    bucket = s3_env.new_bucket()
    fs = s3fs_for(s3_env)
    fs.pipe_file(f"{bucket}/imgs/ok.jpg", b"o" * 100)
    fs.pipe_file(f"{bucket}/imgs/big.jpg", b"b" * 5000)
    records = {r.key: r for r in iter_records(one_shard(f"s3://{bucket}/imgs"))}
    assert records["ok.jpg"].load() == b"o" * 100
    with pytest.raises(readers.ImageTooLarge, match="file is 5000 bytes, over the limit of 100 bytes per image"):
        records["big.jpg"].load()
