"""Every byte cnnbatch reads or writes goes through here: fsspec URLs, atomic writes, retries, secret hygiene.

Object stores (s3, gs) give atomicity with a single PUT; filesystems with rename get it with a hidden temporary
name that is renamed into place, so a reader (or a resumed run) never sees a half-written file.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import time
import uuid
from typing import Any, Callable, Iterator, TypeVar

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)
T = TypeVar("T")

# Environment variables that configure storage access. They are handed to Ray workers so that actors on other
# nodes reach the same buckets, and never logged or stored.
STORAGE_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCE_", "GCS_", "FSSPEC_", "S3_")
SECRET_ENV_NAMES = re.compile(r"(SECRET|TOKEN|PASSWORD|KEY|CREDENTIAL)", re.IGNORECASE)


class StorageError(RuntimeError):
    """Storage that cannot be reached or read, with a message that is safe to print."""


def is_secret_name(name: str) -> bool:
    return name.startswith(STORAGE_ENV_PREFIXES) and bool(SECRET_ENV_NAMES.search(name))


def storage_env() -> dict[str, str]:
    """The storage settings of this process that are not secret (endpoint, region, profile), for Ray workers'
    ``runtime_env``. Ray's runtime-env agent logs a runtime_env verbatim, so secrets never go there."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES) and not is_secret_name(k)}


class SecretEnv(dict):
    """Secret storage variables (keys, tokens) handed to actors as a constructor argument, applied with
    :meth:`apply`. Its repr names the variables only, so an error or log line that shows it leaks nothing."""

    @classmethod
    def from_environ(cls) -> "SecretEnv":
        return cls({k: v for k, v in os.environ.items() if is_secret_name(k)})

    def apply(self) -> None:
        os.environ.update(self)

    def __repr__(self) -> str:
        return f"SecretEnv({', '.join(sorted(self))})"

    __str__ = __repr__


def redact(text: str) -> str:
    """Remove secret values from the environment and credentials embedded in URLs from ``text``."""
    for name, value in os.environ.items():
        if value and len(value) >= 6 and is_secret_name(name):
            text = text.replace(value, "***")
    # scheme://user:password@host -> scheme://***@host
    return re.sub(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@", r"\1***@", text)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for an fsspec URL or a local path."""
    options = {"use_listings_cache": False} if _protocol(uri) in OBJECT_STORES else {}
    try:
        return url_to_fs(uri, **options)
    except ImportError as exc:  # e.g. s3:// without s3fs installed
        raise StorageError(f"cannot open {uri!r}: {exc} (install cnnbatch[s3] or cnnbatch[gcs])") from None
    except ValueError as exc:
        raise StorageError(f"cannot open {uri!r}: {exc}") from None


# Stores whose listings other processes change under us (actors write parts while the driver lists): fsspec's
# listing cache would serve stale listings and make ``exists``/``size`` miss fresh objects, so it is off there.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az"})


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
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


# --- retries ---------------------------------------------------------------------------------------------------

_TRANSIENT_MARKERS = (
    "timeout", "timed out", "throttl", "slowdown", "slow down", "503", "500", "502", "504",
    "internalerror", "serviceunavailable", "connection reset", "connection aborted", "temporarily",
    "requesttimeout", "too many requests", "429", "could not connect", "connection refused",
    "serverdisconnected", "readtimeout", "connecttimeout", "broken pipe",
)


def is_transient(exc: BaseException) -> bool:
    """Whether an error from a store is worth retrying (timeouts, 5xx, throttling, dropped connections)."""
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ETIMEDOUT, errno.ECONNRESET, errno.EAGAIN):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    text = f"{type(exc).__name__} {exc}".lower()
    return any(marker in text for marker in _TRANSIENT_MARKERS)


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Call ``fn``, retrying transient storage errors with jittered exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt == attempts or not is_transient(exc):
                raise
            delay = base_delay * (2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("transient error on %s (attempt %d/%d), retrying in %.1fs: %s",
                        what, attempt, attempts, delay, redact(str(exc)))
            time.sleep(delay)
    raise AssertionError("unreachable")


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


def describe_error(exc: BaseException) -> str:
    """A one-line, secret-free description of an exception."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return redact(f"{name}: {message}" if message else name)


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
