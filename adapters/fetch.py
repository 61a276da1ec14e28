"""Where an adapter is: a folder, an s3:// prefix or https URLs; fetched, then checked against a base."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from adapters.manifest import read_manifest
from adapters.verify import ADAPTER_CONFIG_NAME, AdapterInfo, BaseInfo, Verdict, read_adapter, read_base, verify_adapter
from config.settings import WorkerSettings
from data.http import Rules, check_url, open_url
from errors import InputError, StorageError, scrub
from files import MANIFEST_NAME
from models.cache import hf_cache_dir, locate_base

# An adapter file is megabytes to a few GB (an 80B MoE at a high rank); far more is not an adapter.
MAX_ADAPTER_FILE_BYTES = 16 * 1024**3
ADAPTER_DOWNLOAD_TIMEOUT_S = 3600.0


def fetch_adapter(refs: str | list[str], dest: Path, *, settings: WorkerSettings | None = None,
                  max_file_bytes: int = MAX_ADAPTER_FILE_BYTES) -> Path:
    """The folder of an adapter: a local folder as is; an s3:// prefix or https URLs downloaded to ``dest``.

    ``settings`` gives the S3 endpoint and credentials and ALLOW_PRIVATE_URLS (see ``adapter_rules``).
    Downloaded files are checked against the adapter's manifest.json later, by ``read_adapter``.
    """
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
        raise InputError("no adapter given: name a folder, an s3:// prefix or https URLs")
    first = refs[0]
    if first.startswith("s3://"):
        if len(refs) > 1:
            raise InputError("give one s3:// prefix (the adapter folder), not several")
        return _download_s3(first, dest, settings, max_file_bytes)
    if first.startswith(("https://", "http://")):
        return _download_https(refs, dest, adapter_rules(settings, max_file_bytes))
    if len(refs) > 1:
        raise InputError("give one adapter folder, not several")
    path = Path(first.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise InputError(f"adapter {first} is not a folder; name the adapter folder, an s3:// prefix "
                         "or https URLs of its files")
    if not (path / ADAPTER_CONFIG_NAME).is_file() and (path / "adapter" / ADAPTER_CONFIG_NAME).is_file():
        return path / "adapter"  # a job folder: its adapter is inside
    return path


def _safe_relative(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _download_s3(uri: str, dest: Path, settings: WorkerSettings | None, max_file_bytes: int) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    from storage.s3 import make_s3_client

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise InputError(f"{uri} names no bucket; use s3://bucket/prefix/adapter/")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    if settings is None:
        raise InputError("an s3:// adapter needs S3 settings (S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                         "AWS_SECRET_ACCESS_KEY)")
    client = make_s3_client(settings)
    try:
        sizes: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            sizes.update({obj["Key"]: obj.get("Size", 0) for obj in page.get("Contents", [])})
        names = {k[len(prefix):]: k for k in sizes}
        if ADAPTER_CONFIG_NAME not in names and f"adapter/{ADAPTER_CONFIG_NAME}" in names:
            names = {n[len("adapter/"):]: k for n, k in names.items() if n.startswith("adapter/")}
        if not names:
            raise InputError(f"there is nothing under {uri}; name the adapter's folder "
                             "(s3://bucket/<prefix>/<job_id>/adapter/)")
        dest.mkdir(parents=True, exist_ok=True)
        for name, key in sorted(names.items()):
            if not _safe_relative(name):
                continue
            if sizes[key] > max_file_bytes:
                raise StorageError(f"s3://{bucket}/{key} is {sizes[key]} bytes, over the {max_file_bytes}-byte "
                                   "cap for one adapter file; is the prefix an adapter folder?", retryable=False)
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise StorageError(f"could not download {uri}: S3 answered {code}; check the bucket, the "
                           "prefix and the S3 credentials") from None
    except BotoCoreError as exc:
        raise StorageError(f"could not download {uri}: {type(exc).__name__}; check S3_ENDPOINT_URL "
                           "and the network") from None
    return dest


def _download_https(urls: list[str], dest: Path, rules: Rules) -> Path:
    """Each URL is one file (presigned URLs sign one object each); a lone manifest.json URL pulls the
    files it lists from the same folder, with the same query string."""
    for url in urls:
        check_url(url, rules)  # credentials or another scheme: refused before any request or message
    dest.mkdir(parents=True, exist_ok=True)
    given = set()
    for url in urls:
        name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
        if not name or not _safe_relative(name):
            raise InputError(f"{shown_ref(url)} does not name a file; give the URL of each adapter "
                             "file (manifest.json, adapter_config.json, adapter_model.safetensors)")
        _http_get(url, dest / name, rules)
        given.add(name)
    manifest = read_manifest(dest)
    if manifest is not None:
        base = urlsplit(urls[[unquote(urlsplit(u).path.rsplit("/", 1)[-1]) for u in urls].index(MANIFEST_NAME)]
                        if MANIFEST_NAME in given else urls[0])
        folder = base.path.rsplit("/", 1)[0] + "/"
        for entry in manifest.get("files", []):
            name = entry["name"]
            if name in given or not _safe_relative(name):
                continue
            url = urlunsplit((base.scheme, base.netloc, folder + name, base.query, ""))
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            _http_get(url, dest / name, rules, hint=" (a presigned URL signs one file: pass one --adapter URL "
                      "per file: manifest.json, adapter_config.json, adapter_model.safetensors)")
    return dest


def shown_ref(ref: str) -> str:
    """An adapter reference as messages and manifests show it: no credentials, no signature."""
    if ref.startswith(("https://", "http://")):
        ref = re.sub(r"(?<=://)[^/@?#]*@", "", ref)
    return scrub(ref)


def adapter_rules(settings: WorkerSettings | None, cap: int = MAX_ADAPTER_FILE_BYTES) -> Rules:
    """The guarded client's rules for adapter files.

    Without worker settings (the CLI on the user's own machine, fetching URLs the user named)
    private addresses are allowed; the worker (init_adapter) follows ALLOW_PRIVATE_URLS.
    """
    def too_big(shown: str, size: int | str) -> StorageError:
        return StorageError(f"{shown} is {size} bytes, over the {cap}-byte cap for one adapter file; "
                            "is the URL an adapter file?", retryable=False)

    allow_private = settings.allow_private_urls if settings is not None else True
    return Rules("Adapters", StorageError, allow_private, cap, ADAPTER_DOWNLOAD_TIMEOUT_S, too_big)


def _http_get(url: str, target: Path, rules: Rules, hint: str = "") -> None:
    with open_url(url, rules) as response:
        if response.status != 200:
            retry = response.status >= 500 or response.status == 429
            raise StorageError(f"could not download {response.shown}: HTTP {response.status}{hint}",
                               retryable=retry)
        response.save(target)


def check_pair(adapter_refs: str | list[str], base_ref: str, workdir: Path, *, revision: str | None = None,
               settings: WorkerSettings | None = None, cache_dir: Path | None = None
               ) -> tuple[Verdict, AdapterInfo, BaseInfo]:
    """Fetch (if remote), read and verify an adapter against a base: the one entry point for all.

    ``cache_dir`` is the Hugging Face cache a repo id ``base_ref`` is looked up in; the CLI's
    default is the user's own (HF_HUB_CACHE / HF_HOME).
    """
    refs = [adapter_refs] if isinstance(adapter_refs, str) else list(adapter_refs)
    folder = fetch_adapter(refs, workdir / "adapter", settings=settings)
    adapter = read_adapter(folder, ", ".join(shown_ref(r) for r in refs))
    base_dir = locate_base(base_ref, revision, cache_dir if cache_dir is not None else hf_cache_dir())
    base = read_base(base_dir, base_ref if Path(base_ref).expanduser().is_dir() else f"{base_ref} ({base_dir})")
    return verify_adapter(adapter, base), adapter, base
