"""Shard listing and record reading for the three input layouts, with no Ray and no TensorFlow; on moto's S3 the
sorted listing streams page by page and gives the same shards as on disk."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cnnbatch import storage
from cnnbatch.shards import InputError, file_shard_id, folder_label, iter_records, list_shards

from .conftest import S3Server


def touch(root: Path, rel: str, data: bytes = b"x") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_folder_listing_is_sorted_chunked_and_stable(tmp_path: Path) -> None:
    for rel in ["cats/b.jpg", "cats/a.png", "dogs/x.webp", "root.jpg", "a.jpg", "a/z.jpg", "notes.txt",
                "_errors/e.jpg", ".hidden/h.jpg", "cats/.tmp.jpg"]:
        touch(tmp_path, rel)
    shards = list(list_shards(str(tmp_path), shard_size=2))
    keys = [k for s in shards for k in s.paths]
    assert keys == sorted(keys) == ["a.jpg", "a/z.jpg", "cats/a.png", "cats/b.jpg", "dogs/x.webp", "root.jpg"]
    assert [s.shard_id for s in shards] == ["000000", "000001", "000002"]
    assert all(s.kind == "folder" for s in shards)
    again = list(list_shards(str(tmp_path), shard_size=2))
    assert [(s.shard_id, s.paths, s.signature) for s in again] == [(s.shard_id, s.paths, s.signature) for s in shards]
    touch(tmp_path, "zebra/new.jpg")
    grown = list(list_shards(str(tmp_path), shard_size=2))
    # appended keys leave old shards as they were
    assert [s.signature for s in grown[:3]] == [s.signature for s in shards]


def test_sorted_walk_equals_a_flat_sorted_listing(tmp_path: Path) -> None:
    for rel in ["a", "a.b", "a-b/c", "a0", "b/a", "B/a", "c/b-c/d", "c/b/c", "c/b.c"]:
        touch(tmp_path, rel)
    fs, root = storage.filesystem(str(tmp_path))
    walked = [p[len(root) + 1:] for p in storage.iter_sorted_files(fs, root)]
    assert walked == sorted(p[len(root) + 1:] for p in fs.find(root))


def test_folder_labels_follow_flow_from_directory() -> None:
    assert folder_label("cats/a.jpg") == "cats"
    assert folder_label("cats/kittens/a.jpg") == "cats"
    assert folder_label("a.jpg") is None


def test_folder_records_carry_key_label_and_bytes(tmp_path: Path) -> None:
    touch(tmp_path, "cats/a.jpg", b"AAA")
    touch(tmp_path, "top.jpg", b"TTT")
    (shard,) = list_shards(str(tmp_path), shard_size=10)
    records = {r.key: (r.label, r.load()) for r in iter_records(shard)}
    assert records == {"cats/a.jpg": ("cats", b"AAA"), "top.jpg": (None, b"TTT")}


def test_tar_shards_group_members_by_key_with_labels(tmp_path: Path) -> None:
    write_tar(tmp_path / "train-0001.tar", {
        "s1.jpg": b"img1", "s1.cls": b"cat\n",
        "dir/s2.png": b"img2", "dir/s2.txt": b"dog",
        "s3.jpg": b"img3",
        "s4.json": b"{}",
    })
    write_tar(tmp_path / "train-0000.tar", {"k.jpg": b"x"})
    shards = list(list_shards(str(tmp_path)))
    assert [s.shard_id for s in shards] == ["train-0000", "train-0001"]
    records = {r.key: (r.label, r.load() if r.error is None else r.error) for r in iter_records(shards[1])}
    assert records["train-0001/s1"] == ("cat", b"img1")
    assert records["train-0001/dir/s2"] == ("dog", b"img2")
    assert records["train-0001/s3"] == (None, b"img3")
    assert records["train-0001/s4"][1].startswith("no image member")


def test_single_tar_file_is_one_shard(tmp_path: Path) -> None:
    write_tar(tmp_path / "only.tar", {"a.jpg": b"x"})
    (shard,) = list_shards(str(tmp_path / "only.tar"))
    assert shard.shard_id == "only" and [r.key for r in iter_records(shard)] == ["only/a"]


def test_parquet_shards_read_image_key_and_label(tmp_path: Path) -> None:
    table = pa.table({"image": pa.array([b"i0", None, b"i2"], pa.binary()),
                      "label": ["x", "y", None]})
    pq.write_table(table, tmp_path / "batch.parquet")
    (shard,) = list_shards(str(tmp_path))
    records = list(iter_records(shard))
    assert [(r.key, r.label) for r in records] == [("batch/0", "x"), ("batch/1", "y"), ("batch/2", None)]
    assert records[1].error == "image is null" and records[2].load() == b"i2"
    keyed = pa.table({"image": pa.array([b"a"], pa.binary()), "key": ["mine-1"]})
    pq.write_table(keyed, tmp_path / "batch.parquet")
    (shard,) = list_shards(str(tmp_path))
    assert [r.key for r in iter_records(shard)] == ["mine-1"]


def test_parquet_without_image_column_names_what_it_found(tmp_path: Path) -> None:
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "bad.parquet")
    (shard,) = list_shards(str(tmp_path))
    with pytest.raises(InputError, match=r"expected a binary 'image' column, found columns \['pixels'\]"):
        list(iter_records(shard))


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
