"""Stage 1: list an input into shards, and read each shard's records.

Three input layouts (see CONTRACT.md): a folder tree of images (class sub-folders give labels, as Keras'
``flow_from_directory``), WebDataset ``.tar`` files and Parquet files with a binary ``image`` column. Shard ids
are stable across reruns: folder shards are numbered chunks of the sorted key listing, file shards are named
after their file. Listing streams; a folder shard holds only its own keys.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import fsspec

from . import storage

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff"})
LABEL_EXTENSIONS = ("cls", "txt")
ShardKind = Literal["folder", "tar", "parquet"]
FOLDER_SHARD_DIGITS = 6


class InputError(ValueError):
    """An input that cannot be listed as shards (missing, empty, mixed layouts)."""


@dataclass(frozen=True)
class Shard:
    """One unit of work: it becomes exactly one ``part-<shard_id>.parquet``."""

    shard_id: str
    kind: ShardKind
    root: str  # the input root as a URL
    paths: tuple[str, ...]  # folder: image keys relative to root; tar/parquet: the one file, relative to root
    signature: str = ""  # identity of the shard's content, to notice a changed input on resume

    @property
    def num_files(self) -> int:
        return len(self.paths)


@dataclass
class Record:
    """One input image before decoding. ``load`` returns its bytes (lazily, so reads can run in threads)."""

    key: str
    label: str | None
    load: Callable[[], bytes]
    error: str | None = field(default=None)  # set when the record is already known to be unusable


def _constant(data: bytes) -> Callable[[], bytes]:
    """A record's ``load`` for bytes already in memory (a tar member, a Parquet cell)."""
    return lambda: data


def extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""


