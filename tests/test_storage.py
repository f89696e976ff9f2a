"""storage: which errors are transient and who retries them, redaction, the one door to storage, weights references.

Real parts only: a stdlib HTTP server on 127.0.0.1 posing as the S3 endpoint (s3fs and botocore talk to it over
real HTTP, unpatched but for botocore's backoff delay, made zero so the test does not wait), moto's server for the
round trip, and a counting HTTP server that must never see a request a guard refused.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import io
import pickle
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import aiohttp
import botocore.exceptions
import pytest
import s3fs
from aiobotocore.response import AioReadTimeoutError
from botocore.retries.standard import ExponentialBackoff
from s3fs.errors import translate_boto_error

from cnnbatch import retries, storage
from cnnbatch.backbones import get_backbone
from cnnbatch.weights import (
    WeightsError,
    WeightsRef,
    keras_weights_arg,
    local_weights_file,
    resolve_weights,
    validate_weights_ref,
)

from .conftest import FAKE_AWS_KEY_ID, FAKE_AWS_SECRET, S3Server

HEX = "0" * 63 + "a"


def client_error(status: int, code: str, operation: str = "GetObject") -> botocore.exceptions.ClientError:
    """What botocore raises for an error response (HEAD errors carry the status as their code)."""
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": f"the {code} message"},
         "ResponseMetadata": {"HTTPStatusCode": status, "RetryAttempts": 0}}, operation)


def translated(status: int, code: str) -> BaseException:
    """The exception s3fs raises for that response (s3fs/errors.py), chained to botocore's."""
    return translate_boto_error(client_error(status, code))


# --- classification --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status, code, transient", [
    (404, "NoSuchKey", False), (404, "404", False), (404, "NoSuchBucket", False),
    (403, "AccessDenied", False), (403, "403", False), (403, "SignatureDoesNotMatch", False),
    (400, "InvalidArgument", False), (412, "PreconditionFailed", False), (416, "InvalidRange", False),
    (503, "SlowDown", True), (503, "ServiceUnavailable", True), (503, "503", True),
    (500, "InternalError", True), (500, "500", True), (502, "BadGateway", True), (504, "GatewayTimeout", True),
    (429, "TooManyRequests", True), (400, "Throttling", True), (400, "ThrottlingException", True),
    (400, "RequestTimeout", True), (409, "OperationAborted", True),
])
def test_service_errors_are_classified_by_code_and_status(status: int, code: str, transient: bool) -> None:
    raw = client_error(status, code)
    assert storage.is_transient(raw) is transient
    assert storage.is_transient(translated(status, code)) is transient, "s3fs's translation keeps the verdict"


def test_s3fs_translations_are_the_types_the_classifier_expects() -> None:
    """The premise of the errno rules, read off s3fs itself."""
    assert isinstance(translated(404, "NoSuchKey"), FileNotFoundError)
    assert isinstance(translated(403, "AccessDenied"), PermissionError)
    assert translated(503, "SlowDown").errno == errno.EBUSY  # type: ignore[attr-defined]
    assert translated(500, "InternalError").errno == errno.EREMOTEIO  # type: ignore[attr-defined]


@pytest.mark.parametrize("exc", [
    FileNotFoundError("bucket/shards/part-000500.parquet"),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/503/part-000503.tar"),
    PermissionError("bucket/500/Access Denied"),
    OSError("503 Service Unavailable"),  # text only: no errno, no type, no code says so
    OSError(errno.EINVAL, "cannot open s3://b/timeout-runs/part-0.parquet"),
    ValueError("not a parquet file: b/timeouts/x.parquet"),
    RuntimeError("read timed out at /data/timeout/x"),
    RuntimeError("Could not connect to the endpoint URL: http://127.0.0.1:9/b"),
    RuntimeError("An error occurred (InternalError): We encountered an internal error"),
    OSError(errno.EIO, "An error occurred (SlowDown) when calling the PutObject operation"),
    KeyError("SlowDown"),
])
def test_text_never_makes_an_error_transient(exc: BaseException) -> None:
    assert storage.is_transient(exc) is False


