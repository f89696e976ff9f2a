"""Fetch one image over http(s) without letting a URL reach what it should not (``predict --image-url``).

A URL typed by a user (or handed over by a web form) must not become a way into the machine's own network: the
host name is resolved once, every address it resolves to is checked (loopback, private, link-local, multicast,
reserved, unspecified and cloud-metadata addresses are refused unless private URLs are allowed), and the
connection goes to the vetted address itself, so that a second DNS answer cannot swap in another target (DNS
rebinding). Redirects are followed by hand and every hop is vetted the same way. Size and time are capped: the
Content-Length is checked before reading, the body while streaming, and a watchdog closes the socket at the
total deadline however slowly the server trickles bytes. Cloud-metadata endpoints are refused even when private
URLs are allowed: they hold credentials and never serve images. Standard library only; no proxy is used,
since a proxy would resolve (and reach) the name on our behalf.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from . import __version__
from .storage import StorageError, describe_error, redact

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

SCHEMES = {"http": 80, "https": 443}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
# Instance metadata services: they hand out credentials. 169.254.169.254 (AWS, GCP, Azure, OpenStack), its IPv6
# forms on AWS (fd00:ec2::254) and GCE (fd20:ce::254), the ECS task agent (169.254.170.2), the EKS Pod Identity
# agent (169.254.170.23, fd00:ec2::23) and Alibaba's (100.100.100.200).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "fd00:ec2::254", "fd20:ce::254", "169.254.170.2", "169.254.170.23", "fd00:ec2::23",
    "100.100.100.200"))
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"})
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
CHUNK = 64 * 1024


class FetchError(StorageError):
    """A URL that was refused or could not be fetched; the message says which and why."""


@dataclass(frozen=True)
class FetchPolicy:
    """What a fetch may reach and how much it may take."""

    allow_private: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES
    connect_timeout: float = 10.0  # seconds to open the TCP (and TLS) connection
    read_timeout: float = 10.0  # seconds any single read may wait
    deadline: float = 30.0  # seconds for the whole fetch, redirects included
    max_redirects: int = 5


@dataclass(frozen=True)
class Fetched:
    url: str  # as asked
    final_url: str  # after redirects
    data: bytes = field(repr=False)
    content_type: str | None = None


# --- vetting ---------------------------------------------------------------------------------------------------

def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped ::ffff:a.b.c.d, 6to4, Teredo, NAT64), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_refusal(ip: IPAddress, allow_private: bool = False) -> str | None:
    """Why ``ip`` may not be fetched from (e.g. ``"a loopback address"``), or None when it may."""
    # The embedded IPv4 address first: it is where the packets end up, and names the reason best.
    candidates = ([inner] if (inner := _embedded_ipv4(ip)) is not None else []) + [ip]
    for candidate in candidates:
        if candidate in METADATA_ADDRESSES:
            return "a cloud metadata address"
    if allow_private:
        return None
    for candidate in candidates:
        for reason, flag in (("a loopback", candidate.is_loopback), ("an unspecified", candidate.is_unspecified),
                             ("a link-local", candidate.is_link_local), ("a multicast", candidate.is_multicast),
                             ("a reserved", candidate.is_reserved), ("a private", candidate.is_private)):
            if flag:
                return f"{reason} address"
        if not candidate.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT): neither private nor public
            return "not a public address"
    return None


def parse_ip(text: str) -> IPAddress:
    """An address as getaddrinfo returns it (IPv6 link-local addresses may carry a ``%scope``)."""
    return ipaddress.ip_address(text.split("%", 1)[0])


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to for a TCP connection."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Target:
    """A URL that passed vetting, with the address to connect to."""

    scheme: str
    host: str  # as in the URL: Host header and TLS server name
    port: int
    address: str  # the vetted IP to connect to
    path: str  # path and query, as sent in the request line


def vet_url(url: str, policy: FetchPolicy, resolve: Resolver = system_resolver,
            deadline: float | None = None) -> Target:
    """Check ``url`` against the policy and resolve it once; raise :class:`FetchError` saying why not."""
    shown = redact(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchError(f"refused {shown}: not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise FetchError(f"refused {shown}: only http and https URLs are fetched, got {scheme or 'no'} scheme")
    if parts.username is not None or parts.password is not None:
        raise FetchError(f"refused {shown}: credentials in the URL are not supported")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise FetchError(f"refused {shown}: the URL has no host")
    port = port or SCHEMES[scheme]
    if host in METADATA_HOSTS:
        raise FetchError(f"refused {shown}: {host} is a cloud metadata service")
    try:
        host = host.encode("idna").decode("ascii")  # the Host header and TLS name must be ASCII
        addresses = _resolve_before(resolve, host, port, deadline)
    except (OSError, UnicodeError) as exc:
        raise FetchError(f"cannot fetch {shown}: cannot resolve {host} ({exc})") from None
    if not addresses:
        raise FetchError(f"cannot fetch {shown}: {host} resolves to no address")
    # Every answer must pass: picking a "good" one would let a mixed answer smuggle in an internal address.
    for text in addresses:
        reason = address_refusal(parse_ip(text), policy.allow_private)
        if reason is not None:
            hint = "" if reason == "a cloud metadata address" else " (--allow-private-urls allows it)"
            name = host if text == host else f"{host} ({text})"
            raise FetchError(f"refused {shown}: {name} is {reason}{hint}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme, host, port, addresses[0], path)


def _resolve_before(resolve: Resolver, host: str, port: int, deadline: float | None) -> list[str]:
    """``resolve(host, port)`` in a daemon thread, so that a hanging DNS server cannot outlast the deadline."""
    if deadline is None:
        return resolve(host, port)
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["result"] = resolve(host, port)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=work, name="fetch-dns", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise FetchError(f"cannot resolve {host}: DNS took longer than the deadline")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


# --- connections pinned to the vetted address ------------------------------------------------------------------

class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to ``address`` while the Host header names the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to ``address`` with SNI and certificate checks for the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._tls = context

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        try:
            self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


class _Watchdog:
    """Shuts a connection's socket down at the deadline, which ends any read blocked or trickling on it."""

    def __init__(self, conn: http.client.HTTPConnection, deadline: float):
        self.fired = False
        self._conn = conn
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _open(target: Target, policy: FetchPolicy, deadline: float) -> http.client.HTTPConnection:
    timeout = max(0.001, min(policy.connect_timeout, deadline - time.monotonic()))
    if target.scheme == "https":
        return _PinnedHTTPSConnection(target.host, target.port, target.address, timeout, ssl.create_default_context())
    return _PinnedHTTPConnection(target.host, target.port, target.address, timeout)


