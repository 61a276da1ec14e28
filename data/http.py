"""The one guarded HTTP client: datasets, init_adapter and adapter fetches all download through it.

Every URL is checked before every connection, redirects included: http(s) only, no credentials in
the URL, and the host must resolve only to public addresses. Loopback and private networks are
allowed with ALLOW_PRIVATE_URLS; link-local addresses (169.254.169.254, the cloud metadata service,
and fe80::/10) never are. The connection goes to the address that was checked (the host name is
sent as Host and TLS server name), so DNS cannot swap in another address between check and connect.
A size cap is enforced while streaming (not after), the whole download has a deadline, and the file
is written to a unique temporary name and renamed into place when complete.

Nothing raised or logged here carries a URL's query string (signed URLs carry their token there) or
its credentials: every message uses ``display_url``. Each caller brings its ``Rules``: its error
class (its stage), its limits and the words of its cap error.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import socket
import ssl
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping
from urllib.parse import urljoin, urlsplit

from errors import WorkerError, scrub
from files import atomic_writer

logger = logging.getLogger(__name__)


CHUNK = 1 << 20


MAX_REDIRECTS = 5


USER_AGENT = "lora-worker-fetch/1"


@dataclass(frozen=True)
class Rules:
    """What one kind of download may do, and how its failures read: one per caller."""

    what: str  # plural noun for a refused address: "Datasets are fetched from public addresses only"
    error_cls: type[WorkerError]  # the caller's stage
    allow_private: bool  # ALLOW_PRIVATE_URLS
    cap: int  # bytes: the declared Content-Length and the stream are checked against it
    deadline_s: float  # for the whole download, redirects included
    too_big: Callable[[str, int | str], WorkerError]  # (shown URL, size) → the caller's cap error
    too_slow: str = "; try again"  # appended to the deadline error: the setting to raise, the fix

    def fail(self, message: str, *, retryable: bool = False) -> WorkerError:
        return self.error_cls(message, retryable=retryable)


@dataclass(frozen=True)
class Saved:
    path: Path
    sha256: str  # of the bytes as received
    bytes: int


def display_url(url: str) -> str:
    """scheme://host[:port]/path — no credentials, no query, no fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return scrub(re.sub(r"(?<=://)[^/@]*@", "", url.split("?", 1)[0].split("#", 1)[0]))
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def check_address(address: str, allow_private: bool) -> str | None:
    """Why this IP may not be fetched from, or None if it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_link_local or ip in _METADATA_V6:
        return "a link-local address (where cloud metadata services live)"
    if ip.is_multicast or ip.is_unspecified:
        return "a multicast or unspecified address"
    if ip.is_global:
        return None
    if ip.is_loopback or ip.is_private or ip in _SHARED_V4:
        if allow_private:
            return None
        kind = "a loopback address" if ip.is_loopback else "a private-network address"
        return f"{kind}; set ALLOW_PRIVATE_URLS=true on the endpoint to allow it"
    return "a reserved address"


_METADATA_V6 = ipaddress.ip_network("fd00:ec2::/32")  # AWS's IPv6 metadata service


_SHARED_V4 = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, also Tailscale's range


def _resolve_host(host: str, port: int, rules: Rules, shown: str) -> list[str]:
    """Every address the host resolves to, each checked; one refused address refuses the host."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise rules.fail(f"{shown}: cannot resolve host {host!r} ({getattr(exc, 'strerror', None) or exc}); "
                         "check the URL", retryable=True) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        why = check_address(address, rules.allow_private)
        if why is not None:
            raise rules.fail(f"{shown} points at {address}, {why}. {rules.what} are fetched from public "
                             "addresses only")
    return addresses


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    host_header: str
    path: str  # with the query: what the request line sends


def check_url(url: str, rules: Rules) -> _Target:
    """Where an allowed URL points, or the caller's error saying why it is not allowed."""
    shown = display_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise rules.fail(f"{shown} is not a valid URL; check it") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise rules.fail(f"{shown}: only http:// and https:// URLs are fetched, not {scheme or 'no scheme'}")
    if parts.username is not None or parts.password is not None:
        raise rules.fail(f"{shown}: URLs with a user name or password are refused (they would be logged); "
                         "use a signed URL instead")
    host = parts.hostname
    if not host:
        raise rules.fail(f"{shown} has no host; check the URL")
    host_header = f"[{host}]" if ":" in host else host
    if port:
        host_header += f":{port}"
    return _Target(scheme, host, port or (443 if scheme == "https" else 80), host_header,
                   (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))


def _ssl_context() -> ssl.SSLContext:
    context = ssl.create_default_context()  # the system store (and SSL_CERT_FILE)
    try:
        import certifi

        context.load_verify_locations(certifi.where())
    except ImportError:
        pass  # the system store alone is enough where it is installed
    return context


