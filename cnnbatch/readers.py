"""Stage 1b: a shard's records -- folder files, WebDataset tar members, Parquet rows -- every input accounted for.

Every input a shard holds comes out as exactly one :class:`Record`: an image to decode, or a record whose
``error`` says why it is not used, which becomes that input's ``_errors`` row. Keys are unique within a shard by
construction (a tar or Parquet file remembers the keys it gave out: a set bounded by the file); across shards
:func:`cnnbatch.shards.list_shards` sees to it (a file's keys all start with its path without extension, and no
file's stem is a folder prefix of another's).

Memory is bounded by the input, not by what a hostile input claims:

- At most :data:`MAX_RECORD_BYTES` per image for every layout: a folder file is stat'ed (local) or read with a
  ranged read of ``limit + 1`` bytes; a tar member's header size is checked before a byte of it is read; a
  Parquet cell's length is checked before it becomes Python bytes. Over the limit, the record is an error.
- Compressed tars are decompressed here, in bounded reads (tarfile's own stream decompressor does not bound a
  bzip2 or xz block), and a stream that expands more than :data:`MAX_TAR_EXPANSION` times fails its shard. Tar
  headers that tarfile would read whole (GNU long names, pax headers) are refused over :data:`MAX_TAR_HEADER_BYTES`.
- A Parquet row group whose image data would decompress to more than :data:`MAX_PARQUET_EXPANSION` times its
  stored size (and more than one image's limit) is not decoded: pyarrow decodes a page whole, so a few kilobytes
  of zstd can hold a 2 GiB cell. Its rows become errors.

Local folders: symlinks are followed only when they resolve inside the input root (to a file); anything else
that is not a regular file (a link leaving the root, a link to a folder, a FIFO, a device) is an error row and
is never opened.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import fsspec

from . import storage

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff"})
LABEL_EXTENSIONS = ("cls", "txt")  # in order of preference when a sample has both

MAX_RECORD_BYTES = 64 * 1024 * 1024  # bytes read for one image, whatever the layout
MAX_LABEL_BYTES = 64 * 1024  # a tar sample's .cls/.txt label
MAX_TAR_HEADER_BYTES = 1024 * 1024  # a GNU long name or a pax header, which tarfile reads whole
# A compressed tar may expand this many times (gzip cannot exceed about 1032x; bzip2 and xz can reach millions).
MAX_TAR_EXPANSION = 2048
# A Parquet row group's image data may decompress to this many times its stored size. Images are compressed
# formats (JPEG, PNG, WebP: about 1x; raw BMP photos a few x): more is a bomb, not a picture.
MAX_PARQUET_EXPANSION = 64


class InputError(ValueError):
    """An input that cannot be listed or read as shards (missing, empty, mixed layouts, colliding keys)."""


class ImageTooLarge(ValueError):
    """An image over :data:`MAX_RECORD_BYTES`, found while reading it (the size was not known before)."""


@dataclass
class Record:
    """One input image before decoding. ``load`` returns its bytes (lazily, so reads can run in threads)."""

    key: str
    label: str | None
    load: Callable[[], bytes]
    error: str | None = field(default=None)  # set when the record is already known to be unusable
    nbytes: int = 0  # bytes it already holds in memory (a tar member, a Parquet cell); 0 when load() reads them


def _nothing() -> bytes:
    return b""


def _constant(data: bytes) -> Callable[[], bytes]:
    """A record's ``load`` for bytes already in memory (a tar member, a Parquet cell)."""
    return lambda: data


def extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""


def folder_label(rel_key: str) -> str | None:
    """Label as ``flow_from_directory`` gives it: the first folder under the root; none for root images."""
    parts = rel_key.split("/")
    return parts[0] if len(parts) > 1 else None


def file_stem(rel: str) -> str:
    """``a/b/train-0001.tar`` -> ``a/b/train-0001``: the prefix of every key a tar or Parquet file gives."""
    return rel.rsplit(".", 1)[0]


