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

import bz2
import functools
import gzip
import lzma
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

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


def local_target(path: str, real_root: str, limit: int | None) -> tuple[str, str | None]:
    """``(path to open, None)`` for a local input that may be read, else ``("", why not)``.

    Symlinks are followed only to a regular file inside ``real_root`` (the input root, resolved); the path is
    resolved whole, so a symlinked folder on the way counts too. With ``limit``, a file over it is refused here,
    before it is opened. A path that has vanished is left to the read, which reports it.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path, None
    link = stat.S_ISLNK(info.st_mode)
    real = os.path.realpath(path)
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
    for key in keys:
        path = f"{root}/{key}"
        label = folder_label(key)
        if not local:
            yield Record(key, label, functools.partial(_read_remote, fs, path, limit))
            continue
        target, problem = local_target(path, real_root, limit)
        if problem:
            yield Record(key, label, _nothing, error=problem)
        else:
            yield Record(key, label, functools.partial(storage.with_retries, functools.partial(
                _read_local, target, limit), f"read {path}"))


# --- WebDataset tars --------------------------------------------------------------------------------------------

class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads GNU long names and pax headers whole into memory: refuse big ones before it does."""

    def _proc_member(self, archive: Any) -> Any:  # tarfile's own hook, called for every header it reads
        if self.type in _WHOLE_HEADERS and self.size > MAX_TAR_HEADER_BYTES:
            raise InputError(f"a tar extended header (type {self.type!r}) of {self.size} bytes, over the limit "
                             f"of {MAX_TAR_HEADER_BYTES} bytes")
        return super()._proc_member(archive)  # type: ignore[misc]


_WHOLE_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                  tarfile.SOLARIS_XHDTYPE)


class _ExpansionGuard:
    """A decompressed stream that refuses to yield more than ``budget`` bytes (a decompression bomb)."""

    def __init__(self, raw: Any, budget: int, describe: Callable[[int], str]):
        self.raw, self.budget, self.describe, self.total = raw, budget, describe, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size if size is not None and size >= 0 else self.budget + 1 - self.total)
        self.total += len(data)
        if self.total > self.budget:
            raise InputError(self.describe(self.total))
        return data


_COMPRESSIONS: tuple[tuple[bytes, str, Callable[[Any], Any]], ...] = (
    (b"\x1f\x8b", "gzip", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")),
    (b"BZh", "bzip2", lambda raw: bz2.BZ2File(raw, "rb")),
    (b"\xfd7zXZ\x00", "xz", lambda raw: lzma.LZMAFile(raw, "rb")),
)


def _decompressed(handle: Any, rel: str, stored: int) -> Any:
    """The tar stream of ``handle``: as it is, or decompressed in bounded reads with an expansion guard."""
    magic = handle.read(6)
    handle.seek(0)
    for prefix, name, opener in _COMPRESSIONS:
        if magic.startswith(prefix):
            budget = max(MAX_TAR_EXPANSION * stored, 2 * MAX_RECORD_BYTES)
            return _ExpansionGuard(opener(handle), budget, functools.partial(_bomb, rel, name, stored))
    return handle


def _bomb(rel: str, compression: str, stored: int, total: int) -> str:
    return (f"{rel}: its {compression} stream expands past {total} bytes from {stored}, more than "
            f"{MAX_TAR_EXPANSION}x; refused as a decompression bomb")


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"symbolic link member (-> {member.linkname!r}), not followed"
    if member.islnk():
        return f"hard link member (to {member.linkname!r}), not followed"
    kind = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
            tarfile.FIFOTYPE: "a FIFO"}.get(member.type, f"tar type {member.type!r}")
    return f"not a regular file ({kind}), not read"


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


@dataclass
class _Sample:
    key: str  # the sample key within the tar: the member path up to the first dot of its name
    recurring: bool = False  # the key was seen earlier in the tar, not adjacent: nothing of it is used
    names: list[str] = field(default_factory=list)
    image: str | None = None
    data: bytes = b""
    labels: dict[str, str | None] = field(default_factory=dict)
    error: str | None = None


