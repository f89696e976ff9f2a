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

import errno
import http.client
import logging
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import cache
from types import ModuleType
from typing import Any, TypeVar

import fsspec
from fsspec.core import split_protocol, url_to_fs

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
    def from_environ(cls) -> SecretEnv:
        return cls({k: v for k, v in os.environ.items() if is_secret_name(k)})

    def apply(self) -> None:
        os.environ.update(self)

    def __repr__(self) -> str:
        return f"SecretEnv({', '.join(sorted(self))})"

    __str__ = __repr__


# A URL's scheme and "//"; what follows up to the authority's last "@" is its userinfo (RFC 3986 ends the
# authority at "/", "?" or "#"; a raw "@" in a password is invalid but common, and urllib splits at the last one).
_SCHEME = r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://"
_USERINFO = re.compile(
    rf"({_SCHEME})"
    r"(?:"
    r"[^\s/?#\"'<>]*"  # an authority holding "@": everything before its last "@"
    r"|"
    # "user:password@" whose password holds "/", "?" or "#" unescaped (e.g. an AWS secret key): the authority
    # would end inside the password, so take the whole run up to its last "@" -- unless what follows the colon
    # is a port ("host:8000/path/bob@example.com" stays as it is).
    r"[^\s/?#\"'<>:@\[]+:(?!\d*(?:[/?#\s\"'<>]|$))[^\s\"'<>]*"
    r")@"
)


def redact(text: str) -> str:
    """Remove secret values from the environment and the userinfo of every URL from ``text``.

    ``scheme://anything@host`` becomes ``scheme://***@host`` (a user name alone can be a token); e-mail
    addresses outside URLs and URLs without userinfo are left as they are.
    """
    for name, value in os.environ.items():
        if value and len(value) >= 6 and is_secret_name(name):
            text = text.replace(value, "***")
    return _USERINFO.sub(r"\1***@", text)


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


# --- retries ---------------------------------------------------------------------------------------------------

# HTTP statuses and service error codes worth another attempt: request timeout, throttling, server errors.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_ERROR_CODES = frozenset({
    # S3's own (https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html)
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "OperationAborted",
    # botocore's throttling and transient codes (botocore.retries.standard)
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "TransactionInProgressException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException", "RequestThrottled",
    "PriorRequestNotComplete", "EC2ThrottledException", "RequestTimeoutException",
})
# errnos of a dropped, refused or timed-out connection or a busy resource; s3fs translates S3's 503/SlowDown (and
# 409 OperationAborted) to EBUSY and 500 InternalError to EREMOTEIO (s3fs/errors.py).
TRANSIENT_ERRNOS = frozenset({
    errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.EAGAIN,
    errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH,
} - {errno.EIO})
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


@cache
def _optional(name: str) -> ModuleType | None:
    """An optional library's module (botocore, aiohttp, aiobotocore), or None when it is not installed."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what caused it (s3fs raises its translated OSError ``from`` botocore's ClientError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _client_error_is_transient(error: Any) -> bool:
    response = getattr(error, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if code in TRANSIENT_ERROR_CODES:
        return True
    if code.isdigit() and int(code) in TRANSIENT_STATUSES:  # HEAD errors have no body: the code is the status
        return True
    return isinstance(status, int) and status in TRANSIENT_STATUSES


def _verdict(exc: BaseException) -> bool | None:
    """Whether ``exc`` by its type (or errno, or status) is transient; None when its type does not say."""
    botocore = _optional("botocore.exceptions")
    aiohttp = _optional("aiohttp")
    if isinstance(exc, _PERMANENT):
        return False
    if botocore is not None and isinstance(exc, botocore.SSLError):
        return False  # a certificate that does not verify stays so
    if aiohttp is not None and isinstance(exc, aiohttp.ClientSSLError):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError, http.client.IncompleteRead)):
        return True
    if botocore is not None and isinstance(exc, (botocore.ConnectionError, botocore.HTTPClientError,
                                                 botocore.IncompleteReadError)):
        return True
    parsers = _optional("botocore.parsers")
    if parsers is not None and isinstance(exc, parsers.ResponseParserError):
        return True  # throttling answers can come with invalid XML (s3fs issue 484)
    if aiohttp is not None:
        if isinstance(exc, aiohttp.ClientResponseError):
            return exc.status in TRANSIENT_STATUSES
        if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether an error from a store is worth retrying (timeouts, 5xx, throttling, dropped connections).

    Decided from types, codes and statuses: a botocore ClientError anywhere in the chain decides by its error
    code and HTTP status; otherwise the first exception in the chain whose type (or errno) says. Message text is
    never read: a missing ``part-000500`` is as permanent as any other missing file.
    """
    botocore = _optional("botocore.exceptions")
    chain = list(_chain(exc))
    if botocore is not None:
        for link in chain:
            if isinstance(link, botocore.ClientError):
                return _client_error_is_transient(link)
    for link in chain:
        verdict = _verdict(link)
        if verdict is not None:
            return verdict
    return False


def retried_by_library(exc: BaseException) -> bool:
    """Whether ``exc`` comes out of a library layer that already retried it: botocore's request layer (a service
    error response, or a connection that failed or timed out), which :func:`filesystem` configures to make
    :data:`S3_MAX_ATTEMPTS` attempts. Errors of reading a response body after botocore returned it are not."""
    botocore = _optional("botocore.exceptions")
    if botocore is None:
        return False
    aioresponse = _optional("aiobotocore.response")
    body_errors: tuple[type[BaseException], ...] = (botocore.ResponseStreamingError,)
    if aioresponse is not None:
        body_errors += (aioresponse.AioReadTimeoutError,)
    for link in _chain(exc):
        if isinstance(link, botocore.ClientError):
            return True
        if isinstance(link, (botocore.ConnectionError, botocore.HTTPClientError)) and not isinstance(link, body_errors):
            return True
    return False


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Call ``fn``, retrying transient storage errors with jittered exponential backoff.

    Errors a library below already retried (:func:`retried_by_library`) are raised at once: one layer per request.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt == attempts or not is_transient(exc) or retried_by_library(exc):
                raise
            delay = base_delay * (2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("transient error on %s (attempt %d/%d), retrying in %.1fs: %s",
                        redact(what), attempt, attempts, delay, describe_error(exc))
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


# " at 0x7f3a5c2e1d30" in an object's default repr: noise to a user, and an address is no business of a log
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def describe_error(exc: BaseException) -> str:
    """A one-line, secret-free description of an exception (object reprs lose their memory addresses)."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return _ADDRESS.sub("", redact(f"{name}: {message}" if message else name))


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