@pytest.mark.parametrize("exc", [
    TimeoutError("read timed out"),
    ConnectionResetError("connection reset by peer"),
    ConnectionRefusedError(),
    BrokenPipeError(),
    OSError(errno.ETIMEDOUT, "x"), OSError(errno.ECONNRESET, "x"), OSError(errno.EAGAIN, "x"),
    OSError(errno.EBUSY, "Please reduce your request rate."),  # s3fs's SlowDown without its cause
    OSError(errno.EREMOTEIO, "We encountered an internal error."),  # s3fs's InternalError
    http.client.IncompleteRead(b"partial", 10),
    botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
    botocore.exceptions.ConnectTimeoutError(endpoint_url="http://127.0.0.1:9"),
    botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
    botocore.exceptions.ConnectionClosedError(endpoint_url="http://127.0.0.1:9"),
    botocore.exceptions.ResponseStreamingError(error="reset"),
    aiohttp.ClientPayloadError("Response payload is not completed"),
    aiohttp.ServerDisconnectedError(),
])
def test_transient_types_and_errnos(exc: BaseException) -> None:
    assert storage.is_transient(exc) is True


def test_causes_and_statuses_decide_when_the_outer_type_does_not() -> None:
    try:
        try:
            raise TimeoutError("slow")
        except TimeoutError as inner:
            raise RuntimeError("reading shard 7 failed") from inner
    except RuntimeError as outer:
        assert storage.is_transient(outer)
    assert not storage.is_transient(botocore.exceptions.SSLError(endpoint_url="https://x", error="bad cert"))
    request_info = aiohttp.RequestInfo(url=aiohttp.client.URL("http://x/"), method="GET", headers={})  # type: ignore[call-arg]
    assert storage.is_transient(aiohttp.ClientResponseError(request_info, (), status=503))
    assert not storage.is_transient(aiohttp.ClientResponseError(request_info, (), status=404))


