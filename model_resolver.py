"""base_model → ResolvedModel: which folder to load, where it came from, and what it is.

Order (first cut; the Hugging Face cache and runtime download come with their own issue):
1. an absolute path inside an allowed root, or a folder name under MODELS_DIR
   (``<name>`` or ``<org>/<name>``, the layouts ``snapshot_download(local_dir=…)`` creates);
2. MODEL_PATH, only when the job names the model it holds or names none.

A model is never swapped: if MODEL_PATH holds model A and the job asks for B, A is not used and the
error names both. Paths are checked as strings before any filesystem read, then again after
symlinks are resolved, so ``../`` and links out of the volume are refused.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters import ModelSignature, read_signature
from config.settings import WorkerSettings
from errors import InputError, ModelError

logger = logging.getLogger(__name__)

MARKER_NAME = ".worker-model.json"  # written by prefetch: the canonical id and commit of a folder


@dataclass(frozen=True)
class ResolvedModel:
    id: str
    revision: str | None
    source: str  # volume | model_path | hf_cache | download
    path: Path
    signature: ModelSignature
    seconds: float = 0.0
    bytes: int = 0
    downloaded_bytes: int = 0
    trust_remote_code: bool = False

    @property
    def fingerprint(self) -> str:
        return self.signature.fingerprint

    def to_output(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "revision": self.revision,
            "source": self.source,
            "path": str(self.path),
            "fingerprint": self.fingerprint,
            "architecture": self.signature.to_dict(),
            "bytes": self.bytes,
            "downloaded_bytes": self.downloaded_bytes,
            "seconds": round(self.seconds, 3),
        }


def requested_model(base_model: str | None, settings: WorkerSettings) -> str:
    """The model the job asks for: its own, else DEFAULT_BASE_MODEL, else MODEL_PATH's."""
    if base_model:
        return base_model
    if settings.default_base_model:
        return settings.default_base_model
    if settings.model_path is not None:
        return str(settings.model_path)
    raise InputError(
        "base_model is missing: name a Hugging Face repo id or a folder under the models root "
        "in the job, or set DEFAULT_BASE_MODEL (or MODEL_PATH) on the endpoint"
    )


def check_inside(path: str, roots: tuple[Path, ...], what: str) -> Path:
    """Refuse a path outside ``roots``: first as a string (no filesystem read), then resolved."""
    normal = Path(os.path.normpath(path))
    if ".." in Path(path).parts or not any(_is_within(normal, root) for root in roots):
        raise InputError(
            f"{what} {path!r} is outside the allowed folders ({', '.join(map(str, roots))}); "
            "put it on the volume or name it relative to the models root"
        )
    real = normal.resolve()
    if not any(_is_within(real, root.resolve()) for root in roots):
        raise InputError(f"{what} {path!r} links outside the allowed folders; copy it onto the volume")
    return real


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _marker(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _canonical_id(folder: Path, settings: WorkerSettings) -> str:
    """The repo id a local folder holds: its marker, else its place under the models root."""
    marker = _marker(folder)
    if marker.get("repo_id"):
        return str(marker["repo_id"])
    for root in (settings.models_root,):
        if _is_within(folder, root.resolve()) and folder != root.resolve():
            return folder.relative_to(root.resolve()).as_posix()
    return folder.name


def _holds(folder: Path, requested: str, settings: WorkerSettings) -> bool:
    """Whether ``folder`` (MODEL_PATH) is the model ``requested`` names."""
    if requested.startswith("/"):
        return Path(os.path.normpath(requested)) == folder
    canonical = _canonical_id(folder, settings)
    if requested == canonical:
        return True
    # snapshot_download(local_dir=".../org/name") or ".../name": the folder's own path says it.
    tail = folder.as_posix().split("/")
    return requested.split("/") == tail[-len(requested.split("/")):] and not _marker(folder)


def _size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _found(folder: Path, source: str, settings: WorkerSettings, revision: str | None,
           started: float) -> ResolvedModel:
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder} has no config.json, so it is not a complete model folder; re-run prefetch "
            "or copy the whole model there"
        )
    marker = _marker(folder)
    recorded = marker.get("revision")
    if revision and recorded and not str(recorded).startswith(revision) and revision != marker.get("ref"):
        raise ModelError(
            f"model_revision {revision!r} was asked for, but {folder} holds commit {recorded}; "
            "prefetch that revision or drop model_revision"
        )
    model_id = _canonical_id(folder, settings)
    signature = read_signature(folder)
    trust = _check_remote_code(folder, model_id, settings)
    resolved = ResolvedModel(
        id=model_id,
        revision=str(recorded) if recorded else revision,
        source=source,
        path=folder,
        signature=signature,
        seconds=time.monotonic() - started,
        bytes=_size_of(folder),
        trust_remote_code=trust,
    )
    logger.info("resolved %s@%s from %s (%s) in %.2fs", resolved.id, resolved.revision or "local",
                source, folder, resolved.seconds)
    return resolved


def _check_remote_code(folder: Path, model_id: str, settings: WorkerSettings) -> bool:
    config = json.loads((folder / "config.json").read_text())
    if not config.get("auto_map"):
        return False
    if model_id in settings.trust_remote_code_models:
        return True
    raise ModelError(
        f"{model_id} needs trust_remote_code (its config.json has auto_map), which runs code from "
        "the model repo; add it to TRUST_REMOTE_CODE_MODELS on the endpoint if you trust it"
    )


def resolve_model(base_model: str | None, revision: str | None, settings: WorkerSettings) -> ResolvedModel:
    started = time.monotonic()
    requested = requested_model(base_model, settings)

    if requested.startswith("/"):
        folder = check_inside(requested, settings.allowed_roots, "base_model path")
        source = "model_path" if settings.model_path and folder == settings.model_path.resolve() else "volume"
        if not folder.is_dir():
            raise ModelError(f"base_model path {requested} does not exist on this worker's volume")
        return _found(folder, source, settings, revision, started)

    candidate = settings.models_root / requested
    check_inside(str(candidate), (settings.models_root,), "base_model")
    if (candidate / "config.json").is_file():
        return _found(candidate.resolve(), "volume", settings, revision, started)

    model_path = settings.model_path
    if model_path is not None and model_path.is_dir():
        if _holds(model_path, requested, settings):
            return _found(model_path, "model_path", settings, revision, started)
        logger.info("MODEL_PATH %s holds %s, not the requested %s: not using it",
                    model_path, _canonical_id(model_path, settings), requested)

    looked = [str(candidate)]
    if model_path is not None:
        looked.append(f"MODEL_PATH {model_path} (holds {_canonical_id(model_path, settings)!r}, "
                      "a different model, so it was not used)")
    raise ModelError(
        f"base model {requested!r} was not found; looked in: {'; '.join(looked)}. "
        "Prefetch it onto the volume (python cli.py prefetch, or action 'prefetch') or fix the name"
    )