def is_hidden(rel: str) -> bool:
    """A path with a component starting with ``.`` (``.DS_Store``, ``.git/``, ``._x.jpg``); ``.``/``..`` are not."""
    return any(part.startswith(".") and part not in (".", "..") for part in rel.split("/"))


def too_large(what: str, size: int, limit: int) -> str:
    return f"{what} is {size} bytes, over the limit of {limit} bytes per image"


# --- local files: links and special files ----------------------------------------------------------------------

_FILE_TYPES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _file_type(mode: int) -> str:
    return next((name for test, name in _FILE_TYPES if test(mode)), f"file mode {stat.S_IFMT(mode):o}")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def local_target(path: str, real_root: str, limit: int | None,
                 real_folders: dict[str, str] | None = None) -> tuple[str, str | None]:
    """``(path to open, None)`` for a local input that may be read, else ``("", why not)``.

    Symlinks are followed only to a regular file inside ``real_root`` (the input root, resolved); the path is
    resolved whole, so a symlinked folder on the way counts too. With ``limit``, a file over it is refused here,
    before it is opened. A path that has vanished is left to the read, which reports it. ``real_folders``: the
    folders already resolved in this listing (one listing's files share their folders' resolution).
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path, None
    link = stat.S_ISLNK(info.st_mode)
    if link or real_folders is None:
        real = os.path.realpath(path)
    else:  # not a link itself: the file is where its folder resolves to
        folder, name = os.path.split(path)
        real_folder = real_folders.get(folder)
        if real_folder is None:
            real_folder = real_folders[folder] = os.path.realpath(folder)
        real = os.path.join(real_folder, name)
    if not _within(real, real_root):
        if link:
            return "", f"symlink to outside the input root, not followed (-> {os.readlink(path)!r})"
        return "", f"outside the input root through a symlinked folder ({real!r}), not followed"
    if link:
        try:
            info = os.stat(real)
        except OSError:
            return "", f"broken symlink (-> {os.readlink(path)!r}), nothing to read"
        if stat.S_ISDIR(info.st_mode):
            return "", "symlink to a folder, not followed (the images in it are listed under their own paths)"
    if not stat.S_ISREG(info.st_mode):
        return "", f"not a regular file ({_file_type(info.st_mode)}), not read"
    if limit is not None and info.st_size > limit:
        return "", too_large("file", info.st_size, limit)
    return real, None


def _read_local(path: str, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file; never blocks on a FIFO swapped in since the listing."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"not a regular file ({_file_type(info.st_mode)}), not read")
        if info.st_size > limit:
            raise ImageTooLarge(too_large("file", info.st_size, limit))
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ImageTooLarge(f"file grew past {limit} bytes while read, over the limit of {limit} bytes per image")
    return data


def _read_remote(fs: fsspec.AbstractFileSystem, path: str, limit: int) -> bytes:
    """One ranged read of ``limit + 1`` bytes: as many requests as reading the whole object, never more bytes."""
    data = storage.with_retries(lambda: fs.cat_file(path, start=0, end=limit + 1), f"read {path}")
    if len(data) > limit:
        try:
            size = int(fs.size(path))
        except Exception:  # noqa: BLE001 - the size only makes the message exact
            size = limit + 1
        raise ImageTooLarge(too_large("file", size, limit))
    return data


def folder_records(fs: fsspec.AbstractFileSystem, root: str, keys: tuple[str, ...]) -> Iterator[Record]:
    limit = MAX_RECORD_BYTES
    local = storage.is_local(fs)
    real_root = os.path.realpath(root) if local else ""
    real_folders: dict[str, str] = {}
    for key in keys:
        path = f"{root}/{key}"
        label = folder_label(key)
        if not local:
            yield Record(key, label, functools.partial(_read_remote, fs, path, limit))
            continue
        target, problem = local_target(path, real_root, limit, real_folders)
        if problem:
            yield Record(key, label, _nothing, error=problem)
        else:
            yield Record(key, label, functools.partial(storage.with_retries, functools.partial(
                _read_local, target, limit), f"read {path}"))