def test_library_retried_errors_are_told_from_body_errors() -> None:
    """botocore's request layer retried these; errors reading a body after it returned are left to us."""
    assert storage.retried_by_library(client_error(503, "SlowDown"))
    assert storage.retried_by_library(translated(503, "SlowDown"))
    assert storage.retried_by_library(botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"))
    assert storage.retried_by_library(botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"))
    assert not storage.retried_by_library(botocore.exceptions.ResponseStreamingError(error="reset"))
    assert not storage.retried_by_library(AioReadTimeoutError(endpoint_url="http://x"))
    assert not storage.retried_by_library(aiohttp.ClientPayloadError("cut"))
    assert not storage.retried_by_library(TimeoutError())
    assert not storage.retried_by_library(OSError(errno.EBUSY, "busy"))


# --- our layer: with_retries -----------------------------------------------------------------------------------

def test_transient_errors_are_told_apart() -> None:
    """The classification's main cases, as the old substring test had them, by type and code instead."""
    assert storage.is_transient(TimeoutError("read timed out"))
    assert storage.is_transient(ConnectionResetError("connection reset by peer"))
    assert storage.is_transient(translated(503, "SlowDown"))
    assert storage.is_transient(client_error(503, "ServiceUnavailable"))
    assert storage.is_transient(botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b"))
    assert storage.is_transient(translated(500, "InternalError"))
    assert not storage.is_transient(FileNotFoundError("b/missing"))
    assert not storage.is_transient(PermissionError("Access Denied"))
    assert not storage.is_transient(ValueError("not a parquet file"))


def test_transient_errors_are_retried_with_growing_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []
    monkeypatch.setattr(retries.time, "sleep", delays.append)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise OSError(errno.EBUSY, "Please reduce your request rate.")
        return "ok"

    assert storage.with_retries(flaky, "test", attempts=5, base_delay=0.1) == "ok"
    assert len(calls) == 4 and len(delays) == 3
    # base * 2**(attempt-1), jittered by a factor in [0.5, 1.5): each delay within its own band
    for attempt, delay in enumerate(delays, start=1):
        assert 0.1 * 2 ** (attempt - 1) * 0.5 <= delay < 0.1 * 2 ** (attempt - 1) * 1.5, (attempt, delay)
    assert delays[0] < delays[2] and all(d > 0 for d in delays)

    calls.clear()
    with pytest.raises(PermissionError):
        storage.with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(PermissionError("denied")), "test")
    assert len(calls) == 1, "a permanent error is not retried"

    with pytest.raises(TimeoutError):
        storage.with_retries(lambda: (_ for _ in ()).throw(TimeoutError("slow")), "test", attempts=3)
    assert len(delays) == 3 + 2, "gives up after the last attempt"

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(
            FileNotFoundError("bucket/part-000503.parquet")), "test")
    assert len(calls) == 1 and len(delays) == 5, "a name holding 503 is still a missing file"


def test_errors_botocore_already_retried_are_not_retried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []
    monkeypatch.setattr(retries.time, "sleep", delays.append)
    calls = []

    def throttled() -> None:
        calls.append(1)
        raise translated(503, "SlowDown")

    with pytest.raises(OSError):
        storage.with_retries(throttled, "test", attempts=5)
    assert len(calls) == 1 and delays == []

    calls.clear()

    def body_cut() -> None:  # reading a body after botocore returned it: no library retried that
        calls.append(1)
        raise botocore.exceptions.ResponseStreamingError(error="connection reset")

    with pytest.raises(botocore.exceptions.ResponseStreamingError):
        storage.with_retries(body_cut, "test", attempts=3, base_delay=0.01)
    assert len(calls) == 3 and len(delays) == 2


# --- one layer against a real HTTP endpoint posing as S3 ------------------------------------------------------

def _s3_error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>cnnbatch-test</RequestId></Error>").encode()


class FakeS3Handler(BaseHTTPRequestHandler):
    """Object keys say what to answer: ``ok/...``, ``flaky-N/...`` (503 N times, then the object),
    ``always-503/...``, ``always-500/...``, ``get-503/...`` (its HEAD answers, every GET is a 503 SlowDown),
    ``forbidden/...``, ``missing/...``. Every request is counted, as
    ``"METHOD /bucket/key"``."""

    protocol_version = "HTTP/1.1"
    counts: Counter[str] = Counter()
    per_path: Counter[str] = Counter()
    lock = threading.Lock()
    body = b"object bytes"

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes, content_type: str = "application/xml") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status == 200:
            self.send_header("ETag", '"' + hashlib.md5(body).hexdigest() + '"')
            self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = urlsplit(self.path).path
        with self.lock:
            self.counts[f"{self.command} {path}"] += 1
            self.per_path[path] += 1
            seen = self.per_path[path]
        key = path.split("/", 2)[2] if path.count("/") >= 2 else ""
        kind = key.split("/", 1)[0]
        if kind == "ok" or (kind.startswith("flaky-") and seen > int(kind.split("-")[1])) or (
                kind == "get-503" and self.command == "HEAD"):
            self._answer(200, self.body, "application/octet-stream")
        elif kind.startswith("flaky-") or kind in ("always-503", "get-503"):
            self._answer(503, _s3_error("SlowDown", "Please reduce your request rate."))
        elif kind == "always-500":
            self._answer(500, _s3_error("InternalError", "We encountered an internal error. Please try again."))
        elif kind == "forbidden":
            self._answer(403, _s3_error("AccessDenied", "Access Denied"))
        else:
            self._answer(404, _s3_error("NoSuchKey", "The specified key does not exist."))

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle  # noqa: N815 - http.server's naming


