"""``--image-url`` fetching against a real local HTTP server: refusals, caps, redirects, pinning.

The server listens on 127.0.0.1, which the default policy refuses (loopback); tests that need it served use
``allow_private=True``, as ``--allow-private-urls`` does. Address classification and DNS vetting are pure
functions tested without any network.
"""

from __future__ import annotations

import io
import ipaddress
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from cnnbatch.fetch import FetchError, FetchPolicy, address_refusal, fetch_url, vet_url

PRIVATE_OK = FetchPolicy(allow_private=True, max_bytes=64 * 1024, connect_timeout=2, read_timeout=2, deadline=1.5)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # close-delimited bodies: lets /stream send without a Content-Length
    hosts: list[str] = []

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        Handler.hosts.append(self.headers.get("Host", ""))
        path = self.path
        if path == "/image.png":
            self._send(200, PNG, {"Content-Type": "image/png", "Content-Length": str(len(PNG))})
        elif path == "/claims-huge":
            self._send(200, b"", {"Content-Type": "image/png", "Content-Length": str(50 * 1024 * 1024)})
        elif path == "/stream":  # no Content-Length: only the streaming cap can stop it
            self._send(200, b"", {"Content-Type": "image/png"})
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 16384)
            except OSError:
                pass
        elif path == "/slow":  # one byte per 0.2 s: never idle long enough for the read timeout
            self._send(200, b"", {"Content-Type": "image/png", "Content-Length": "1000"})
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif path == "/to-image":
            self._send(302, headers={"Location": "image.png"})
        elif path == "/to-metadata":
            self._send(302, headers={"Location": "http://169.254.169.254/latest/meta-data/iam/"})
        elif path == "/to-metadata-name":
            self._send(301, headers={"Location": "http://metadata.google.internal/computeMetadata/v1/"})
        elif path == "/to-file":
            self._send(302, headers={"Location": "file:///etc/passwd"})
        elif path.startswith("/loop"):
            self._send(307, headers={"Location": f"/loop{len(path)}"})
        elif path == "/missing":
            self._send(404, b"no")
        else:
            self._send(500, b"unexpected path")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_loopback_refused_by_default_with_the_reason(server: str) -> None:
    Handler.hosts.clear()
    with pytest.raises(FetchError) as info:
        fetch_url(f"{server}/image.png")
    message = str(info.value)
    assert "refused" in message and "loopback" in message and "--allow-private-urls" in message
    assert "\n" not in message
    assert Handler.hosts == []  # refused before connecting


def test_served_with_allow_private(server: str) -> None:
    fetched = fetch_url(f"{server}/image.png", PRIVATE_OK)
    assert fetched.data == PNG
    assert fetched.content_type == "image/png"


def test_relative_redirect_followed(server: str) -> None:
    fetched = fetch_url(f"{server}/to-image", PRIVATE_OK)
    assert fetched.data == PNG
    assert fetched.final_url == f"{server}/image.png"


def test_oversize_content_length_refused_before_reading(server: str) -> None:
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"52428800 bytes, over the limit of 65536 bytes"):
        fetch_url(f"{server}/claims-huge", PRIVATE_OK)
    assert time.monotonic() - started < 1.0


def test_oversize_stream_cut_off(server: str) -> None:
    with pytest.raises(FetchError, match="exceeded the limit of 65536 bytes"):
        fetch_url(f"{server}/stream", PRIVATE_OK)


def test_slow_response_cut_off_by_the_deadline(server: str) -> None:
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"took longer than the 1.5s deadline"):
        fetch_url(f"{server}/slow", PRIVATE_OK)
    elapsed = time.monotonic() - started
    assert 1.4 <= elapsed < 3.0, elapsed


def test_redirect_to_metadata_refused_even_when_private_allowed(server: str) -> None:
    with pytest.raises(FetchError, match=r"169\.254\.169\.254 is a cloud metadata address"):
        fetch_url(f"{server}/to-metadata", PRIVATE_OK)
    with pytest.raises(FetchError, match="metadata.google.internal is a cloud metadata service"):
        fetch_url(f"{server}/to-metadata-name", PRIVATE_OK)


def test_redirect_to_private_address_refused(server: str) -> None:
    """Every hop is vetted: a public first hop that redirects into the private network is refused."""
    port = int(server.rsplit(":", 1)[1])
    # The first hop's name resolves to a public address we never reach; vetting the redirect target is the point.
    hops = {"public.test": ["93.184.216.34"], "127.0.0.1": ["127.0.0.1"]}
    policy = FetchPolicy(deadline=2)
    with pytest.raises(FetchError, match=r"127\.0\.0\.1 is a loopback address"):
        vet_url(f"http://127.0.0.1:{port}/image.png", policy, lambda host, _port: hops[host])
    assert vet_url("http://public.test/a.jpg", policy, lambda host, _port: hops[host]).address == "93.184.216.34"


def test_redirect_to_other_scheme_refused(server: str) -> None:
    with pytest.raises(FetchError, match="only http and https URLs are fetched, got file scheme"):
        fetch_url(f"{server}/to-file", PRIVATE_OK)


