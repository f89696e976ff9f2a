"""Every byte cnnbatch reads or writes goes through here: fsspec URLs, atomic writes, retries, secret hygiene.

Object stores (s3, gs) give atomicity with a single PUT; filesystems with rename get it with a hidden temporary
name that is renamed into place, so a reader (or a resumed run) never sees a half-written file.

:func:`filesystem` is the one door to storage, and it opens storage protocols only (local paths, ``file://``,
``s3://``, ``gs://``, ``memory://``, ``abfs://``): http(s), chained URLs (``simplecache::http://...``) and every
other fsspec protocol are refused, so that no user- or manifest-supplied URI reaches the network around
:mod:`cnnbatch.fetch`, the only code that fetches over http(s) (vetted addresses, redirects, size and deadline).

Retries happen in one layer per request, so attempts never multiply. S3 requests are retried by botocore alone
("standard" mode, :data:`S3_MAX_ATTEMPTS` attempts in all, jittered exponential backoff; it retries 5xx, 429,
throttling codes such as SlowDown, and dropped or timed-out connections, on every request, including the ranged
reads pyarrow makes through an open file); s3fs's own retry loop is set to one attempt. :func:`with_retries` then
retries, with jittered exponential backoff, only transient errors that no library retried below it: errors of local
filesystems (timeouts, resets, EAGAIN) and of reading an S3 response body after botocore returned it; an error that
comes out of botocore's request layer (a ClientError, a connection error) is raised at once. Transience is decided
from exception types, error codes, HTTP statuses and errnos (:func:`is_transient`), never from message text.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator
from typing import Any, TypeVar

import fsspec
from fsspec.core import split_protocol, url_to_fs

from .redaction import (  # noqa: F401 - part of storage's face: every module redacts through storage
    SECRET_ENV_NAMES,
    STORAGE_ENV_PREFIXES,
    SecretEnv,
    describe_error,
    is_secret_name,
    redact,
    storage_env,
)
from .retries import is_transient, retried_by_library, with_retries  # noqa: F401 - likewise

log = logging.getLogger(__name__)
T = TypeVar("T")

class StorageError(RuntimeError):
    """Storage that cannot be reached or read, with a message that is safe to print."""


# --- the door: storage protocols only --------------------------------------------------------------------------

# What filesystem() opens. Everything else fsspec knows (http, ftp, sftp, smb, github, caches, archives, reference,
# dask, hf, ...) can reach the network or wrap something that does, and is refused.
STORAGE_PROTOCOLS = frozenset({"file", "s3", "s3a", "gs", "gcs", "memory", "abfs", "az"})
WEB_PROTOCOLS = frozenset({"http", "https"})
SUPPORTED = "supported: local paths, file://, s3://, gs://, memory://, abfs://"
WEB_REMEDY = ("for one image over http(s) use --image-url, which fetches through the vetted fetcher; "
              f"other URIs must name storage ({SUPPORTED})")

# Stores whose listings other processes change under us (actors write parts while the driver lists): fsspec's
# listing cache would serve stale listings and make ``exists``/``size`` miss fresh objects, so it is off there.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az"})


def _bit_protocol(bit: str, in_chain: bool = False) -> str:
    """The protocol fsspec gives one element of a URL (``file`` for a plain path), lower case."""
    protocol = split_protocol(bit)[0]
    if protocol is None:
        # In a chain, a bare word names a protocol ("simplecache::http://..."); alone, it is a relative path.
        return bit.lower() if in_chain and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", bit) else "file"
    return protocol.lower()


def storage_protocol(uri: str) -> str:
    """The storage protocol of ``uri`` (``file`` for a local path); :class:`StorageError` when it is not one
    :func:`filesystem` opens. The message is one line naming the protocol found and the remedy."""
    shown = redact(uri)
    if "::" in uri:
        chain = "::".join(_bit_protocol(bit, in_chain=True) for bit in uri.split("::"))
        remedy = WEB_REMEDY if set(chain.split("::")) & WEB_PROTOCOLS else f"chained URLs are not opened; {SUPPORTED}"
        raise StorageError(f"refused {shown}: the chained URL {chain} is not storage; {remedy}")
    protocol = _bit_protocol(uri)
    if protocol not in STORAGE_PROTOCOLS:
        remedy = WEB_REMEDY if protocol in WEB_PROTOCOLS else SUPPORTED
        named = f"{protocol}://" if "://" in uri else f"{protocol}:"
        raise StorageError(f"refused {shown}: {named} is not a storage protocol; {remedy}")
    return protocol


def check_uri(uri: str) -> str:
    """``uri`` itself when :func:`filesystem` would open it, without opening it; :class:`StorageError` if not."""
    storage_protocol(uri)
    return uri


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for a storage URL or a local path; :class:`StorageError` for anything else."""
    protocol = storage_protocol(uri)
    if "://" in uri:  # fsspec's registry knows protocols in lower case only ("S3://" would be "unknown")
        uri = protocol + uri[uri.index("://"):]
    try:
        if protocol in ("s3", "s3a"):
            fs, path = _s3_filesystem(uri)
        else:
            fs, path = url_to_fs(uri, **({"use_listings_cache": False} if protocol in OBJECT_STORES else {}))
    except ImportError as exc:  # e.g. s3:// without s3fs installed
        raise StorageError(f"cannot open {redact(uri)}: {exc} (install cnnbatch[s3] or cnnbatch[gcs])") from None
    except ValueError as exc:
        raise StorageError(f"cannot open {redact(uri)}: {describe_error(exc)}") from None
    if not set(_protocols(fs)) & STORAGE_PROTOCOLS:  # e.g. fsspec's registry pointed elsewhere
        raise StorageError(f"refused {redact(uri)}: it opened {type(fs).__name__}, which is not storage")
    return fs, path