@pytest.fixture
def fake_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Counter[str], list[int]]]:
    """The fake endpoint in ``AWS_*``; yields the request counter and the attempt numbers botocore backed off on.

    botocore's backoff (rand * 2**attempt seconds) is computed as usual and recorded, then replaced by zero so
    that the test does not sleep; the retry decisions are botocore's own.
    """
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeS3Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_AWS_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    backoffs: list[int] = []
    original = ExponentialBackoff.delay_amount

    def no_wait(self: ExponentialBackoff, context: object) -> float:
        assert original(self, context) >= 0
        backoffs.append(context.attempt_number)  # type: ignore[attr-defined]
        return 0.0

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", no_wait)
    our_sleeps: list[float] = []  # storage's own backoff only (time.sleep itself stays: subprocess waits use it)
    monkeypatch.setattr(retries, "time", SimpleNamespace(sleep=our_sleeps.append))
    FakeS3Handler.counts = Counter()
    FakeS3Handler.per_path = Counter()
    s3fs.S3FileSystem.clear_instance_cache()
    yield FakeS3Handler.counts, backoffs
    s3fs.S3FileSystem.clear_instance_cache()
    httpd.shutdown()
    httpd.server_close()
    assert our_sleeps == [], "with_retries never retried what botocore had retried"


@pytest.mark.parametrize("key, error", [("missing/part-000500.parquet", FileNotFoundError),
                                        ("forbidden/part-000503.parquet", PermissionError)])
def test_s3_404_and_403_are_requested_once(fake_s3: tuple[Counter[str], list[int]], key: str,
                                           error: type[Exception]) -> None:
    counts, backoffs = fake_s3
    fs, path = storage.filesystem(f"s3://bucket/{key}")
    with pytest.raises(error) as info:
        storage.read_bytes(fs, path)
    assert not storage.is_transient(info.value)
    # s3fs reads the object's HEAD first and, for a 404, lists once to tell a "folder"; nothing is asked twice
    assert counts[f"HEAD /bucket/{key}"] == 1 and set(counts.values()) == {1} and backoffs == []
    assert f"GET /bucket/{key}" not in counts


def test_s3_503_is_retried_until_it_answers(fake_s3: tuple[Counter[str], list[int]]) -> None:
    counts, backoffs = fake_s3
    fs, path = storage.filesystem("s3://bucket/flaky-2/a.jpg")
    assert storage.read_bytes(fs, path) == FakeS3Handler.body
    # the HEAD s3fs starts with met the two 503s (botocore retried it twice), then the object was read once
    assert counts == Counter({"HEAD /bucket/flaky-2/a.jpg": 3, "GET /bucket/flaky-2/a.jpg": 1})
    assert backoffs == [1, 2]


@pytest.mark.parametrize("key, method", [("always-503/a.jpg", "HEAD"), ("always-500/a.jpg", "HEAD"),
                                         ("get-503/a.jpg", "GET")])
@pytest.mark.parametrize("attempts", [storage.S3_MAX_ATTEMPTS, 3])
def test_s3_always_failing_is_requested_once_per_attempt_of_the_one_layer(
        fake_s3: tuple[Counter[str], list[int]], monkeypatch: pytest.MonkeyPatch, key: str, method: str,
        attempts: int) -> None:
    """Not s3fs's 5 x botocore's 5 x ours 5: botocore's attempts alone, whatever wraps the call. (Stock s3fs
    re-sends a SlowDown GET in its own loop: 25 GETs for ``get-503`` under botocore's default 5 attempts.)"""
    counts, backoffs = fake_s3
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", attempts)
    fs, path = storage.filesystem(f"s3://bucket/{key}")
    with pytest.raises(OSError) as info:
        storage.with_retries(lambda: storage.read_bytes(fs, path), "read twice wrapped", attempts=4)
    assert storage.is_transient(info.value) and storage.retried_by_library(info.value)
    assert counts[f"{method} /bucket/{key}"] == attempts
    assert counts == Counter({f"HEAD /bucket/{key}": attempts if method == "HEAD" else 1,
                              **({f"GET /bucket/{key}": attempts} if method == "GET" else {})})
    assert backoffs == list(range(1, attempts))


