"""Dataset uri → local files: the volume, http(s) URLs, s3://bucket/key and hf://org/name.

Remote files are streamed to a temporary folder, hashed and counted on the way: the size cap
(MAX_DATASET_BYTES) stops a download as soon as it is passed, not after, and the whole download has
a deadline (DATASET_DOWNLOAD_TIMEOUT_S). The temporary folder is removed when the caller is done.

URLs are checked before every connection, redirects included: http(s) only, no credentials in the
URL, and the host must resolve only to public addresses. Loopback and private networks are allowed
with ALLOW_PRIVATE_URLS; link-local addresses (169.254.169.254, the cloud metadata service, and
fe80::/10) never are. The connection goes to the address that was checked (the host name is sent as
Host and TLS server name), so DNS cannot swap in another address between check and connect.

Nothing printed, logged or raised here carries a URL's query string (signed URLs carry their token
there) or its credentials: every message uses ``display_url``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import shutil
import socket
import ssl
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urljoin, urlsplit

from config.settings import WorkerSettings
from errors import DatasetError, InputError, scrub
from model_resolver import check_inside

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_REDIRECTS = 5
USER_AGENT = "lora-worker-dataset-fetch/1"


@dataclass
class Fetched:
    """Local files holding a dataset, in order, and what they are."""

    paths: list[Path]
    names: list[str]  # printable, one per path
    source: str  # printable: never a query string or credentials
    sha256: str  # of the files' bytes, concatenated in order
    bytes: int
    origin: str  # inline | volume | https | http | s3 | hf
    details: dict[str, str] = field(default_factory=dict)


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


@contextmanager
def fetch(uri: str, settings: WorkerSettings, *, subset: str | None = None, split: str | None = None,
          what: str = "dataset.uri", for_eval: bool = False) -> Iterator[Fetched]:
    """Yield the dataset's files on local disk; temporary copies are removed afterwards."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https", "s3"):
        workdir = Path(tempfile.mkdtemp(prefix="dataset-"))
        try:
            target = workdir / ("data" + _suffix_of(uri))
            if scheme == "s3":
                yield _fetch_s3(uri, target, settings)
            else:
                yield _fetch_url(uri, target, settings)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    if scheme == "hf":
        from dataset_hub import fetch_hub_dataset

        yield fetch_hub_dataset(uri, settings, subset=subset, split=split, for_eval=for_eval)
        return
    if scheme:
        raise InputError(f"{what}: scheme '{scheme}://' is not supported; use https://, http://, s3://, "
                         "hf:// or a path on the volume")
    yield _fetch_volume(uri, settings, what)


