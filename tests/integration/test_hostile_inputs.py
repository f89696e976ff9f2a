"""Hostile inputs end to end: a folder, tar shards and Parquet files full of duplicates, links, special files, wrong
types and decompression bombs, each through ``cnnbatch extract`` on a real local Ray. Every job succeeds, and its
features and ``_errors`` rows add up to the inputs exactly: every file, member and row once, keys unique."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from cnnbatch import parquetfiles, readers
from cnnbatch.extract import ExtractConfig, run_extract
from cnnbatch.shards import iter_records, list_shards

from ..conftest import TEST_IMAGE_SIZE

OVER_LIMIT = readers.MAX_RECORD_BYTES + 1024  # the actors run with the default limit


@pytest.fixture(scope="module")
def images(sample_root: Path) -> list[bytes]:
    files = sorted((sample_root / "train").rglob("*.*"))
    return [path.read_bytes() for path in files[:8]]


def extract(tmp_path: Path, input_dir: Path) -> tuple[dict[str, str | None], dict[str, str]]:
    """Run the extract job on ``input_dir``; return key -> label of the features and key -> error of ``_errors``,
    checking the job succeeded and no key appears twice anywhere in the dataset."""
    output = tmp_path / "out"
    config = ExtractConfig(input=str(input_dir), output=str(output), weights="random", image_size=TEST_IMAGE_SIZE,
                           batch_size=4, workers=1, gpus_per_worker=0, precision="float32")
    summary = run_extract(config)
    assert summary.ok and summary.failed == {}, f"expected every shard done, got failures {summary.failed}"
    features = ds.dataset(str(output)).to_table(columns=["key", "label"]).to_pylist()
    errors = pq.read_table(output / "_errors").to_pylist()
    keys = [row["key"] for row in features] + [row["key"] for row in errors]
    assert len(keys) == len(set(keys)), f"keys repeated in the dataset: {sorted(k for k in keys if keys.count(k) > 1)}"
    assert summary.images == len(keys) and summary.errors == len(errors)
    return {row["key"]: row["label"] for row in features}, {row["key"]: row["error"] for row in errors}


def test_a_hostile_folder(ray_cluster, tmp_path: Path, images: list[bytes]) -> None:
    root, outside = tmp_path / "input", tmp_path / "outside"
    for folder in (root / "cats", root / "_cls3", outside):
        folder.mkdir(parents=True)
    (root / "cats" / "a.png").write_bytes(images[0])
    (root / "cats" / "b.jpg").write_bytes(images[1])
    (root / "_DSC0001.jpg").write_bytes(images[2])  # a camera file name: an image like any other
    (root / "_cls3" / "c.png").write_bytes(images[3])  # a class folder starting with "_"
    (root / "cats" / "alias.png").symlink_to("a.png")  # inside the root: followed
    (outside / "o.png").write_bytes(images[4])
    (root / "cats" / "out.png").symlink_to(outside / "o.png")
    (root / "zero.jpg").symlink_to("/dev/zero")
    (root / "elsewhere").symlink_to(outside, target_is_directory=True)
    os.mkfifo(root / "pipe.jpg")
    with open(root / "huge.jpg", "wb") as handle:  # sparse: over the limit, costs no disk
        handle.truncate(OVER_LIMIT)
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "notes.txt").write_text("not an image: not an input")
    (root / ".DS_Store").write_bytes(b"hidden: not an input")

    features, errors = extract(tmp_path, root)
    assert errors.pop("cats/broken.jpg").startswith("cannot decode image")
    assert features == {"cats/a.png": "cats", "cats/alias.png": "cats", "cats/b.jpg": "cats",
                        "_DSC0001.jpg": None, "_cls3/c.png": "_cls3"}
    outside_root = "symlink to outside the input root, not followed"
    assert errors == {
        "cats/out.png": f"{outside_root} (-> {str(outside / 'o.png')!r})",
        "zero.jpg": f"{outside_root} (-> '/dev/zero')",
        "elsewhere": f"{outside_root} (-> {str(outside)!r})",
        "pipe.jpg": "not a regular file (a FIFO), not read",
        "huge.jpg": f"file is {OVER_LIMIT} bytes, over the limit of {readers.MAX_RECORD_BYTES} bytes per image",
    }
    # Every listed input, once: the listing holds exactly the keys of the dataset.
    listed = {key for shard in list_shards(str(root)) for key in shard.paths}
    assert listed == set(features) | set(errors) | {"cats/broken.jpg"}


def add(archive: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
        linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_hostile_tar_shards(ray_cluster, tmp_path: Path, images: list[bytes]) -> None:
    tars = tmp_path / "tars"
    (tars / "sub").mkdir(parents=True)
    with tarfile.open(tars / "hostile.tar", "w") as archive:
        add(archive, "a.png", images[0])
        add(archive, "a.cls", b"cats")
        add(archive, "a.png", images[1])  # the same name again
        add(archive, "b.jpg", images[2])
        add(archive, "b.png", images[3])  # a second image for key b
        add(archive, "b.json", b"{}")  # a sidecar of sample b: part of it
        add(archive, "c.png", images[4])
        add(archive, "d.png", images[5])
        add(archive, "c.cls", b"late")  # key c again, not adjacent
        add(archive, "e.png", kind=tarfile.SYMTYPE, linkname="/dev/zero")
        add(archive, "f.png", kind=tarfile.LNKTYPE, linkname="a.png")
        add(archive, "g.png", kind=tarfile.FIFOTYPE)
        add(archive, "h.cls", b"dogs")  # a label without an image
        add(archive, "dir/_DSC0001.png", images[6])
        add(archive, "dir/._DSC0001.png", b"AppleDouble")  # hidden: not an input
        add(archive, "README", b"no extension")
    # A 64 KiB gzip stream named .tar whose first member is over the limit of an image.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        add(archive, "zeros.png", bytes(OVER_LIMIT))
        add(archive, "after.png", images[7])
    (tars / "bomb.tar").write_bytes(gzip.compress(buffer.getvalue(), compresslevel=9))
    assert (tars / "bomb.tar").stat().st_size < OVER_LIMIT // 500
    # a.tar's member b/c.png and sub/a.tar's c.png would both be a/b/c with bare stems: here they are
    # a/b/c and sub/a/c, since keys carry the file's path.
    with tarfile.open(tars / "a.tar", "w") as archive:
        add(archive, "b/c.png", images[0])
    with tarfile.open(tars / "sub" / "a.tar", "w") as archive:
        add(archive, "b/c.png", images[1])

    features, errors = extract(tmp_path, tars)
    assert features == {"hostile/a": "cats", "hostile/b": None, "hostile/c": None, "hostile/d": None,
                        "hostile/dir/_DSC0001": None, "bomb/after": None, "a/b/c": None, "sub/a/b/c": None}
    assert errors == {
        "hostile/a.png": "a.png: a second member of that name in this tar; only the first is read",
        "hostile/b.png": "b.png: a second image for key 'hostile/b' (b.jpg is used)",
        "hostile/c.cls": "c.cls: sample 'hostile/c' came earlier in this tar, not adjacent (a sample's members must "
                         "be adjacent); not used",
        "hostile/e.png": "e.png: symbolic link member (-> '/dev/zero'), not followed",
        "hostile/f.png": "f.png: hard link member (to 'a.png'), not followed",
        "hostile/g.png": "g.png: not a regular file (a FIFO), not read",
        "hostile/h": "no image member (found h.cls)",
        "hostile/README": "no image member (found README)",
        "bomb/zeros": f"member zeros.png is {OVER_LIMIT} bytes, over the limit of {readers.MAX_RECORD_BYTES} bytes "
                      "per image",
    }
    # Every non-hidden member is in exactly one row: an image with its label and sidecars, or an error of its own.
    members = 16 - 1 + 2 + 2  # hostile.tar less its hidden member, bomb.tar, the two a.tar
    per_row = {"hostile/a": 2, "hostile/b": 2, "hostile/h": 1, "hostile/README": 1}
    assert sum(per_row.get(key, 1) for key in [*features, *errors]) == members


def test_hostile_parquet_files(ray_cluster, tmp_path: Path, images: list[bytes]) -> None:
    files = tmp_path / "parquet"
    (files / "_temporary" / "0").mkdir(parents=True)
    hf_image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({  # as Hugging Face datasets writes an Image feature, labels as class ids
        "image": pa.array([{"bytes": images[0], "path": "0.png"}, {"bytes": None, "path": "/etc/shadow"}, None,
                           {"bytes": images[1], "path": None}], hf_image),
        "label": pa.array([0, 1, 1, 2], pa.int64())}), files / "hf.parquet")
    pq.write_table(pa.table({  # duplicate keys, a null key whose fallback equals a real key
        "image": pa.array([images[2], images[3], images[4], images[5], images[6]], pa.large_binary()),
        "key": ["same", "x", "same", None, "3"]}), files / "keys.parquet")
    pq.write_table(pa.table({"image": [images[7]], "key": ["same"]}), files / "other.parquet")  # "same" again
    pq.write_table(pa.table({"image": pa.array([300_000_000, 7], pa.int64())}), files / "ints.parquet")
    schema = pa.schema([("image", pa.binary())])
    with pq.ParquetWriter(files / "bomb.parquet", schema, compression="zstd") as writer:
        writer.write_table(pa.table({"image": [bytes(OVER_LIMIT), images[0]]}, schema=schema))
        writer.write_table(pa.table({"image": [images[1]]}, schema=schema))
    assert (files / "bomb.parquet").stat().st_size < 200_000
    pq.write_table(pa.table({"image": [images[0]]}), files / "_temporary" / "0" / "part-0.parquet")  # skipped

    features, errors = extract(tmp_path, files)
    assert features == {"hf/0": "0", "hf/3": "2", "keys/same": None, "keys/x": None, "keys/3": None,
                        "other/same": None, "bomb/2": None}
    ints = f"the 'image' column is int64, expected {parquetfiles.IMAGE_TYPES}"
    bomb = errors.get("bomb/0", "")
    assert bomb.startswith("row group 0 not decoded") and bomb.endswith("refused as a decompression bomb")
    assert errors == {
        "hf/1": "image bytes missing (path '/etc/shadow'); paths are not followed",
        "hf/2": "image is null",
        "keys/same#2": "duplicate key 'same': row 0 of this file has it too; only the first is used",
        "keys/3#4": "duplicate key '3': row 3 of this file has it too; only the first is used",
        "ints/0": ints, "ints/1": ints,
        "bomb/0": bomb, "bomb/1": bomb,
    }
    rows = sum(pq.ParquetFile(path).metadata.num_rows for path in files.glob("*.parquet"))
    assert len(features) + len(errors) == rows == 4 + 5 + 1 + 2 + 3
    # The reader agrees with the job, record for record, when run here.
    here = {r.key for shard in list_shards(str(files)) for r in iter_records(shard)}
    assert here == set(features) | set(errors)