# Attempts botocore makes per S3 request (the first one included), in "standard" retry mode.
S3_MAX_ATTEMPTS = 5


def s3_config() -> dict[str, Any]:
    """botocore ``Config`` arguments of cnnbatch's S3 clients: botocore is the one layer retrying S3 requests."""
    return {"retries": {"mode": "standard", "total_max_attempts": S3_MAX_ATTEMPTS}}


def _s3_filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    cls = _s3_filesystem_class()
    options = {**cls._get_kwargs_from_urls(uri), "use_listings_cache": False, "config_kwargs": s3_config()}
    return cls(**options), cls._strip_protocol(uri)


_S3_CLASS_LOCK = threading.Lock()


def _s3_filesystem_class() -> Any:
    """s3fs's filesystem with its own retry loop at one attempt (botocore retries; see the module docstring).

    A subclass rather than an attribute set on an instance: a pickled filesystem (to a Ray actor) is rebuilt from
    its class and arguments, and must come back configured the same. It is made on first use (importing s3fs
    costs a quarter second), importable as ``cnnbatch.storage.OneLayerS3FileSystem``, and shares s3fs's instance
    cache, so ``s3fs.S3FileSystem.clear_instance_cache()`` drops cnnbatch's clients too.
    """
    with _S3_CLASS_LOCK:  # one class per process: pickle finds it by name and checks it is the same object
        made = globals().get("OneLayerS3FileSystem")
        if made is not None:
            return made
        import s3fs

        class OneLayerS3FileSystem(s3fs.S3FileSystem):
            retries = 1  # s3fs's loop: one attempt, so that it never re-sends what botocore already retried

        OneLayerS3FileSystem.__module__ = __name__
        OneLayerS3FileSystem.__qualname__ = "OneLayerS3FileSystem"
        OneLayerS3FileSystem._cache = s3fs.S3FileSystem._cache
        globals()["OneLayerS3FileSystem"] = OneLayerS3FileSystem
        return OneLayerS3FileSystem