def test_s3_filesystem_is_configured_and_pickles_configured(fake_s3: tuple[Counter[str], list[int]]) -> None:
    fs, _ = storage.filesystem("s3://bucket/ok/a.jpg")
    assert isinstance(fs, s3fs.S3FileSystem) and fs.retries == 1
    assert fs.config_kwargs == storage.s3_config()
    assert storage.filesystem("S3://bucket/ok/a.jpg")[0] is fs, "one cached client per configuration"
    clone = pickle.loads(pickle.dumps(fs))
    assert type(clone) is type(fs) and clone.retries == 1 and clone.config_kwargs == storage.s3_config()
    assert storage.read_bytes(clone, "bucket/ok/a.jpg") == FakeS3Handler.body
    # as a Ray actor receives it: a fresh process that never called filesystem() rebuilds the configured class
    script = ("import pickle, sys; fs = pickle.loads(sys.stdin.buffer.read()); "
              "print(type(fs).__module__, type(fs).__name__, fs.retries, fs.config_kwargs['retries'])")
    done = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(fs), capture_output=True, timeout=60,
                          check=True)
    assert done.stdout.decode().split(" ", 3) == [
        "cnnbatch.storage", "OneLayerS3FileSystem", "1", f"{storage.s3_config()['retries']}\n"]


def test_moto_round_trip_through_the_configured_client(s3_env: S3Server) -> None:
    bucket = s3_env.new_bucket()
    fs, path = storage.filesystem(f"s3://{bucket}/x/part-000500.bin")
    storage.write_bytes_atomic(fs, path, b"payload")
    assert storage.read_bytes(fs, path) == b"payload"
    assert storage.create_exclusive(fs, f"{bucket}/x/lock", b"1") is True
    assert storage.create_exclusive(fs, f"{bucket}/x/lock", b"2") is False
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(fs, f"{bucket}/x/missing")


# --- redaction -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("http://ghp_abcdef123456@github.example/x", "http://***@github.example/x"),  # a token as the user name
    ("https://user:hunter22@example.com/a.jpg", "https://***@example.com/a.jpg"),
    ("https://user:p@ss@example.com/a", "https://***@example.com/a"),  # a raw "@" in the password
    ("https://user:p:a:ss@example.com", "https://***@example.com"),
    ("https://user:p%40ss@example.com/", "https://***@example.com/"),
    ("s3://AKIAX:abc/def+ghi@bucket/key", "s3://***@bucket/key"),  # an AWS-style secret holding "/"
    ("HTTPS://User@Host.example/", "HTTPS://***@Host.example/"),
    ("simplecache::http://u:pw@127.0.0.1:8000/x.jpg", "simplecache::http://***@127.0.0.1:8000/x.jpg"),
    ("cannot read 'ftp://anon:me@ftp.example/f' (timed out)", "cannot read 'ftp://***@ftp.example/f' (timed out)"),
    ("a http://t1@h1/ and b https://t2:x@h2/", "a http://***@h1/ and b https://***@h2/"),
    # untouched: no userinfo
    ("write to bob@example.com for access", "write to bob@example.com for access"),
    ("mailto:bob@example.com", "mailto:bob@example.com"),
    ("https://example.com/users/bob@example.com/avatar.png", "https://example.com/users/bob@example.com/avatar.png"),
    ("http://127.0.0.1:8000/a@b.jpg", "http://127.0.0.1:8000/a@b.jpg"),
    ("http://[::1]:8080/a@b", "http://[::1]:8080/a@b"),
    ("s3://bucket/key", "s3://bucket/key"),
    ("see https://example.com/a?x=1#y", "see https://example.com/a?x=1#y"),
])
def test_redact_removes_the_whole_userinfo_of_urls(text: str, expected: str) -> None:
    assert storage.redact(text) == expected


def test_redact_removes_secret_environment_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_AWS_SECRET)
    assert storage.redact(f"signature from {FAKE_AWS_SECRET} failed") == "signature from *** failed"


