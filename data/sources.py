"""Dataset uri → local files: the volume, http(s) URLs, s3://bucket/key and hf://org/name.

Remote files are streamed to a temporary folder, hashed and counted on the way: the size cap
(MAX_DATASET_BYTES) stops a download as soon as it is passed, not after, and the whole download has
a deadline (DATASET_DOWNLOAD_TIMEOUT_S). The temporary folder is removed when the caller is done.
URLs go through the guarded client (data/http.py): public addresses only unless ALLOW_PRIVATE_URLS.

Nothing printed, logged or raised here carries a URL's query string (signed URLs carry their token
there) or its credentials: every message uses ``display_url``.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from config.settings import WorkerSettings
from data.fetched import Fetched, over_cap, suffix_of
from data.formats import is_data_file
from data.http import CHUNK, Rules, open_url, save_chunks
from errors import DatasetError, InputError
from files import check_inside, is_within, sha256_files

logger = logging.getLogger(__name__)


@contextmanager
def fetch(uri: str, settings: WorkerSettings, *, subset: str | None = None, split: str | None = None,
          what: str = "dataset.uri", for_eval: bool = False) -> Iterator[Fetched]:
    """Yield the dataset's files on local disk; temporary copies are removed afterwards."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https", "s3"):
        workdir = Path(tempfile.mkdtemp(prefix="dataset-"))
        try:
            if scheme == "s3":
                yield _fetch_s3(uri, workdir / ("data" + suffix_of(uri)), settings)
            else:
                yield _fetch_url(uri, workdir, settings)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    if scheme == "hf":
        from data.hub import fetch_hub_dataset

        yield fetch_hub_dataset(uri, settings, subset=subset, split=split, for_eval=for_eval)
        return
    if scheme:
        raise InputError(f"{what}: scheme '{scheme}://' is not supported; use https://, http://, s3://, "
                         "hf:// or a path on the volume")
    yield _fetch_volume(uri, settings, what)


# --------------------------------------------------------------------------------------------------
# the volume


def _fetch_volume(uri: str, settings: WorkerSettings, what: str) -> Fetched:
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
        # A shard may be a link: what it points at must be on the volume too, like the folder itself.
        root = settings.volume_root.resolve()
        for shard, name in zip(paths, names):
            if not is_within(shard.resolve(), root):
                raise InputError(f"{what}: dataset file {name!r} links outside the volume "
                                 f"({settings.volume_root}); copy the file onto the volume instead of linking it")
    elif path.is_file():
        paths, names = [path], [uri]
    else:
        raise DatasetError(f"dataset file {uri} does not exist on the volume ({path}); upload it there or "
                           "fix the path")
    size = sum(p.stat().st_size for p in paths)
    if size > settings.max_dataset_bytes:
        raise over_cap(f"dataset {uri}", size, settings.max_dataset_bytes)
    return Fetched(paths, names, uri, sha256_files(paths), size)


# --------------------------------------------------------------------------------------------------
# http(s)


def dataset_rules(settings: WorkerSettings) -> Rules:
    return Rules("Datasets", DatasetError, settings.allow_private_urls, settings.max_dataset_bytes,
                 settings.dataset_download_timeout_s,
                 too_big=lambda shown, size: over_cap(shown, size, settings.max_dataset_bytes),
                 too_slow=" (DATASET_DOWNLOAD_TIMEOUT_S); try again or host it closer")


_STATUS_HINTS = {
    400: "the request was refused; a signed URL may be malformed or expired: sign a new one",
    401: "access denied; a signed URL may have expired: sign a new one",
    403: "access denied; a signed URL may have expired: sign a new one",
    404: "the file is not there; check the link (the object may have been moved or deleted)",
    410: "the file is gone; upload it again",
}


def _fetch_url(url: str, workdir: Path, settings: WorkerSettings) -> Fetched:
    started = time.monotonic()
    with open_url(url, dataset_rules(settings)) as response:
        shown = response.shown
        if response.status != 200:
            retry = response.status >= 500 or response.status == 429
            hint = _STATUS_HINTS.get(response.status) or ("the server failed; try again" if retry
                                                          else "check the URL")
            raise DatasetError(f"{shown} answered {response.status} {response.reason}".rstrip() + f": {hint}",
                               retryable=retry)
        if (response.headers.get("Content-Type") or "").lower().startswith("text/html"):
            raise DatasetError(f"{shown} returned an HTML page, not a data file; use a direct download "
                               "link (e.g. a Supabase Storage signed URL)")
        # The file's kind may only show after a redirect or in Content-Disposition: name the copy by it.
        disposition = re.search(r'filename="?([^";]+)"?', response.headers.get("Content-Disposition") or "")
        suffix = suffix_of(url) or suffix_of(response.url) or (suffix_of(disposition.group(1)) if disposition
                                                                else "")
        saved = response.save(workdir / ("data" + suffix))
    logger.info("downloaded %s (%d bytes) in %.1fs", shown, saved.bytes, time.monotonic() - started)
    return Fetched([saved.path], [shown], shown, saved.sha256, saved.bytes)


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
            raise over_cap(shown, head["ContentLength"], cap)
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            saved = save_chunks(body.iter_chunks(CHUNK), target, dataset_rules(settings), shown, deadline)
        finally:
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
    logger.info("downloaded %s (%d bytes) in %.1fs", shown, saved.bytes, time.monotonic() - started)
    return Fetched([saved.path], [shown], shown, saved.sha256, saved.bytes)