def test_redirect_loop_refused(server: str) -> None:
    with pytest.raises(FetchError, match="more than 5 redirects"):
        fetch_url(f"{server}/loop", PRIVATE_OK)


def test_http_error_named(server: str) -> None:
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_url(f"{server}/missing", PRIVATE_OK)


def test_connects_to_the_vetted_address_with_the_host_header(server: str) -> None:
    """No second DNS lookup: 'images.test' does not exist in DNS, only in the resolver that vetted it."""
    port = int(server.rsplit(":", 1)[1])
    Handler.hosts.clear()
    fetched = fetch_url(f"http://images.test:{port}/image.png", PRIVATE_OK, lambda host, _port: ["127.0.0.1"])
    assert fetched.data == PNG
    assert Handler.hosts == [f"images.test:{port}"]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "gopher://example.com/",
                                 "s3://bucket/a.jpg", "example.com/a.jpg"])
def test_non_http_schemes_refused(url: str) -> None:
    with pytest.raises(FetchError, match="only http and https URLs are fetched"):
        vet_url(url, FetchPolicy(), lambda host, _port: pytest.fail("must not resolve"))


def test_credentials_in_url_refused_and_redacted() -> None:
    with pytest.raises(FetchError) as info:
        vet_url("https://user:hunter22@example.com/a.jpg", FetchPolicy(), lambda h, p: ["93.184.216.34"])
    assert "hunter22" not in str(info.value) and "credentials" in str(info.value)


def test_any_private_answer_refuses_the_name() -> None:
    """A name with one public and one private answer is refused (a connection could land on either)."""
    with pytest.raises(FetchError, match=r"mixed\.test \(10\.0\.0\.5\) is a private address"):
        vet_url("https://mixed.test/a.jpg", FetchPolicy(), lambda h, p: ["93.184.216.34", "10.0.0.5"])


@pytest.mark.parametrize("address,reason", [
    ("127.0.0.1", "a loopback address"), ("::1", "a loopback address"), ("10.1.2.3", "a private address"),
    ("172.16.0.1", "a private address"), ("192.168.1.1", "a private address"), ("fd12::1", "a private address"),
    ("169.254.1.1", "a link-local address"), ("fe80::1", "a link-local address"),
    ("224.0.0.1", "a multicast address"), ("ff02::1", "a multicast address"),
    ("0.0.0.0", "an unspecified address"), ("::", "an unspecified address"), ("240.0.0.1", "a reserved address"),
    ("100.64.0.1", "not a public address"),
    ("169.254.169.254", "a cloud metadata address"), ("fd00:ec2::254", "a cloud metadata address"),
    ("169.254.170.2", "a cloud metadata address"), ("100.100.100.200", "a cloud metadata address"),
    ("169.254.170.23", "a cloud metadata address"), ("fd00:ec2::23", "a cloud metadata address"),  # EKS Pod Identity
    ("fd20:ce::254", "a cloud metadata address"),  # GCE's metadata server over IPv6
    ("::ffff:169.254.170.23", "a cloud metadata address"), ("64:ff9b::a9fe:aa17", "a cloud metadata address"),
    ("::ffff:127.0.0.1", "a loopback address"), ("::ffff:169.254.169.254", "a cloud metadata address"),
    ("64:ff9b::a00:1", "a private address"), ("2002:c0a8:101::1", "a private address"),
    ("8.8.8.8", None), ("2001:4860:4860::8888", None),
])
def test_address_classification(address: str, reason: str | None) -> None:
    assert address_refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", ["169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200",
                                     "169.254.170.23", "fd00:ec2::23", "fd20:ce::254", "::ffff:169.254.170.23"])
def test_allow_private_still_refuses_metadata(address: str) -> None:
    assert address_refusal(ipaddress.ip_address("10.0.0.1"), allow_private=True) is None
    assert address_refusal(ipaddress.ip_address("127.0.0.1"), allow_private=True) is None
    assert address_refusal(ipaddress.ip_address("fd20:ce::253"), allow_private=True) is None, "only the agent itself"
    assert address_refusal(ipaddress.ip_address(address), allow_private=True) == "a cloud metadata address"


@pytest.mark.parametrize("address", ["169.254.170.23", "fd00:ec2::23", "fd20:ce::254"])
def test_a_name_resolving_to_a_metadata_agent_is_refused_without_a_hint(address: str) -> None:
    policy = FetchPolicy(allow_private=True)
    with pytest.raises(FetchError) as info:
        vet_url("http://agent.test/v1/credentials", policy, lambda host, _port: [address])
    message = str(info.value)
    assert message.endswith(f"agent.test ({address}) is a cloud metadata address")
    assert "--allow-private-urls" not in message


def test_connection_errors_are_one_line_without_addresses() -> None:
    """A refused connection (nothing listens on the port) is named by its type, with no object repr."""
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FetchError) as info:
        fetch_url(f"http://127.0.0.1:{port}/x.png", PRIVATE_OK)
    message = str(info.value)
    assert message.startswith(f"cannot fetch http://127.0.0.1:{port}/x.png: ConnectionRefusedError")
    assert "\n" not in message and " at 0x" not in message
