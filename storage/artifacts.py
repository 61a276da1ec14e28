"""The artifact store: where a finished job's folder lands, under ``<prefix>/<job_id>/``.

The embedded default is a folder on the volume (``$VOLUME_ROOT/artifacts``); the output says
``file://…``. A job folder becomes visible only when complete: it is copied under a temporary name
(manifest.json last) and renamed into place, so a killed worker never leaves a folder that looks done.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapters import MANIFEST_NAME, FileEntry, describe_files, read_manifest, verify_files
from config.settings import WorkerSettings
from errors import StorageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredArtifact:
    uri: str  # the job folder: <store>/<prefix>/<job_id>/
    adapter_uri: str  # what PeftModel.from_pretrained reads
    bytes: int
    files: list[FileEntry]  # the adapter's files

    def to_output(self) -> dict:
        return {
            "uri": self.adapter_uri,
            "job_uri": self.uri,
            "bytes": self.bytes,
            "files": [{"name": f.name, "bytes": f.bytes, "sha256": f.sha256} for f in self.files],
        }


class ArtifactStore(Protocol):
    def find_complete(self, prefix: str, job_id: str) -> StoredArtifact | None: ...

    def put(self, job_dir: Path, prefix: str, job_id: str) -> StoredArtifact: ...


def upload_order(job_dir: Path) -> list[Path]:
    """Every file, manifests last (the adapter's, then the job's): a manifest marks completion."""
    files = sorted(p for p in job_dir.rglob("*") if p.is_file())
    manifests = [job_dir / "adapter" / MANIFEST_NAME, job_dir / MANIFEST_NAME]
    return [p for p in files if p not in manifests] + [p for p in manifests if p.is_file()]


class LocalArtifactStore:
    def __init__(self, root: Path):
        self.root = root

    def _folder(self, prefix: str, job_id: str) -> Path:
        return self.root / prefix / job_id if prefix else self.root / job_id

    def _artifact(self, folder: Path) -> StoredArtifact:
        adapter = folder / "adapter"
        files = describe_files(adapter)
        return StoredArtifact(
            uri=folder.as_uri() + "/",
            adapter_uri=adapter.as_uri() + "/",
            bytes=sum(f.bytes for f in files),
            files=files,
        )

    def find_complete(self, prefix: str, job_id: str) -> StoredArtifact | None:
        folder = self._folder(prefix, job_id)
        manifest = read_manifest(folder)
        if manifest is None or verify_files(folder / "adapter", manifest):
            return None
        return self._artifact(folder)

    def put(self, job_dir: Path, prefix: str, job_id: str) -> StoredArtifact:
        final = self._folder(prefix, job_id)
        tmp = final.parent / f".{job_id}.partial-{uuid.uuid4().hex[:8]}"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            for src in upload_order(job_dir):
                dst = tmp / src.relative_to(job_dir)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
            if final.exists():
                # An earlier, incomplete delivery of the same job: replace it with this complete one.
                stale = final.parent / f".{job_id}.stale-{uuid.uuid4().hex[:8]}"
                os.replace(final, stale)
                os.replace(tmp, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(
                f"could not copy the adapter to {final} ({exc.strerror or exc}); it is kept at {job_dir}"
            ) from exc
        logger.info("stored %s", final)
        return self._artifact(final)


def open_artifact_store(settings: WorkerSettings) -> ArtifactStore:
    if settings.s3_bucket:
        raise StorageError(
            "S3 artifact storage is configured (S3_BUCKET) but this worker build stores artifacts "
            "on the volume only; unset the S3 variables"
        )
    return LocalArtifactStore(settings.artifacts_root)