# --- fetching --------------------------------------------------------------------------------------------------

def fetch_url(url: str, policy: FetchPolicy = FetchPolicy(), resolve: Resolver = system_resolver) -> Fetched:
    """GET ``url`` under ``policy``: vetted hops only, at most ``max_bytes``, within ``deadline`` seconds."""
    deadline = time.monotonic() + policy.deadline
    current = url
    for hop in range(policy.max_redirects + 1):
        target = vet_url(current, policy, resolve, deadline)
        status, location, content_type, data = _get(current, target, policy, deadline)
        if status in REDIRECT_STATUSES:
            if not location:
                raise FetchError(f"cannot fetch {redact(current)}: HTTP {status} redirect without a Location")
            following = urljoin(current, location)
            log.info("redirect %d: %s -> %s", hop + 1, redact(current), redact(following))
            current = following
            continue
        return Fetched(url, current, data, content_type)
    raise FetchError(f"refused {redact(url)}: more than {policy.max_redirects} redirects")


def _get(url: str, target: Target, policy: FetchPolicy, deadline: float) -> tuple[int, str | None, str | None, bytes]:
    """One GET to a vetted target: (status, Location, Content-Type, body). A redirect's body is not read."""
    shown = redact(url)
    conn = _open(target, policy, deadline)
    watchdog = _Watchdog(conn, deadline)
    try:
        with watchdog:
            conn.connect()
            conn.sock.settimeout(policy.read_timeout)
            conn.request("GET", target.path, headers={
                "User-Agent": f"cnnbatch/{__version__}", "Accept": "image/*", "Accept-Encoding": "identity",
            })
            response = conn.getresponse()
            if response.status in REDIRECT_STATUSES:
                return response.status, response.getheader("Location"), None, b""
            if response.status != 200:
                raise FetchError(f"cannot fetch {shown}: HTTP {response.status} {response.reason}".rstrip())
            length = response.getheader("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
                raise FetchError(f"refused {shown}: the response is {int(length)} bytes, over the limit of "
                                 f"{policy.max_bytes} bytes")
            body = _read_capped(response, policy.max_bytes, shown, deadline, watchdog)
            return response.status, None, response.getheader("Content-Type"), body
    except FetchError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if watchdog.fired or time.monotonic() >= deadline:
            raise FetchError(f"cannot fetch {shown}: took longer than the {policy.deadline:g}s deadline") from None
        if isinstance(exc, (socket.timeout, TimeoutError)):
            raise FetchError(f"cannot fetch {shown}: no data for {policy.read_timeout:g}s (timed out)") from None
        raise FetchError(f"cannot fetch {shown}: {describe_error(exc)}") from None
    finally:
        conn.close()


def _read_capped(response: http.client.HTTPResponse, limit: int, shown: str, deadline: float,
                 watchdog: _Watchdog) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = response.read1(CHUNK) if hasattr(response, "read1") else response.read(CHUNK)
        if watchdog.fired or time.monotonic() >= deadline:
            raise TimeoutError("deadline")
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise FetchError(f"refused {shown}: the response exceeded the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
