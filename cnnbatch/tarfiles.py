"""WebDataset tars, read in one sequential pass with bounded memory: members ``<key>.<ext>`` grouped by key,
every member accounted for (readers.py has the rules and the limits, which are read from there at call time)."""

from __future__ import annotations

import bz2
import functools
import gzip
import lzma
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from . import readers, storage
from .readers import (
    IMAGE_EXTENSIONS,
    LABEL_EXTENSIONS,
    InputError,
    Record,
    _constant,
    _nothing,
    file_stem,
    is_hidden,
    too_large,
)

# --- WebDataset tars --------------------------------------------------------------------------------------------

class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads GNU long names and pax headers whole into memory: refuse big ones before it does."""

    def _proc_member(self, archive: Any) -> Any:  # tarfile's own hook, called for every header it reads
        if self.type in _WHOLE_HEADERS and self.size > readers.MAX_TAR_HEADER_BYTES:
            raise InputError(f"a tar extended header (type {self.type!r}) of {self.size} bytes, over the limit "
                             f"of {readers.MAX_TAR_HEADER_BYTES} bytes")
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
            budget = max(readers.MAX_TAR_EXPANSION * stored, 2 * readers.MAX_RECORD_BYTES)
            return _ExpansionGuard(opener(handle), budget, functools.partial(_bomb, rel, name, stored))
    return handle


def _bomb(rel: str, compression: str, stored: int, total: int) -> str:
    return (f"{rel}: its {compression} stream expands past {total} bytes from {stored}, more than "
            f"{readers.MAX_TAR_EXPANSION}x; refused as a decompression bomb")


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
            elif member.size > readers.MAX_LABEL_BYTES:
                sample.labels[ext] = None
                sample.error = sample.error or (f"label {name} is {member.size} bytes, over the limit of "
                                                f"{readers.MAX_LABEL_BYTES} bytes per label")
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
        yield Record(key, label, _nothing if error else _constant(sample.data), error=error,
                     nbytes=0 if error else len(sample.data))


def _extract(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    return handle.read() if handle is not None else b""


def count_tar_rows(archive: tarfile.TarFile) -> int:
    """The rows (features and ``_errors``) :func:`tar_records` gives for a tar, from its headers alone: for a dry
    run (``cnnbatch plan``), with the archive opened by the caller in any mode (``r:*`` seeks past the data)."""
    reader = _TarReader("", readers.MAX_RECORD_BYTES, read=False)
    rows = ordinal = 0
    for ordinal, member in enumerate(archive, start=1):
        rows += sum(1 for _ in reader.member(ordinal, member, archive))
    return rows + sum(1 for _ in reader.flush(ordinal + 1))


def tar_records(fs: fsspec.AbstractFileSystem, path: str, rel: str) -> Iterator[Record]:
    """Stream a WebDataset tar in one sequential pass: members ``<key>.<ext>`` grouped by key."""
    reader = _TarReader(file_stem(rel), readers.MAX_RECORD_BYTES)
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
