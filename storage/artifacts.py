"""The artifact store: where a finished job's folder lands, under ``<prefix>/<job_id>/``.

Two stores, one behaviour (CONTRACT §4):

- ``LocalArtifactStore``, the embedded default, a folder on the volume (``$VOLUME_ROOT/artifacts``);
  the output says ``file://…``. The job folder is copied under a temporary name (manifest.json last)
  and renamed into place, so a killed worker never leaves a folder that looks done.
- ``S3ArtifactStore`` when ``S3_BUCKET`` (or RunPod's ``BUCKET_*`` or a request's ``s3Config``) is
  set: ``s3://<bucket>/<S3_PREFIX>/<prefix>/<job_id>/``. Every object carries a SHA-256 checksum the
  server verifies (the manifest's own value for single-part objects, per part for multipart ones);
  the manifests go up last, so a prefix without ``manifest.json`` is an incomplete upload.

``find_complete`` is what makes a re-delivered job cheap: it answers a stored artifact only when the
job manifest is present, names this job, and every object it lists has the listed size and checksum.

One job_id owns one location, whatever the prefix. ``<prefix>/<job_id>/`` alone is not unique (job
``adapter`` with prefix ``victim`` is ``victim/adapter/``, the ``adapter/`` folder of job ``victim``),
so ``claim`` records the owner in the location (``.job-owner.json``, written once, before anything
else) and refuses a location that another job owns, that lies inside one (an owner claim or a job
manifest in a folder above it), or that would hold one (an owner claim below it).
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import logging
import mimetypes
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

from adapters.manifest import AdapterManifest, load_manifest
from config.settings import WorkerSettings
from errors import InputError, StorageError
from files import MANIFEST_NAME, FileEntry, publish_folder, sha256_file, verify_files

logger = logging.getLogger(__name__)

MiB = 1024 * 1024


@dataclass(frozen=True)
class StoredArtifact:
    uri: str  # the job folder: <store>/<prefix>/<job_id>/
    adapter_uri: str  # what PeftModel.from_pretrained reads
    bytes: int
    files: list[FileEntry]  # the adapter's files
    manifest: AdapterManifest  # the adapter's manifest.json, as stored
    # Presigned GET URLs per adapter file (S3 with PRESIGN_SECONDS only). They carry signatures:
    # they go to the artifact record, never into the job output or a log line.
    download_urls: dict[str, str] | None = None
    download_expires_at: str | None = None

    def to_output(self) -> dict:
        return {
            "uri": self.adapter_uri,
            "job_uri": self.uri,
            "bytes": self.bytes,
            "files": [{"name": f.name, "bytes": f.bytes, "sha256": f.sha256} for f in self.files],
        }


OWNER_NAME = ".job-owner.json"  # in <prefix>/<job_id>/: the job that owns the location


class ArtifactStore(Protocol):
    def claim(self, prefix: str, job_id: str) -> None: ...

    def find_complete(self, prefix: str, job_id: str) -> StoredArtifact | None: ...

    def put(self, job_dir: Path, prefix: str, job_id: str) -> StoredArtifact: ...


def upload_order(job_dir: Path) -> list[Path]:
    """Every file, manifests last (the adapter's, then the job's): a manifest marks completion."""
    files = sorted(p for p in job_dir.rglob("*") if p.is_file())
    manifests = [job_dir / "adapter" / MANIFEST_NAME, job_dir / MANIFEST_NAME]
    return [p for p in files if p not in manifests] + [p for p in manifests if p.is_file()]


def _artifact(uri: str, manifest: AdapterManifest, **extra: Any) -> StoredArtifact:
    files = list(manifest.files)
    return StoredArtifact(uri=uri, adapter_uri=uri + "adapter/", bytes=sum(f.bytes for f in files),
                          files=files, manifest=manifest, **extra)


def _owner_claim(job_id: str) -> bytes:
    return json.dumps({"job_id": job_id}).encode()


def _owner_in(raw: bytes | None) -> str | None:
    """The job an owner claim or a job manifest names; None when there is neither."""
    if raw is None:
        return None
    try:
        owner = json.loads(raw).get("job_id")
    except (ValueError, AttributeError):
        owner = None
    return str(owner) if owner else "an unknown job"


def taken(where: str, prefix: str, job_id: str, owner: str, how: str) -> InputError:
    return InputError(
        f"output.prefix {prefix!r} with job_id {job_id!r} stores the artifact at {where}, which {how} job "
        f"{owner!r}'s artifact location; one job_id owns one place: choose another output.prefix"
    )


def _job_manifests(job_dir: Path) -> tuple[AdapterManifest, AdapterManifest]:
    """The job folder's manifest and its adapter's, or StorageError: an unfinished folder is never stored."""
    try:
        manifest, adapter_manifest = load_manifest(job_dir), load_manifest(job_dir / "adapter")
    except (OSError, ValueError) as exc:
        raise StorageError(f"the job folder {job_dir} has an unreadable manifest.json ({exc}), so it was "
                           "not stored: run the job again to write it anew") from exc
    if manifest is None or adapter_manifest is None:
        raise StorageError(
            f"the job folder {job_dir} has no manifest.json (it is incomplete), so it was not stored"
        )
    return manifest, adapter_manifest


# --------------------------------------------------------------------------------------------------
# local folder


class LocalArtifactStore:
    def __init__(self, root: Path):
        self.root = root

    def _folder(self, prefix: str, job_id: str) -> Path:
        return self.root / prefix / job_id if prefix else self.root / job_id

    @staticmethod
    def _owner(folder: Path) -> str | None:
        for name in (OWNER_NAME, MANIFEST_NAME):
            try:
                return _owner_in((folder / name).read_bytes())
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError:
                return "an unknown job"
        return None

    def _conflict(self, folder: Path, prefix: str, job_id: str) -> InputError | None:
        where = folder.as_uri() + "/"
        for above in folder.parents:
            if not is_inside(above, self.root):
                break
            if (owner := self._owner(above)) is not None:
                return taken(where, prefix, job_id, owner, "is inside")
        own = self._owner(folder)
        if own is not None and own != job_id:
            return taken(where, prefix, job_id, own, "is")
        ours = {folder / OWNER_NAME, folder / MANIFEST_NAME, folder / "adapter" / MANIFEST_NAME}
        for found in sorted(folder.rglob(OWNER_NAME)) + sorted(folder.rglob(MANIFEST_NAME)):
            if found not in ours:
                return taken(where, prefix, job_id, self._owner(found.parent) or "an unknown job", "holds")
        return None

    def claim(self, prefix: str, job_id: str) -> None:
        folder = self._folder(prefix, job_id)
        conflict = self._conflict(folder, prefix, job_id)
        if conflict is not None:
            raise conflict
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / OWNER_NAME, "xb") as f:  # once: the first claim wins
                f.write(_owner_claim(job_id))
        except FileExistsError:
            pass
        except OSError as exc:
            raise StorageError(f"could not write to {folder} ({exc.strerror or exc})") from exc
        # Two jobs may claim nested places at once: each checks again after its own claim is there.
        conflict = self._conflict(folder, prefix, job_id)
        if conflict is not None:
            raise conflict

    @staticmethod
    def _sweep(final: Path, job_id: str) -> None:
        """Remove the half-made copies an earlier delivery of this job left when it was killed (a partial
        copy, or a replaced folder not yet removed): hidden, never published, but each one a whole adapter
        of disk. Runs under the job lock; should a live delivery's copy be met all the same, its copy fails
        with a retryable error and its job folder stays, so nothing is lost."""
        for pattern in (f".{glob.escape(job_id)}.partial-*", f".{glob.escape(job_id)}.stale-*"):
            for leftover in final.parent.glob(pattern):
                logger.info("removing %s, left by an earlier delivery of job %s", leftover, job_id)
                shutil.rmtree(leftover, ignore_errors=True)

    def find_complete(self, prefix: str, job_id: str) -> StoredArtifact | None:
        folder = self._folder(prefix, job_id)
        try:
            manifest, adapter_manifest = load_manifest(folder), load_manifest(folder / "adapter")
        except (OSError, ValueError) as exc:
            logger.warning("stored job folder %s is unreadable, storing it again: %s", folder, exc)
            return None
        if manifest is None or adapter_manifest is None or manifest.job_id != job_id:
            return None
        # The job manifest lists every file under the folder, the adapter's manifest included.
        problems = verify_files(folder, manifest.to_dict())
        if problems:
            logger.warning("stored job folder %s is incomplete (%s); storing it again", folder,
                           "; ".join(problems[:3]))
            return None
        return _artifact(folder.as_uri() + "/", adapter_manifest)

    def put(self, job_dir: Path, prefix: str, job_id: str) -> StoredArtifact:
        _, adapter_manifest = _job_manifests(job_dir)
        self.claim(prefix, job_id)
        final = self._folder(prefix, job_id)
        self._sweep(final, job_id)
        tmp = final.parent / f".{job_id}.partial-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            (tmp / OWNER_NAME).write_bytes(_owner_claim(job_id))  # the claim goes with the folder
            for src in upload_order(job_dir):
                dst = tmp / src.relative_to(job_dir)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
            # An earlier, incomplete delivery of the same job (or this job's claim alone) is replaced.
            publish_folder(tmp, final, replace=True)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(f"could not copy the adapter to {final} ({exc.strerror or exc})") from exc
        logger.info("stored %s", final)
        return _artifact(final.as_uri() + "/", adapter_manifest)


# --------------------------------------------------------------------------------------------------
# S3


def default_transfer_config():
    """Tuned for adapters of a few MiB to tens of GiB on a RunPod worker's link.

    64 MiB parts keep a 20 GiB adapter at 320 parts (S3 allows 10,000) and the request count low;
    8 threads keep a 10 Gbit/s link busy without starving the client's 16 pooled connections.
    Files under 64 MiB (configs, model card, metrics, most adapters of small models) go up in one
    PUT whose SHA-256 the server checks against the manifest's value.
    """
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB,
                          max_concurrency=8, use_threads=True, preferred_transfer_client="classic")


class S3ArtifactStore:
    def __init__(self, client: Any, bucket: str, root: str = "", *, transfer_config: Any = None,
                 presign_seconds: int | None = None, endpoint: str | None = None):
        self.client = client
        self.bucket = bucket
        self.root = root.strip("/")
        self.transfer_config = transfer_config or default_transfer_config()
        self.presign_seconds = presign_seconds
        self.endpoint = endpoint or "AWS S3"

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> S3ArtifactStore:
        from storage.s3 import make_s3_client

        return cls(make_s3_client(settings), settings.s3_bucket or "", settings.s3_prefix,
                   presign_seconds=settings.presign_seconds, endpoint=settings.s3_endpoint_url)

    # --- names -------------------------------------------------------------------------------------
    def _prefix(self, prefix: str, job_id: str) -> str:
        return "/".join(p for p in (self.root, prefix.strip("/"), job_id) if p) + "/"

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # --- ownership ---------------------------------------------------------------------------------
    def _owner(self, folder_key: str, names: tuple[str, ...] = (OWNER_NAME, MANIFEST_NAME)) -> str | None:
        for name in names:
            owner = _owner_in(self._get_bytes(folder_key + name))
            if owner is not None:
                return owner
        return None

    def _conflict(self, prefix: str, job_id: str) -> InputError | None:
        root = self._prefix(prefix, job_id)
        where = self._uri(root)
        parts = [p for p in (prefix.strip("/"), job_id) if p]
        parts = "/".join(parts).split("/")
        base = self.root + "/" if self.root else ""
        for depth in range(1, len(parts)):
            if (owner := self._owner(base + "/".join(parts[:depth]) + "/")) is not None:
                return taken(where, prefix, job_id, owner, "is inside")
        own = self._owner(root)
        if own is not None and own != job_id:
            return taken(where, prefix, job_id, own, "is")
        # Without listing (upload-only credentials): the one folder this job writes below its root.
        if (owner := self._owner(root + "adapter/", (OWNER_NAME,))) is not None:
            return taken(where, prefix, job_id, owner, "holds")
        return None

    def claim(self, prefix: str, job_id: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        conflict = self._conflict(prefix, job_id)
        if conflict is not None:
            raise conflict
        key = self._prefix(prefix, job_id) + OWNER_NAME
        if _owner_in(self._get_bytes(key)) == job_id:
            return  # claimed by an earlier delivery: a re-delivered job writes nothing
        try:  # once: the first claim wins (a server that ignores IfNoneMatch is caught by the re-check)
            self.client.put_object(Bucket=self.bucket, Key=key, Body=_owner_claim(job_id),
                                   ContentType="application/json", IfNoneMatch="*")
        except ClientError as exc:
            if _code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise self._error("upload", key, exc) from exc
        except BotoCoreError as exc:
            raise self._error("upload", key, exc) from exc
        conflict = self._conflict(prefix, job_id)
        if conflict is not None:
            raise conflict

    # --- reading -----------------------------------------------------------------------------------
    def _get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._error("read", key, exc) from exc
        except BotoCoreError as exc:
            raise self._error("read", key, exc) from exc

    def _problem(self, key: str, entry: FileEntry) -> str | None:
        """Why the object at ``key`` is not ``entry`` (None when it is)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return f"{entry.name} is missing"
            raise self._error("read", key, exc) from exc
        except BotoCoreError as exc:
            raise self._error("read", key, exc) from exc
        if head.get("ContentLength") != entry.bytes:
            return f"{entry.name} has {head.get('ContentLength')} bytes, not {entry.bytes}"
        if (head.get("Metadata") or {}).get("sha256") != entry.sha256:
            return f"{entry.name} was not stored from this manifest (its sha256 differs)"
        checksum = head.get("ChecksumSHA256")
        # A single-part object's checksum is the file's SHA-256, computed by the server; a multipart
        # one's is a digest of its parts' digests ("…-N"), each verified by the server at upload.
        # None: not uploaded by this store (or the server keeps no checksums), so not trusted.
        if not checksum:
            return f"{entry.name} has no SHA-256 checksum on the server"
        if "-" not in checksum and checksum != _b64(entry.sha256):
            return f"{entry.name} does not match its sha256"
        return None

    def find_complete(self, prefix: str, job_id: str) -> StoredArtifact | None:
        root = self._prefix(prefix, job_id)
        raw = self._get_bytes(root + MANIFEST_NAME)
        if raw is None:
            return None
        try:
            job_manifest = AdapterManifest.model_validate(json.loads(raw))
            entries = {e.name: e for e in job_manifest.files}
            if job_manifest.job_id != job_id:
                return None  # another job's: claim refuses the place
        except ValueError as exc:
            logger.warning("%s is not a readable manifest (%s); storing the job again",
                           self._uri(root + MANIFEST_NAME), exc)
            return None
        adapter_manifest_name = f"adapter/{MANIFEST_NAME}"
        problems = [] if adapter_manifest_name in entries else [f"{adapter_manifest_name} is not listed"]
        problems += [p for e in entries.values() if (p := self._problem(root + e.name, e))]
        adapter_raw = None if problems else self._get_bytes(root + adapter_manifest_name)
        if not problems and (adapter_raw is None
                             or hashlib.sha256(adapter_raw).hexdigest() != entries[adapter_manifest_name].sha256):
            problems.append(f"{adapter_manifest_name} changed while it was read")
        try:
            adapter_manifest = None if problems else AdapterManifest.model_validate(json.loads(adapter_raw))
        except ValueError as exc:
            problems.append(f"{adapter_manifest_name} is not a readable manifest ({exc})")
        if problems:
            logger.warning("%s is incomplete (%s); storing the job again", self._uri(root),
                           "; ".join(problems[:3]))
            return None
        return self._artifact(root, adapter_manifest)

    def _artifact(self, root: str, adapter_manifest: AdapterManifest) -> StoredArtifact:
        urls, expires = self._presign(root, adapter_manifest)
        return _artifact(self._uri(root), adapter_manifest, download_urls=urls, download_expires_at=expires)

    def _presign(self, root: str, manifest: AdapterManifest) -> tuple[dict[str, str] | None, str | None]:
        if not self.presign_seconds:
            return None, None
        names = [f.name for f in manifest.files] + [MANIFEST_NAME]
        expires = datetime.now(timezone.utc) + timedelta(seconds=self.presign_seconds)
        urls = {
            name: self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": f"{root}adapter/{name}"},
                ExpiresIn=self.presign_seconds)
            for name in names
        }
        return urls, expires.isoformat(timespec="seconds")

    # --- writing -----------------------------------------------------------------------------------
    def _extra_args(self, path: Path, size: int, sha256: str) -> dict[str, Any]:
        args: dict[str, Any] = {"Metadata": {"sha256": sha256},
                                "ContentType": mimetypes.guess_type(path.name)[0] or "application/octet-stream"}
        if size < self.transfer_config.multipart_threshold:
            args["ChecksumSHA256"] = _b64(sha256)  # the server rejects bytes that do not match it
        else:
            args["ChecksumAlgorithm"] = "SHA256"  # per part, each verified by the server
        return args

    def put(self, job_dir: Path, prefix: str, job_id: str) -> StoredArtifact:
        from boto3.exceptions import Boto3Error
        from boto3.s3.transfer import create_transfer_manager
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer.exceptions import CancelledError, S3UploadFailedError

        transfer_errors = (CancelledError, S3UploadFailedError)
        manifest, adapter_manifest = _job_manifests(job_dir)
        self.claim(prefix, job_id)
        listed = {e.name: e for e in manifest.files}
        root = self._prefix(prefix, job_id)
        order = upload_order(job_dir)
        manifests = [job_dir / "adapter" / MANIFEST_NAME, job_dir / MANIFEST_NAME]
        data = [p for p in order if p not in manifests]

        # No delete first (upload-only credentials suffice): a stale manifest from an earlier, torn
        # upload never reads as complete, since find_complete checks every object it lists.
        uploaded = skipped = 0
        current = root
        try:
            with create_transfer_manager(self.client, self.transfer_config) as manager:
                pending = []
                for path in data:
                    rel = path.relative_to(job_dir).as_posix()
                    entry = listed.get(rel) or FileEntry(rel, path.stat().st_size, sha256_file(path))
                    if self._problem(root + rel, entry) is None:
                        skipped += 1  # already there from an earlier attempt, checksum and all
                        continue
                    extra = self._extra_args(path, entry.bytes, entry.sha256)
                    pending.append((root + rel, manager.upload(str(path), self.bucket, root + rel, extra_args=extra)))
                for current, future in pending:
                    future.result()
                    uploaded += 1
                # Manifests last, one after the other: the job's manifest marks the upload complete.
                for path in manifests:
                    rel = path.relative_to(job_dir).as_posix()
                    entry = listed.get(rel) or FileEntry(rel, path.stat().st_size, sha256_file(path))
                    current = root + rel
                    manager.upload(str(path), self.bucket, current,
                                   extra_args=self._extra_args(path, entry.bytes, entry.sha256)).result()
                    uploaded += 1
        except (BotoCoreError, ClientError, Boto3Error, *transfer_errors) as exc:
            raise self._error("upload", current, exc) from exc
        except OSError as exc:
            raise StorageError(f"could not read {job_dir} to upload it to {self._uri(root)} "
                               f"({exc.strerror or exc})") from exc
        logger.info("stored %s (%d objects uploaded, %d already there)", self._uri(root), uploaded, skipped)
        return self._artifact(root, adapter_manifest)

    # --- errors ------------------------------------------------------------------------------------
    def _error(self, action: str, key: str, exc: BaseException) -> StorageError:
        code = _code(exc)
        if code == "NoSuchBucket":
            reason = f"bucket '{self.bucket}' does not exist; create it or set S3_BUCKET to an existing bucket"
        elif code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"):
            reason = (f"the S3 credentials were refused ({code}); check AWS_ACCESS_KEY_ID and "
                      "AWS_SECRET_ACCESS_KEY (or BUCKET_*, or the request's s3Config) and the bucket policy")
        elif code in ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"):
            reason = f"the bytes the server received do not match their sha256 ({code})"
        elif code:
            # The code only, and only when it looks like one: the message and body are the endpoint's
            # words, which a request's endpoint could fill with anything it wants shown.
            reason = f"the store answered {code if _PLAIN_CODE.match(code) else 'an unexpected error'}"
        else:
            reason = f"{self.endpoint} did not answer after retries ({type(exc).__name__}: {exc})"
        return StorageError(f"could not {action} {self._uri(key)}: {reason}")


def is_inside(path: Path, root: Path) -> bool:
    return path != root and root in path.parents


_PLAIN_CODE = re.compile(r"^[A-Za-z0-9]{1,48}$")


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code") or "")
    cause = exc.__cause__ or exc.__context__
    return _code(cause) if cause is not None and cause is not exc else ""


def _b64(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


def open_artifact_store(settings: WorkerSettings) -> ArtifactStore:
    """S3 when a bucket is configured (settings refuse a half-configured one), else the volume."""
    if settings.s3_bucket:
        return S3ArtifactStore.from_settings(settings)
    return LocalArtifactStore(settings.artifacts_root)