class _TarReader:
    """Groups a tar's members into samples (WebDataset: adjacent members sharing a key) and accounts for each:
    a member is part of a sample (its image, its label, or a sidecar such as ``.json``) or an error row."""

    def __init__(self, prefix: str, limit: int, read: bool = True):
        self.prefix, self.limit, self.read = prefix, limit, read  # read=False: count the rows, read no data
        self.keys: set[str] = set()  # every row key given out in this tar
        self.samples: set[str] = set()  # sample keys already finished
        self.current: _Sample | None = None

    def unique(self, candidate: str, ordinal: int) -> str:
        key, extra = candidate, 1
        while key in self.keys:
            extra += 1
            key = f"{candidate}#{ordinal}" if extra == 2 else f"{candidate}#{ordinal}.{extra - 1}"
        self.keys.add(key)
        return key

    def unused(self, name: str, ordinal: int, why: str) -> Record:
        return Record(self.unique(f"{self.prefix}/{name}", ordinal), None, _nothing, error=f"{name}: {why}")

    def member(self, ordinal: int, member: tarfile.TarInfo, archive: tarfile.TarFile) -> Iterator[Record]:
        name = member.name
        if member.isdir() or is_hidden(name):
            return
        if not member.isfile():
            yield self.unused(name, ordinal, _member_kind(member))
            return
        directory, _, base = name.rpartition("/")
        stem, _, ext = base.partition(".")
        ext = ext.lower()
        key = f"{directory}/{stem}" if directory else stem
        if self.current is None or self.current.key != key:
            yield from self.flush(ordinal)
            self.current = _Sample(key, recurring=key in self.samples)
        sample = self.current
        row_key = f"{self.prefix}/{key}"
        if sample.recurring:
            yield self.unused(name, ordinal, f"sample {row_key!r} came earlier in this tar, not adjacent "
                                             "(a sample's members must be adjacent); not used")
            return
        if name in sample.names:
            yield self.unused(name, ordinal, "a second member of that name in this tar; only the first is read")
            return
        sample.names.append(name)
        if ext in IMAGE_EXTENSIONS:
            if sample.image is not None:
                yield self.unused(name, ordinal, f"a second image for key {row_key!r} ({sample.image} is used)")
            elif member.size > self.limit:
                sample.image, sample.error = name, too_large(f"member {name}", member.size, self.limit)
            else:
                sample.image, sample.data = name, _extract(archive, member) if self.read else b""
        elif ext in LABEL_EXTENSIONS:
            if ext in sample.labels:
                yield self.unused(name, ordinal, f"a second .{ext} label for key {row_key!r}")
            elif member.size > MAX_LABEL_BYTES:
                sample.labels[ext] = None
                sample.error = sample.error or (f"label {name} is {member.size} bytes, over the limit of "
                                                f"{MAX_LABEL_BYTES} bytes per label")
            else:
                text = _extract(archive, member).decode("utf-8", "replace") if self.read else ""
                sample.labels[ext] = text.strip() or None
        # any other extension is a sidecar of the sample (.json, captions...): part of it, not read

    def flush(self, ordinal: int) -> Iterator[Record]:
        sample, self.current = self.current, None
        if sample is None or sample.recurring:
            return
        self.samples.add(sample.key)
        label = next((sample.labels[ext] for ext in LABEL_EXTENSIONS if ext in sample.labels), None)
        error = sample.error if sample.image is not None else f"no image member (found {_listing(sample.names)})"
        candidate = f"{self.prefix}/{sample.key}"
        key = self.unique(candidate, ordinal)
        if key != candidate:  # only an earlier error row named after an odd member (``x#3``) can hold it
            error = f"key {candidate!r} is taken by an earlier error row of this tar; not used"
        yield Record(key, label, _nothing if error else _constant(sample.data), error=error)


