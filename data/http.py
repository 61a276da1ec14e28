"""The one guarded HTTP client: allowed schemes and addresses at every redirect, a size cap while streaming, a deadline."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import socket
import ssl
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from config.settings import WorkerSettings
from data.fetched import Fetched, over_cap, suffix_of
from errors import DatasetError, scrub

logger = logging.getLogger(__name__)


CHUNK = 1 << 20


MAX_REDIRECTS = 5


USER_AGENT = "lora-worker-dataset-fetch/1"


def display_url(url: str) -> str:
    """scheme://host[:port]/path — no credentials, no query, no fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return scrub(url.split("?", 1)[0].split("#", 1)[0])
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def check_address(address: str, settings: WorkerSettings) -> str | None:
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
        if settings.allow_private_urls:
            return None
        kind = "a loopback address" if ip.is_loopback else "a private-network address"
        return f"{kind}; set ALLOW_PRIVATE_URLS=true on the endpoint to allow it"
    return "a reserved address"


_METADATA_V6 = ipaddress.ip_network("fd00:ec2::/32")  # AWS's IPv6 metadata service


_SHARED_V4 = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, also Tailscale's range


def resolve_host(host: str, port: int, settings: WorkerSettings, shown: str) -> list[str]:
    """Every address the host resolves to, each checked; one refused address refuses the host."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise DatasetError(f"{shown}: cannot resolve host {host!r} ({getattr(exc, 'strerror', None) or exc}); "
                           "check the URL", retryable=True) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        why = check_address(address, settings)
        if why is not None:
            raise DatasetError(f"{shown} points at {address}, {why}. Datasets are fetched from public "
                               "addresses only")
    return addresses


def _check_url(url: str, settings: WorkerSettings) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, Host header, path?query) of an allowed URL, or DatasetError."""
    shown = display_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise DatasetError(f"{shown} is not a valid URL; check it") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise DatasetError(f"{shown}: only http:// and https:// URLs are fetched, not {scheme or 'no scheme'}")
    if parts.username is not None or parts.password is not None:
        raise DatasetError(f"{shown}: URLs with a user name or password are refused (they would be logged); "
                           "use a signed URL instead")
    host = parts.hostname
    if not host:
        raise DatasetError(f"{shown} has no host; check the URL")
    port = port or (443 if scheme == "https" else 80)
    host_header = f"[{host}]" if ":" in host else host
    if parts.port:
        host_header += f":{parts.port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host, port, host_header, target


def _ssl_context() -> ssl.SSLContext:
    context = ssl.create_default_context()  # the system store (and SSL_CERT_FILE)
    try:
        import certifi

        context.load_verify_locations(certifi.where())
    except ImportError:
        pass  # the system store alone is enough where it is installed
    return context


def _open(url: str, settings: WorkerSettings, deadline: float):
    """Follow up to MAX_REDIRECTS redirects, checking each URL; return (response, its pool, final URL)."""
    import urllib3

    context = _ssl_context()
    for _hop in range(MAX_REDIRECTS + 1):
        scheme, host, port, host_header, target = _check_url(url, settings)
        shown = display_url(url)
        addresses = resolve_host(host, port, settings, shown)
        response, pool, error = None, None, None
        for address in addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            timeout = urllib3.Timeout(connect=min(30.0, remaining), read=min(120.0, remaining))
            # The connection goes to the address just checked; the name is only Host and TLS SNI.
            if scheme == "https":
                pool = urllib3.HTTPSConnectionPool(address, port, timeout=timeout, retries=False, maxsize=1,
                                                   ssl_context=context, server_hostname=host,
                                                   assert_hostname=host)
            else:
                pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False, maxsize=1)
            try:
                response = pool.urlopen("GET", target, headers={
                    "Host": host_header, "User-Agent": USER_AGENT, "Accept-Encoding": "identity",
                    "Accept": "*/*"}, redirect=False, retries=False, preload_content=False,
                    assert_same_host=False)
                break
            except urllib3.exceptions.SSLError as exc:
                pool.close()
                raise DatasetError(f"{shown}: TLS verification failed ({_reason(exc)}); the server's "
                                   "certificate is not trusted") from None
            except urllib3.exceptions.HTTPError as exc:
                pool.close()
                error = exc  # try the host's next address
        if response is None or pool is None:
            why = _reason(error) if error is not None else "the download deadline passed"
            raise DatasetError(f"could not connect to {shown} ({why}); check the URL or try again",
                               retryable=True)
        if response.status in (301, 302, 303, 307, 308):
            location = response.headers.get("Location")
            response.release_conn()
            pool.close()
            if not location:
                raise DatasetError(f"{shown} answered {response.status} without a Location; check the URL")
            url = urljoin(url, location)
            continue
        return response, pool, url
    raise DatasetError(f"{display_url(url)}: more than {MAX_REDIRECTS} redirects; use the final URL")


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