def _is_bookkeeping(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _keys_digest(keys: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def file_shard_id(rel_path: str) -> str:
    """``a/b/train-0001.tar`` -> ``a__b__train-0001``: unique per input file, safe as a file name."""
    stem = rel_path.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9._=-]", "_", stem.replace("/", "__"))


def list_shards(uri: str, shard_size: int = 1000) -> Iterator[Shard]:
    """Yield the shards of an input in a stable order.

    ``uri`` is a folder of images, a folder of ``.tar`` or ``.parquet`` files, or one such file.
    """
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    fs, root = storage.ensure_reachable(uri, must_exist=True)
    root = root.rstrip("/")
    root_url = storage.unstrip(fs, root)
    if fs.isfile(root):
        kind = _file_kind(root)
        if kind is None:
            raise InputError(f"input {uri} is a file but not a .tar or .parquet shard")
        parent = root.rsplit("/", 1)[0]
        name = root.rsplit("/", 1)[-1]
        info = fs.info(root)
        yield Shard(file_shard_id(name), kind, storage.unstrip(fs, parent), (name,), storage.file_fingerprint(info))
        return

    layout: ShardKind | None = None
    chunk: list[str] = []
    index = 0
    seen_ids: set[str] = set()
    for path, info in storage.iter_sorted_entries(fs, root):
        rel = path[len(root) + 1:]
        if _is_bookkeeping(rel):
            continue
        kind = _file_kind(rel) or ("folder" if extension(rel) in IMAGE_EXTENSIONS else None)
        if kind is None:
            continue
        if layout is None:
            layout = kind
        elif kind != layout:
            raise InputError(
                f"input {uri} mixes layouts: expected only {_describe(layout)}, also found {_describe(kind)} "
                f"({rel}); point --input at one kind"
            )
        if kind == "folder":
            chunk.append(rel)
            if len(chunk) == shard_size:
                yield _folder_shard(index, root_url, chunk)
                index += 1
                chunk = []
        else:
            shard_id = file_shard_id(rel)
            if shard_id in seen_ids:
                raise InputError(f"two input files map to the same shard id {shard_id!r} (e.g. {rel})")
            seen_ids.add(shard_id)
            yield Shard(shard_id, kind, root_url, (rel,), storage.file_fingerprint(info))
    if chunk:
        yield _folder_shard(index, root_url, chunk)
    elif layout is None:
        raise InputError(
            f"input {uri} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}), .tar or .parquet files"
        )


def _folder_shard(index: int, root_url: str, keys: list[str]) -> Shard:
    paths = tuple(keys)
    return Shard(f"{index:0{FOLDER_SHARD_DIGITS}d}", "folder", root_url, paths, _keys_digest(paths))


def _file_kind(name: str) -> ShardKind | None:
    ext = extension(name)
    return "tar" if ext == "tar" else "parquet" if ext == "parquet" else None


def _describe(kind: ShardKind) -> str:
    return {"folder": "image files", "tar": ".tar shards", "parquet": ".parquet shards"}[kind]


def folder_label(rel_key: str) -> str | None:
    """Label as ``flow_from_directory`` gives it: the first folder under the root; none for root images."""
    parts = rel_key.split("/")
    return parts[0] if len(parts) > 1 else None


# --- reading ---------------------------------------------------------------------------------------------------

def iter_records(shard: Shard, fs: fsspec.AbstractFileSystem | None = None) -> Iterator[Record]:
    """Yield a shard's records in a deterministic order."""
    if fs is None:
        fs, _ = storage.filesystem(shard.root)
    root = storage.filesystem(shard.root)[1].rstrip("/")
    if shard.kind == "folder":
        yield from _folder_records(fs, root, shard.paths)
    elif shard.kind == "tar":
        yield from _tar_records(fs, f"{root}/{shard.paths[0]}", shard.paths[0])
    else:
        yield from _parquet_records(fs, f"{root}/{shard.paths[0]}", shard.paths[0])


def _folder_records(fs: fsspec.AbstractFileSystem, root: str, keys: tuple[str, ...]) -> Iterator[Record]:
    for key in keys:
        path = f"{root}/{key}"
        yield Record(key, folder_label(key), functools.partial(storage.read_bytes, fs, path))


def _tar_records(fs: fsspec.AbstractFileSystem, path: str, rel: str) -> Iterator[Record]:
    """Stream a WebDataset tar: members ``<key>.<ext>`` grouped by key, read in one sequential pass."""
    prefix = rel.rsplit(".", 1)[0]
    group_key: str | None = None
    group: dict[str, bytes] = {}

    def flush() -> Iterator[Record]:
        if group_key is None:
            return
        key = f"{prefix}/{group_key}"
        image_exts = [ext for ext in group if ext in IMAGE_EXTENSIONS]
        label = None
        for ext in LABEL_EXTENSIONS:
            if ext in group:
                label = group[ext].decode("utf-8", "replace").strip() or None
                break
        if not image_exts:
            yield Record(key, label, lambda: b"", error=f"no image member (found .{', .'.join(sorted(group))})")
        else:
            data = group[image_exts[0]]
            yield Record(key, label, _constant(data))

    with storage.with_retries(lambda: fs.open(path, "rb"), f"open {path}") as handle:
        with tarfile.open(fileobj=handle, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                if base.startswith((".", "_")) or "." not in base:
                    continue
                stem, _, ext = base.partition(".")
                key = f"{directory}/{stem}" if directory else stem
                if key != group_key:
                    yield from flush()
                    group_key, group = key, {}
                extracted = archive.extractfile(member)
                group[ext.lower()] = extracted.read() if extracted else b""
            yield from flush()


def _parquet_records(fs: fsspec.AbstractFileSystem, path: str, rel: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    prefix = rel.rsplit(".", 1)[0]
    with storage.with_retries(lambda: fs.open(path, "rb"), f"open {path}") as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        if "image" not in names:
            raise InputError(f"{rel}: expected a binary 'image' column, found columns {names}")
        columns = [c for c in ("image", "key", "label") if c in names]
        row = 0
        for batch in parquet.iter_batches(batch_size=256, columns=columns):
            data = batch.to_pydict()
            for i, image in enumerate(data["image"]):
                key = data["key"][i] if "key" in data and data["key"][i] is not None else f"{prefix}/{row}"
                label = data["label"][i] if "label" in data else None
                label = None if label is None else str(label)
                if image is None:
                    yield Record(str(key), label, lambda: b"", error="image is null")
                else:
                    blob = bytes(image)
                    yield Record(str(key), label, _constant(blob))
                row += 1