def test_describe_error_is_one_line_without_addresses_or_secrets() -> None:
    handle = io.BytesIO()
    text = storage.describe_error(TypeError(f"cannot read {handle!r} nor {object()!r}\nsecond line"))
    assert text.startswith("TypeError: cannot read <_io.BytesIO object> nor <object object>")
    assert "0x" not in text and "\n" not in text
    assert storage.describe_error(OSError("https://tok123@h/x")) == "OSError: https://***@h/x"


# --- the one door: storage protocols only ----------------------------------------------------------------------

class CountingHandler(BaseHTTPRequestHandler):
    """Serves a small file for anything and counts the requests: a refused URI must leave the count at zero."""

    requests: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def _serve(self) -> None:
        CountingHandler.requests.append(f"{self.command} {self.path}")
        body = b"\x89PNG not really"
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_OPTIONS = _serve  # noqa: N815


@pytest.fixture(scope="module")
def counting_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def served(counting_server: str) -> Iterator[str]:
    CountingHandler.requests.clear()
    yield counting_server
    CountingHandler.requests.clear()


WEB_URIS = [
    "http://{h}/x.jpg", "https://{h}/x.jpg", "HTTP://{h}/x.jpg", "Https://{h}/x.jpg",
    "simplecache::http://{h}/x.jpg", "filecache::http://{h}/x.jpg", "blockcache::http://{h}/x.jpg",
    "blockcache::HTTP://{h}/x.jpg", "a::b::http://{h}/x.jpg", "simplecache::filecache::https://{h}/x.jpg",
    "tar://x.jpg::http://{h}/a.tar", "zip://x.jpg::http://{h}/a.zip", "libarchive://x.jpg::http://{h}/a.7z",
    "simplecache::http://u:secret-pw@{h}/x.jpg",
]
OTHER_URIS = [
    "webhdfs://{h}/x.jpg", "ftp://{h}/x.jpg", "sftp://{h}/x.jpg", "ssh://{h}/x.jpg", "smb://{h}/share/x.jpg",
    "github://org:repo@main/x.jpg", "git:///tmp/repo", "reference://", "dask://{h}/x.jpg", "jlab://{h}/x.jpg",
    "hf://datasets/x/y.jpg", "webdav://{h}/x.jpg", "data:image/png;base64,iVBORw0K", "local:///tmp/x.jpg",
    "filecache::s3://bucket/x.jpg", "simplecache::memory://x.jpg", "/tmp/a::b.jpg",
]


@pytest.mark.parametrize("template", WEB_URIS)
def test_web_uris_are_refused_with_the_fetcher_as_remedy(served: str, template: str) -> None:
    uri = template.format(h=served)
    with pytest.raises(storage.StorageError) as info:
        storage.filesystem(uri)
    message = str(info.value)
    assert "\n" not in message and message.startswith("refused ")
    assert "http" in message.split(": ", 1)[1].split(" is not ")[0].lower(), "names the protocol found"
    assert "use --image-url, which fetches through the vetted fetcher" in message
    assert "secret-pw" not in message
    with pytest.raises(storage.StorageError):
        storage.ensure_reachable(uri, must_exist=True)
    assert CountingHandler.requests == []


@pytest.mark.parametrize("template", OTHER_URIS)
def test_other_protocols_are_refused_with_the_supported_list(served: str, template: str) -> None:
    uri = template.format(h=served)
    with pytest.raises(storage.StorageError) as info:
        storage.filesystem(uri)
    message = str(info.value)
    assert "\n" not in message and message.startswith("refused ")
    assert "supported: local paths, file://, s3://, gs://, memory://, abfs://" in message
    assert CountingHandler.requests == []