_STATUS_HINTS = {
    400: "the request was refused; a signed URL may be malformed or expired: sign a new one",
    401: "access denied; a signed URL may have expired: sign a new one",
    403: "access denied; a signed URL may have expired: sign a new one",
    404: "the file is not there; check the link (the object may have been moved or deleted)",
    410: "the file is gone; upload it again",
}


def fetch_url(url: str, target: Path, settings: WorkerSettings) -> Fetched:
    import urllib3

    started = time.monotonic()
    deadline = started + settings.dataset_download_timeout_s
    cap = settings.max_dataset_bytes
    response, pool, final = _open(url, settings, deadline)
    shown = display_url(url)
    try:
        if response.status != 200:
            retry = response.status >= 500 or response.status == 429
            hint = _STATUS_HINTS.get(response.status) or ("the server failed; try again" if retry
                                                          else "check the URL")
            raise DatasetError(f"{shown} answered {response.status} {response.reason or ''}".rstrip()
                               + f": {hint}", retryable=retry)
        content_type = (response.headers.get("Content-Type") or "").lower()
        if content_type.startswith("text/html"):
            raise DatasetError(f"{shown} returned an HTML page, not a data file; use a direct download "
                               "link (e.g. a Supabase Storage signed URL)")
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise over_cap(shown, int(declared), cap)
        digest = hashlib.sha256()
        size = 0
        with open(target, "wb") as out:
            for chunk in response.stream(CHUNK, decode_content=True):
                size += len(chunk)
                if size > cap:
                    raise over_cap(shown, f"more than {cap}", cap)
                if time.monotonic() > deadline:
                    raise DatasetError(f"{shown}: the download took longer than "
                                       f"{settings.dataset_download_timeout_s:.0f}s "
                                       "(DATASET_DOWNLOAD_TIMEOUT_S); try again or host it closer",
                                       retryable=True)
                digest.update(chunk)
                out.write(chunk)
    except (urllib3.exceptions.HTTPError, OSError) as exc:  # dropped or timed out mid-file, or a full disk
        raise DatasetError(f"the download of {shown} failed ({_reason(exc)}); try again",
                           retryable=True) from None
    finally:
        response.release_conn()
        pool.close()
    logger.info("downloaded %s (%d bytes) in %.1fs", shown, size, time.monotonic() - started)
    details = {"final_url": display_url(final)} if final != url else {}
    if not suffix_of(url):
        # The file's kind may only show after a redirect or in Content-Disposition: name the copy by it.
        disposition = re.search(r'filename="?([^";]+)"?', response.headers.get("Content-Disposition") or "")
        suffix = suffix_of(final) or (suffix_of(disposition.group(1)) if disposition else "")
        if suffix:
            target = target.rename(target.with_name(target.name + suffix))
    return Fetched([target], [shown], shown, digest.hexdigest(), size, urlsplit(url).scheme.lower(), details)