def _suffix_of(uri: str) -> str:
    """The data file's extension(s) from a URL or key, e.g. '.jsonl.gz', to name the local copy."""
    path = urlsplit(uri).path if "://" in uri else uri
    name = path.rsplit("/", 1)[-1].lower()
    from dataset_files import DATA_SUFFIXES

    for suffix in sorted(DATA_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


def _sha256_of(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _over_cap(name: str, size: int | str, cap: int) -> DatasetError:
    return DatasetError(
        f"{name} is {size} bytes, over the {cap}-byte cap (MAX_DATASET_BYTES); split it, trim it "
        "with max_examples before uploading, or raise the cap on the endpoint"
    )


# --------------------------------------------------------------------------------------------------
# the volume


def _fetch_volume(uri: str, settings: WorkerSettings, what: str) -> Fetched:
    from dataset_files import is_data_file

    path = Path(uri) if uri.startswith("/") else settings.volume_root / uri
    try:
        path = check_inside(str(path), (settings.volume_root,), "dataset path")
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None
    if path.is_dir():
        # A folder of shards (e.g. train-00000-of-00002.parquet): every data file in it, in order.
        paths = sorted(p for p in path.rglob("*") if p.is_file() and is_data_file(p.relative_to(path).as_posix()))
        if not paths:
            raise DatasetError(f"dataset folder {uri} holds no data files (.jsonl, .json, .csv, .parquet, "
                               "optionally .gz); put the files there or name one file")
        names = [f"{uri.rstrip('/')}/{p.relative_to(path).as_posix()}" for p in paths]
    elif path.is_file():
        paths, names = [path], [uri]
    else:
        raise DatasetError(f"dataset file {uri} does not exist on the volume ({path}); upload it there or "
                           "fix the path")
    size = sum(p.stat().st_size for p in paths)
    if size > settings.max_dataset_bytes:
        raise _over_cap(f"dataset {uri}", size, settings.max_dataset_bytes)
    return Fetched(paths, names, uri, _sha256_of(paths), size, "volume")


# --------------------------------------------------------------------------------------------------
# http(s)


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


def _fetch_url(url: str, target: Path, settings: WorkerSettings) -> Fetched:
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
            raise _over_cap(shown, int(declared), cap)
        digest = hashlib.sha256()
        size = 0
        with open(target, "wb") as out:
            for chunk in response.stream(CHUNK, decode_content=True):
                size += len(chunk)
                if size > cap:
                    raise _over_cap(shown, f"more than {cap}", cap)
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
    if not _suffix_of(url):
        # The file's kind may only show after a redirect or in Content-Disposition: name the copy by it.
        disposition = re.search(r'filename="?([^";]+)"?', response.headers.get("Content-Disposition") or "")
        suffix = _suffix_of(final) or (_suffix_of(disposition.group(1)) if disposition else "")
        if suffix:
            target = target.rename(target.with_name(target.name + suffix))
    return Fetched([target], [shown], shown, digest.hexdigest(), size, urlsplit(url).scheme.lower(), details)


# --------------------------------------------------------------------------------------------------
# s3


def _parse_s3(uri: str) -> tuple[str, str]:
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket or not key or key.endswith("/"):
        raise DatasetError(f"{uri} must name an object: s3://bucket/path/to/file.jsonl")
    return bucket, key


def _fetch_s3(uri: str, target: Path, settings: WorkerSettings) -> Fetched:
    import botocore.exceptions

    from storage.s3 import make_s3_client

    bucket, key = _parse_s3(uri.split("?", 1)[0])
    shown = f"s3://{bucket}/{key}"
    if settings.aws_access_key_id is None or settings.aws_secret_access_key is None:
        raise DatasetError(
            f"{shown}: s3:// datasets are read with the worker's S3 settings, which are not set; set "
            "S3_BUCKET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and S3_ENDPOINT_URL for non-AWS stores)"
        )
    cap = settings.max_dataset_bytes
    started = time.monotonic()
    deadline = started + settings.dataset_download_timeout_s
    client = make_s3_client(settings, max_attempts=3)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        if head.get("ContentLength", 0) > cap:
            raise _over_cap(shown, head["ContentLength"], cap)
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        digest = hashlib.sha256()
        size = 0
        with open(target, "wb") as out:
            for chunk in body.iter_chunks(CHUNK):
                size += len(chunk)
                if size > cap:
                    raise _over_cap(shown, f"more than {cap}", cap)
                if time.monotonic() > deadline:
                    raise DatasetError(f"{shown}: the download took longer than "
                                       f"{settings.dataset_download_timeout_s:.0f}s (DATASET_DOWNLOAD_TIMEOUT_S)",
                                       retryable=True)
                digest.update(chunk)
                out.write(chunk)
        body.close()
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            raise DatasetError(f"{shown} does not exist; check the bucket and key") from None
        if code == "NoSuchBucket":
            raise DatasetError(f"{shown}: bucket {bucket!r} does not exist; check the uri") from None
        if code in ("403", "AccessDenied", "Forbidden"):
            raise DatasetError(f"{shown}: access denied with the worker's S3 credentials; grant them "
                               "s3:GetObject on it") from None
        raise DatasetError(f"{shown}: S3 answered {code or 'an error'}; try again", retryable=True) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise DatasetError(f"{shown}: the S3 store could not be reached ({type(exc).__name__}); check "
                           "S3_ENDPOINT_URL or try again", retryable=True) from None
    logger.info("downloaded %s (%d bytes) in %.1fs", shown, size, time.monotonic() - started)
    return Fetched([target], [shown], shown, digest.hexdigest(), size, "s3")