def test_storage_protocols_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_bytes(b"local")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "b.txt").write_bytes(b"relative")
    for uri in (str(tmp_path / "a.txt"), f"file://{tmp_path}/a.txt"):
        fs, path = storage.filesystem(uri)
        assert storage.is_local(fs) and storage.read_bytes(fs, path) == b"local"
    monkeypatch.chdir(tmp_path)
    for relative in ("images", "images/b.txt", "./images", "a.txt"):  # a bare word alone is a path, not a protocol
        assert storage.storage_protocol(relative) == "file"
    fs, path = storage.filesystem("images")
    assert fs.ls(path, detail=False) == [str(tmp_path / "images" / "b.txt")]
    fs, path = storage.filesystem("memory://cnnbatch-test/a.txt")
    storage.write_bytes_atomic(fs, path, b"memory")
    assert storage.read_bytes(*storage.filesystem("MEMORY://cnnbatch-test/a.txt")) == b"memory"
    assert storage.filesystem("s3a://bucket/a.txt")[0].retries == 1
    names = {"s3": "s3", "gs": "gs", "gcs": "gcs", "abfs": "abfs", "az": "az"}
    for scheme, protocol in names.items():
        assert storage.storage_protocol(f"{scheme}://bucket/a.txt") == protocol


def test_image_read_goes_through_the_door_or_the_fetcher(served: str) -> None:
    """predict's read_image: a chained http --image is refused by storage.filesystem before any request; a
    plain http --image goes to the vetted fetcher (loopback refused by default, fetched when allowed)."""
    from cnnbatch.fetch import FetchError
    from cnnbatch.predict import read_image

    def config(image: str, allow_private: bool = False) -> SimpleNamespace:
        return SimpleNamespace(image=image, image_url=None, allow_private_urls=allow_private)

    for chained in (f"simplecache::http://{served}/x.jpg", f"blockcache::http://{served}/x.jpg"):
        with pytest.raises(storage.StorageError, match="use --image-url"):
            read_image(config(chained, allow_private=True))  # type: ignore[arg-type]
    assert CountingHandler.requests == []
    with pytest.raises(FetchError, match="loopback"):
        read_image(config(f"http://{served}/x.jpg"))  # type: ignore[arg-type]
    assert CountingHandler.requests == []
    _, data = read_image(config(f"HTTP://{served}/x.jpg", allow_private=True))  # type: ignore[arg-type]
    assert data.startswith(b"\x89PNG") and CountingHandler.requests == ["GET /x.jpg"]


# --- weights references from untrusted data --------------------------------------------------------------------

def _one_line_weights_error(ref: WeightsRef, *fragments: str) -> str:
    for call in (keras_weights_arg, local_weights_file, validate_weights_ref, WeightsRef.checked):
        with pytest.raises(WeightsError) as info:
            call(ref)
        message = str(info.value)
        assert "\n" not in message and all(f in message for f in fragments), message
    return message


@pytest.fixture
def weights_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CNNBATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_manifest_weights_over_http_never_reach_the_server(served: str, weights_cache: Path) -> None:
    for uri in (f"http://{served}/w.weights.h5", f"https://{served}/w.h5", f"HTTP://{served}/w.weights.h5"):
        ref = WeightsRef.from_dict({"kind": "file", "uri": uri, "sha256": HEX})
        _one_line_weights_error(ref, "weights reference: refused", "is not a storage protocol")
    assert CountingHandler.requests == [] and not weights_cache.exists()


def test_manifest_weights_through_a_chained_url_never_reach_the_server(served: str, weights_cache: Path) -> None:
    for uri in (f"simplecache::http://{served}/w.weights.h5", f"blockcache::http://{served}/w.h5",
                "filecache::s3://bucket/w.weights.h5"):
        ref = WeightsRef.from_dict({"kind": "file", "uri": uri, "sha256": HEX})
        _one_line_weights_error(ref, "weights reference: refused", "the chained URL")
    assert CountingHandler.requests == [] and not weights_cache.exists()


def test_manifest_weights_that_are_no_weights_file(served: str, weights_cache: Path) -> None:
    message = _one_line_weights_error(WeightsRef("file", uri="file:///etc/passwd", sha256=HEX),
                                      "must end in .weights.h5, .h5, .hdf5", "'file:///etc/passwd'")
    assert "StopIteration" not in message
    _one_line_weights_error(WeightsRef("file", uri=None, sha256=HEX), "must end in", "got None")
    assert CountingHandler.requests == [] and not weights_cache.exists()