def __getattr__(name: str) -> Any:
    if name == "OneLayerS3FileSystem":  # unpickling a filesystem in a fresh process
        return _s3_filesystem_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return tuple(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return "s3" in _protocols(fs)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = _protocols(fs)
    return "file" in protocols or "local" in protocols


def has_rename(fs: fsspec.AbstractFileSystem) -> bool:
    """Filesystems whose move is a real atomic rename (object stores copy, then delete)."""
    return is_local(fs)


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts if p]])


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full URL of ``path`` on ``fs`` (fsspec strips protocols from paths)."""
    return fs.unstrip_protocol(path) if not is_local(fs) else path


# --- reads and writes ------------------------------------------------------------------------------------------

def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return with_retries(lambda: fs.cat_file(path), f"read {path}")


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` so that readers see either the old object or the whole new one."""
    if has_rename(fs):
        parent, _, name = path.rpartition("/")
        fs.makedirs(parent, exist_ok=True)
        # A dot-name keeps readers (pyarrow.dataset, DuckDB globs) from picking up a crash's leftovers.
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_dir(parent)  # the rename itself survives a power loss before the next file is written
    else:
        # One PUT is atomic on object stores: the object appears whole or not at all.
        with_retries(lambda: fs.pipe_file(path, data), f"write {path}")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create ``path`` only if it does not exist; return whether this call created it.

    Local: ``O_EXCL``. S3: a PUT with ``If-None-Match: *`` (AWS S3 since 2024, MinIO, moto); a store answering
    412 loses the race. Other fsspec stores: their exclusive ``xb`` mode when they have one.
    """
    if is_local(fs):
        parent = path.rpartition("/")[0]
        fs.makedirs(parent, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return True
    try:
        if is_s3(fs):
            with_retries(lambda: fs.pipe_file(path, data, mode="create"), f"create {path}")
        else:
            with fs.open(path, "xb") as handle:
                handle.write(data)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError, TypeError):
        # A store without conditional writes: check-then-write, documented as best effort.
        if fs.exists(path):
            return False
        write_bytes_atomic(fs, path, data)
        return True


# Keys per listing request on S3 (its maximum). Tests lower it to exercise paging on a few keys.
S3_LIST_PAGE_SIZE = 1000


def iter_sorted_entries(fs: fsspec.AbstractFileSystem, root: str,
                        page_size: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(path, info)`` for every file under ``root`` in lexicographic order of full path, streaming.

    S3 lists the whole prefix flat, one page of keys at a time (S3 returns keys in UTF-8 binary order, which is
    Python's string order), so a prefix holding millions of keys never sits in memory. Other stores are walked
    one directory at a time: siblings sort by ``name`` for files and ``name + "/"`` for folders, which is exactly
    the global order of full paths, so both give the same order (the order defines folder shard ids).
    """
    root = root.rstrip("/")
    if is_s3(fs):
        yield from _iter_s3_flat(fs, root, page_size or S3_LIST_PAGE_SIZE)
    else:
        yield from _iter_walk(fs, root)


def iter_sorted_files(fs: fsspec.AbstractFileSystem, root: str, page_size: int | None = None) -> Iterator[str]:
    """Every file path under ``root``, in lexicographic order, streaming (see :func:`iter_sorted_entries`)."""
    for path, _ in iter_sorted_entries(fs, root, page_size):
        yield path


def _iter_s3_flat(fs: fsspec.AbstractFileSystem, root: str, page_size: int) -> Iterator[tuple[str, dict[str, Any]]]:
    bucket, _, key = root.partition("/")
    prefix = f"{key}/" if key else ""
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size,
                               **getattr(fs, "req_kw", {})}  # e.g. RequestPayer for requester-pays buckets
    while True:
        page = with_retries(lambda: fs.call_s3("list_objects_v2", **request), f"list {root}")
        for item in page.get("Contents", []):
            if item["Key"].endswith("/"):  # a zero-byte "folder" marker made by consoles, not a file
                continue
            info = {"name": f"{bucket}/{item['Key']}", "size": item.get("Size"), "type": "file",
                    "ETag": item.get("ETag"), "LastModified": item.get("LastModified")}
            yield info["name"], info
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _iter_walk(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        entries = with_retries(lambda: fs.ls(root, detail=True), f"list {root}")
    except FileNotFoundError:
        return
    keyed = []
    for entry in entries:
        name = entry["name"].rstrip("/")
        if name == root:  # some stores list the folder itself
            continue
        is_dir = entry.get("type") == "directory"
        keyed.append((name.rsplit("/", 1)[-1] + ("/" if is_dir else ""), name, is_dir, entry))
    keyed.sort(key=lambda item: item[0])
    for _, name, is_dir, entry in keyed:
        if is_dir:
            yield from _iter_walk(fs, name)
        else:
            yield name, entry


def ensure_reachable(uri: str, must_exist: bool) -> tuple[fsspec.AbstractFileSystem, str]:
    """Open ``uri`` and check it can be reached, raising :class:`StorageError` with a one-line reason."""
    fs, path = filesystem(uri)
    try:
        exists = with_retries(lambda: fs.exists(path), f"reach {uri}", attempts=3)
    except Exception as exc:  # noqa: BLE001 - any failure to reach storage is reported the same way
        raise StorageError(f"cannot reach {redact(uri)}: {describe_error(exc)}") from None
    if must_exist and not exists:
        raise StorageError(f"input {redact(uri)} does not exist")
    return fs, path


def file_fingerprint(info: dict[str, Any]) -> str:
    """A cheap identity of an input object (size plus etag or mtime) to notice it changed between runs."""
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}:{tag}"
