"""Retries of transient storage errors, in one layer per request (see storage.py): transience decided from
exception types, error codes, HTTP statuses and errnos, never from message text."""

from __future__ import annotations

import errno
import http.client
import logging
import random
import time
from collections.abc import Callable, Iterator
from functools import cache
from types import ModuleType
from typing import Any, TypeVar

from .redaction import describe_error, redact

log = logging.getLogger(__name__)
T = TypeVar("T")

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