def _connect(target: _Target, address: str, context: ssl.SSLContext, remaining: float):
    import urllib3

    timeout = urllib3.Timeout(connect=min(30.0, remaining), read=min(120.0, remaining))
    # The connection goes to the address just checked; the name is only Host and TLS SNI.
    if target.scheme == "https":
        return urllib3.HTTPSConnectionPool(address, target.port, timeout=timeout, retries=False, maxsize=1,
                                           ssl_context=context, server_hostname=target.host,
                                           assert_hostname=target.host)
    return urllib3.HTTPConnectionPool(address, target.port, timeout=timeout, retries=False, maxsize=1)


def _open(url: str, rules: Rules, deadline: float):
    """Follow up to MAX_REDIRECTS redirects, checking each URL; return (response, its pool, final URL)."""
    import urllib3

    context = _ssl_context()
    for _hop in range(MAX_REDIRECTS + 1):
        target = check_url(url, rules)
        shown = display_url(url)
        addresses = _resolve_host(target.host, target.port, rules, shown)
        response, pool, error = None, None, None
        for address in addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            pool = _connect(target, address, context, remaining)
            try:
                response = pool.urlopen("GET", target.path, headers={
                    "Host": target.host_header, "User-Agent": USER_AGENT, "Accept-Encoding": "identity",
                    "Accept": "*/*"}, redirect=False, retries=False, preload_content=False,
                    assert_same_host=False)
                break
            except urllib3.exceptions.SSLError as exc:
                pool.close()
                raise rules.fail(f"{shown}: TLS verification failed ({_reason(exc)}); the server's "
                                 "certificate is not trusted") from None
            except urllib3.exceptions.HTTPError as exc:
                pool.close()
                error = exc  # try the host's next address
        if response is None or pool is None:
            why = _reason(error) if error is not None else "the download deadline passed"
            raise rules.fail(f"could not connect to {shown} ({why}); check the URL or try again", retryable=True)
        if response.status in (301, 302, 303, 307, 308):
            location = response.headers.get("Location")
            response.release_conn()
            pool.close()
            if not location:
                raise rules.fail(f"{shown} answered {response.status} without a Location; check the URL")
            url = urljoin(url, location)
            continue
        return response, pool, url
    raise rules.fail(f"{display_url(url)}: more than {MAX_REDIRECTS} redirects; use the final URL")


def _reason(exc: BaseException | None) -> str:
    """A short reason without any URL in it (urllib3 messages quote the path and query)."""
    while exc is not None and getattr(exc, "reason", None) is not None and exc is not exc.reason:
        exc = exc.reason  # type: ignore[assignment]
    if exc is None:
        return "unknown error"
    text = scrub(str(exc)).split("(Caused by", 1)[0]
    if "?" in text or "/" in text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def save_chunks(chunks: Iterable[bytes], target: Path, rules: Rules, shown: str, deadline: float) -> Saved:
    """Write a stream to ``target`` (atomically), hashing it, stopping at the cap or the deadline."""
    digest = hashlib.sha256()
    size = 0
    with atomic_writer(target) as out:
        for chunk in chunks:
            size += len(chunk)
            if size > rules.cap:
                raise rules.too_big(shown, f"more than {rules.cap}")
            if time.monotonic() > deadline:
                raise rules.fail(f"{shown}: the download took longer than {rules.deadline_s:.0f}s{rules.too_slow}",
                                 retryable=True)
            digest.update(chunk)
            out.write(chunk)
    return Saved(target, digest.hexdigest(), size)


@dataclass(frozen=True)
class Response:
    """An answer to a checked GET, redirects followed; the body is read by ``save``."""

    status: int
    reason: str
    headers: Mapping[str, str]
    url: str  # the final URL, after redirects
    shown: str  # the URL asked for, as messages show it
    _raw: object
    _rules: Rules
    _deadline: float

    def save(self, target: Path) -> Saved:
        """The body into ``target``, within the caller's cap and deadline."""
        import urllib3

        declared = self.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self._rules.cap:
            raise self._rules.too_big(self.shown, int(declared))
        try:
            saved = save_chunks(self._raw.stream(CHUNK, decode_content=True), target, self._rules,  # type: ignore[attr-defined]
                                self.shown, self._deadline)
        except (urllib3.exceptions.HTTPError, OSError) as exc:  # dropped or timed out mid-file, or a full disk
            raise self._rules.fail(f"the download of {self.shown} failed ({_reason(exc)}); try again",
                                   retryable=True) from None
        logger.info("downloaded %s (%d bytes)", self.shown, saved.bytes)
        return saved


@contextmanager
def open_url(url: str, rules: Rules) -> Iterator[Response]:
    """GET ``url`` under ``rules``: every hop checked, the connection released afterwards."""
    deadline = time.monotonic() + rules.deadline_s
    raw, pool, final = _open(url, rules, deadline)
    try:
        yield Response(raw.status, raw.reason or "", raw.headers, final, display_url(url), raw, rules, deadline)
    finally:
        raw.release_conn()
        pool.close()