def _extract(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    return handle.read() if handle is not None else b""


def count_tar_rows(archive: tarfile.TarFile) -> int:
    """The rows (features and ``_errors``) :func:`tar_records` gives for a tar, from its headers alone: for a dry
    run (``cnnbatch plan``), with the archive opened by the caller in any mode (``r:*`` seeks past the data)."""
    reader = _TarReader("", MAX_RECORD_BYTES, read=False)
    rows = ordinal = 0
    for ordinal, member in enumerate(archive, start=1):
        rows += sum(1 for _ in reader.member(ordinal, member, archive))
    return rows + sum(1 for _ in reader.flush(ordinal + 1))


def tar_records(fs: fsspec.AbstractFileSystem, path: str, rel: str) -> Iterator[Record]:
    """Stream a WebDataset tar in one sequential pass: members ``<key>.<ext>`` grouped by key."""
    reader = _TarReader(file_stem(rel), MAX_RECORD_BYTES)
    with storage.with_retries(lambda: fs.open(path, "rb"), f"open {path}") as handle:
        stored = getattr(handle, "size", None)
        stream = _decompressed(handle, rel, int(stored if stored is not None else fs.size(path)))
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as archive:
            ordinal = 0
            while (member := archive.next()) is not None:
                ordinal += 1
                archive.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every header it read; a stream needs none of them
                yield from reader.member(ordinal, member, archive)
            yield from reader.flush(ordinal + 1)


# --- Parquet ----------------------------------------------------------------------------------------------------

IMAGE_TYPES = "binary, large_binary or struct<bytes: binary, path: string> (Hugging Face datasets' Image)"


def _is_binary(kind: Any) -> bool:
    import pyarrow as pa

    view = getattr(pa.types, "is_binary_view", None)
    return bool(pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or (view is not None and view(kind)))


def image_column_problem(schema: Any) -> str | None:
    """Why a Parquet file's ``image`` column cannot be read as images, or ``None`` when it can."""
    import pyarrow as pa

    if "image" not in schema.names:
        return f"no 'image' column (found columns {schema.names}); expected one of {IMAGE_TYPES}"
    kind = schema.field("image").type
    if _is_binary(kind):
        return None
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and _is_binary(kind.field("bytes").type):
        return None
    return f"the 'image' column is {kind}, expected {IMAGE_TYPES}"


def _key_column_problem(schema: Any) -> str | None:
    import pyarrow as pa

    if "key" not in schema.names:
        return None
    kind = schema.field("key").type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind) or (
            getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        return None
    return f"the 'key' column is {kind}, expected strings or integers"


class _ParquetKeys:
    """The keys a Parquet file gives: ``<file stem>/<key>``, or ``<file stem>/<row>`` for a null key; a key
    already given (a duplicate, or a fallback equal to a real key) makes that row an error row of its own."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.first_row: dict[str, int] = {}

    def key(self, value: Any, row: int) -> tuple[str, str | None]:
        candidate = f"{self.prefix}/{row if value is None else value}"
        first = self.first_row.get(candidate)
        if first is None:
            self.first_row[candidate] = row
            return candidate, None
        key, extra = f"{candidate}#{row}", 1
        while key in self.first_row:
            extra += 1
            key = f"{candidate}#{row}.{extra}"
        self.first_row[key] = row
        if value is None:
            return key, (f"null key, and its fallback {candidate!r} (<file>/<row>) is already the key of row "
                         f"{first} of this file; not used")
        return key, f"duplicate key {str(value)!r}: row {first} of this file has it too; only the first is used"


def _row_group_problem(metadata: Any, index: int, limit: int) -> tuple[str | None, int]:
    """A reason not to decode row group ``index`` (a decompression bomb), and rows per batch to decode it in."""
    group = metadata.row_group(index)
    columns = [group.column(i) for i in range(group.num_columns)]
    image = [c for c in columns if c.path_in_schema == "image" or c.path_in_schema.startswith("image.")]
    raw = sum(c.total_uncompressed_size for c in image)
    stored = sum(c.total_compressed_size for c in image)
    batch = max(1, min(256, limit // max(1, raw // max(1, group.num_rows))))
    if raw > limit and raw > MAX_PARQUET_EXPANSION * max(1, stored):
        return (f"row group {index} not decoded: its image data decompresses to {raw} bytes from {stored} "
                f"({raw // max(1, stored)}x, over {MAX_PARQUET_EXPANSION}x); refused as a decompression bomb"), batch
    return None, batch


def _cells(column: Any, limit: int) -> Iterator[tuple[bytes | None, str | None]]:
    """``(image bytes, None)`` or ``(None, why not)`` for each cell of a binary or ``{bytes, path}`` column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    valid = column.is_valid().to_pylist()
    paths: list[Any] = [None] * len(column)
    if pa.types.is_struct(column.type):
        fields = dict(zip((f.name for f in column.type), column.flatten()))  # offsets and the struct's nulls applied
        if "path" in fields:
            paths = fields["path"].to_pylist()
        column = fields["bytes"]
    lengths = pc.binary_length(column).to_pylist()
    for i, (ok, length) in enumerate(zip(valid, lengths)):
        if not ok or (length is None and paths[i] is None):
            yield None, "image is null"
        elif length is None:
            yield None, f"image bytes missing (path {str(paths[i])!r}); paths are not followed"
        elif length > limit:
            yield None, too_large("image cell", length, limit)
        else:
            yield column[i].as_py(), None


def parquet_records(fs: fsspec.AbstractFileSystem, path: str, rel: str) -> Iterator[Record]:
    """One record per row, in row order. A file whose ``image`` (or ``key``) column cannot be used gives an
    error row per row, naming the type found; a row group refused as a bomb gives an error row per row."""
    import pyarrow.parquet as pq

    limit = MAX_RECORD_BYTES
    keys = _ParquetKeys(file_stem(rel))
    with storage.with_retries(lambda: fs.open(path, "rb"), f"open {path}") as handle:
        parquet = pq.ParquetFile(handle)
        schema = parquet.schema_arrow
        file_problem = image_column_problem(schema) or _key_column_problem(schema)
        key_column = "key" in schema.names and _key_column_problem(schema) is None
        label_column = "label" in schema.names
        row = 0
        for group in range(parquet.metadata.num_row_groups):
            problem, batch_size = _row_group_problem(parquet.metadata, group, limit)
            problem = file_problem or problem
            columns = [c for c, wanted in (("key", key_column), ("label", label_column), ("image", not problem))
                       if wanted]
            if not columns:  # nothing to read: the rows are errors with their fallback keys
                for _ in range(parquet.metadata.row_group(group).num_rows):
                    key, _error = keys.key(None, row)
                    yield Record(key, None, _nothing, error=problem)
                    row += 1
                continue
            for batch in parquet.iter_batches(batch_size=batch_size, row_groups=[group], columns=columns):
                values = batch.column("key").to_pylist() if key_column else [None] * batch.num_rows
                labels = batch.column("label").to_pylist() if label_column else [None] * batch.num_rows
                cells = _cells(batch.column("image"), limit) if not problem else iter(
                    [(None, problem)] * batch.num_rows)
                for value, label, (data, error) in zip(values, labels, cells):
                    key, key_error = keys.key(value, row)
                    error = key_error or error
                    yield Record(key, None if label is None else str(label),
                                 _nothing if error or data is None else _constant(data), error=error)
                    row += 1