def test_manifest_weights_without_a_sha256(served: str, tmp_path: Path, weights_cache: Path) -> None:
    local = tmp_path / "w.weights.h5"
    local.write_bytes(b"weights")
    for sha in (None, "", "abc", HEX.upper(), HEX + "0", 42):
        for uri in (str(local), f"http://{served}/w.weights.h5"):
            with pytest.raises(WeightsError) as info:
                local_weights_file(WeightsRef("file", uri=uri, sha256=sha))  # type: ignore[arg-type]
            assert "\n" not in str(info.value)
        _one_line_weights_error(WeightsRef("file", uri=str(local), sha256=sha), "sha256 must be 64")  # type: ignore[arg-type]
    assert CountingHandler.requests == [] and not weights_cache.exists()


def test_manifest_weights_kind_and_seed_are_checked() -> None:
    for data, fragment in (({"kind": "url", "uri": "x.h5"}, "kind must be one of imagenet, random, file"),
                           ({"kind": None}, "kind must be one of"),
                           ({"kind": "random", "seed": "7"}, "random weights need an integer seed; got '7'"),
                           ({"kind": "random", "seed": True}, "integer seed"),
                           ({"kind": "random"}, "integer seed; got None"),
                           ({"kind": "imagenet", "sha256": "nope"}, "sha256 must be 64")):
        _one_line_weights_error(WeightsRef.from_dict(data), fragment)
    with pytest.raises(WeightsError, match="must be a mapping, got list"):
        WeightsRef.from_dict(["file", "http://x/w.h5"])  # type: ignore[arg-type]
    assert keras_weights_arg(WeightsRef.from_dict({"kind": "random", "seed": 7})) is None
    assert keras_weights_arg(WeightsRef("imagenet", sha256=HEX)) == "imagenet"
    assert keras_weights_arg(WeightsRef("imagenet")) == "imagenet"


def test_a_valid_weights_file_is_fetched_once_and_verified(tmp_path: Path, weights_cache: Path) -> None:
    data = b"notop weights bytes"
    digest = hashlib.sha256(data).hexdigest()
    fs, path = storage.filesystem("memory://cnnbatch-weights/vgg16_notop.weights.h5")
    storage.write_bytes_atomic(fs, path, data)
    ref = WeightsRef("file", uri="memory://cnnbatch-weights/vgg16_notop.weights.h5", sha256=digest).checked()
    cached = Path(keras_weights_arg(ref) or "")
    assert cached.read_bytes() == data and cached.parent == weights_cache / "weights"
    assert local_weights_file(ref) == str(cached)
    with pytest.raises(WeightsError, match=r"^weights file memory://cnnbatch-weights/gone\.h5 does not exist$"):
        local_weights_file(WeightsRef("file", uri="memory://cnnbatch-weights/gone.h5", sha256=HEX))
    with pytest.raises(WeightsError, match=r"^cannot read weights file .*: IsADirectoryError"):
        (tmp_path / "folder.h5").mkdir()
        local_weights_file(WeightsRef("file", uri=str(tmp_path / "folder.h5"), sha256=HEX))
    assert sorted(p.name for p in (weights_cache / "weights").iterdir()) == [f"{digest}.weights.h5"], "no leftovers"
    local = tmp_path / "other.h5"
    local.write_bytes(b"something else")
    with pytest.raises(WeightsError, match="changed during the run: sha256 .*, expected " + HEX):
        local_weights_file(WeightsRef("file", uri=str(local), sha256=HEX))


def test_weights_argument_over_http_is_refused_in_one_line(served: str) -> None:
    with pytest.raises(WeightsError) as info:
        resolve_weights(f"simplecache::http://{served}/w.weights.h5", get_backbone("vgg16"))
    assert str(info.value).startswith("--weights: refused ") and "\n" not in str(info.value)
    with pytest.raises(WeightsError, match="--weights: refused .*http:// is not a storage protocol"):
        resolve_weights(f"http://{served}/w.weights.h5", get_backbone("vgg16"))
    assert CountingHandler.requests == []
