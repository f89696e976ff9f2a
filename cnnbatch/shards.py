"""Stage 1: list an input into shards, and read each shard's records (the readers are in :mod:`cnnbatch.readers`).

Three input layouts (README, "Extract"): a folder tree of images (class sub-folders give labels, as Keras'
``flow_from_directory``), WebDataset ``.tar`` files and Parquet files with an ``image`` column. Shard ids
are stable across reruns: folder shards are numbered chunks of the sorted key listing, file shards are named
after their file. Listing streams; a folder shard holds only its own keys.

Keys are unique in the dataset by construction. Folder keys are paths relative to the root. A tar or Parquet
file's keys are ``<file path without extension>/<key within the file>``, and the listing refuses an input where
one file's stem is a folder prefix of another's (``a.tar`` beside ``a/b.tar``: ``a/b/c`` could come from
either), so two files can never give the same key; within a file the reader remembers its keys.

What a folder listing takes: files with an image extension (hidden ``.`` names aside; ``_DSC0001.jpg`` and a
``_cls3/`` folder are images like any other), and on a local disk also symlinks to folders, which are not
followed but become ``_errors`` rows. Parquet files under a ``_`` or ``.`` name are skipped, as
``pyarrow.dataset`` skips them (``_temporary/`` of a running Spark job, ``_metadata``, our own ``_errors/``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import fsspec

from . import storage
from .parquetfiles import parquet_records
from .readers import (
    IMAGE_EXTENSIONS,
    LABEL_EXTENSIONS,
    MAX_RECORD_BYTES,
    InputError,
    Record,
    extension,
    file_stem,
    folder_label,
    folder_records,
    is_hidden,
    local_target,
)
from .tarfiles import tar_records

__all__ = ["FOLDER_SHARD_DIGITS", "IMAGE_EXTENSIONS", "LABEL_EXTENSIONS", "MAX_RECORD_BYTES", "InputError",
           "Record", "Shard", "ShardKind", "extension", "file_shard_id", "folder_label", "iter_records",
           "list_shards"]

log = logging.getLogger(__name__)

ShardKind = Literal["folder", "tar", "parquet"]
FOLDER_SHARD_DIGITS = 6


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
    if fs.isfile(root):
        yield _single_file_shard(fs, uri, root)
        return

    root_url = storage.unstrip(fs, root)
    local = storage.is_local(fs)
    layout: ShardKind | None = None
    chunk: list[str] = []
    index = 0
    files = _FileNamespaces(uri)
    for path, info in storage.iter_sorted_entries(fs, root):
        rel = path[len(root) + 1:]
        kind = _entry_kind(rel, path, info, local)
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
            yield Shard(files.add(rel), kind, root_url, (rel,), storage.file_fingerprint(info))
    if chunk:
        yield _folder_shard(index, root_url, chunk)
    elif layout is None:
        raise InputError(
            f"input {uri} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}), .tar or .parquet files"
        )


def _single_file_shard(fs: fsspec.AbstractFileSystem, uri: str, root: str) -> Shard:
    """One named ``.tar``/``.parquet`` file. A local symlink the user named is followed: the shard is the file it
    resolves to (its name gives the id and the keys)."""
    if storage.is_local(fs) and os.path.islink(root):
        root = os.path.realpath(root)
    kind = _file_kind(root)
    if kind is None:
        raise InputError(f"input {uri} is a file but not a .tar or .parquet shard")
    parent, _, name = root.rpartition("/")
    signature = storage.file_fingerprint(fs.info(root))
    return Shard(file_shard_id(name), kind, storage.unstrip(fs, parent), (name,), signature)


def _entry_kind(rel: str, path: str, info: dict[str, Any], local: bool) -> ShardKind | None:
    """What a listed entry is an input of, or ``None`` when it is not read (see the module docstring)."""
    if is_hidden(rel):
        return None
    kind = _file_kind(rel)
    if kind == "parquet" and any(part.startswith("_") for part in rel.split("/")):
        return None
    if kind is not None:
        return kind
    if extension(rel) in IMAGE_EXTENSIONS:
        return "folder"
    # A local symlink to a folder is listed as a file (it is not walked): an _errors row says it was not followed.
    if local and info.get("type") != "file" and os.path.islink(path) and os.path.isdir(path):
        return "folder"
    return None


class _FileNamespaces:
    """Shard ids and key prefixes of an input's files: refuses two files with one id, and a file whose stem is a
    folder prefix of another's (their keys would share a namespace). Sets bounded by the number of files."""

    def __init__(self, uri: str):
        self.uri = uri
        self.ids: set[str] = set()
        self.stems: dict[str, str] = {}  # stem -> the file's path
        self.folders: dict[str, str] = {}  # folder prefix of some stem -> that file's path

    def add(self, rel: str) -> str:
        shard_id = file_shard_id(rel)
        if shard_id in self.ids:
            raise InputError(f"two input files map to the same shard id {shard_id!r} (e.g. {rel})")
        stem = file_stem(rel)
        prefixes = [stem[:i] for i, char in enumerate(stem) if char == "/"]
        clash = next((self.stems[p] for p in prefixes if p in self.stems), None) or self.folders.get(stem)
        if clash is not None:
            raise InputError(
                f"input {self.uri}: {clash} and {rel} would give keys in one namespace (a file's keys are "
                f"<its path without extension>/<key>, and {file_stem(min(clash, rel, key=len))}/ is both); "
                "rename or move one of them"
            )
        self.ids.add(shard_id)
        self.stems[stem] = rel
        for prefix in prefixes:
            self.folders.setdefault(prefix, rel)
        return shard_id


def _folder_shard(index: int, root_url: str, keys: list[str]) -> Shard:
    paths = tuple(keys)
    return Shard(f"{index:0{FOLDER_SHARD_DIGITS}d}", "folder", root_url, paths, _keys_digest(paths))


def _file_kind(name: str) -> ShardKind | None:
    ext = extension(name)
    return "tar" if ext == "tar" else "parquet" if ext == "parquet" else None


def _describe(kind: ShardKind) -> str:
    return {"folder": "image files", "tar": ".tar shards", "parquet": ".parquet shards"}[kind]


# --- reading ---------------------------------------------------------------------------------------------------

def iter_records(shard: Shard, fs: fsspec.AbstractFileSystem | None = None) -> Iterator[Record]:
    """Yield a shard's records in a deterministic order: one per input (image or ``_errors`` row)."""
    if fs is None:
        fs, _ = storage.filesystem(shard.root)
    root = storage.filesystem(shard.root)[1].rstrip("/")
    if shard.kind == "folder":
        yield from folder_records(fs, root, shard.paths)
        return
    rel = shard.paths[0]
    path = f"{root}/{rel}"
    if storage.is_local(fs):
        target, problem = local_target(path, os.path.realpath(root), limit=None)
        if problem:  # a link leaving the root, a FIFO...: the file is one _errors row, and is never opened
            yield Record(file_stem(rel), None, lambda: b"", error=f"{rel}: {problem}")
            return
        path = target
    yield from (tar_records if shard.kind == "tar" else parquet_records)(fs, path, rel)
