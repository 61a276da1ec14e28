"""base_model → ResolvedModel: which folder to load, where it came from, and what it is.

Resolution order, first match wins (the output's ``base_model.source`` says which):

1. ``volume`` — an absolute path inside an allowed root, or a folder under MODELS_DIR
   (``<name>`` or ``<org>/<name>``, the layouts ``snapshot_download(local_dir=…)`` creates);
2. ``model_path`` — MODEL_PATH, only when the job names the model it holds or names none;
3. ``hf_cache`` — the Hugging Face cache on the volume (``$HF_HOME/hub/models--org--name/snapshots/<sha>``,
   also RunPod's cached-model layout), looked up offline: no network call;
4. ``download`` — ``snapshot_download`` into that cache, so the next job is a cache hit.

A model is never swapped: if MODEL_PATH holds model A and the job asks for B, A is not used and the
error names both. A partial model is never loaded: every source must pass ``check_model_folder``
(config present, every weight shard present and as long as its safetensors header says). Downloads
are guarded by a cross-process lock (to save duplicate work only); correctness comes from the
cache's own atomic renames and a completion marker written last.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.settings import WorkerSettings
from errors import InputError, ModelError
from files import check_inside, is_within
from models.cache import (
    SHA,
    SHORT_SHA,
    cache_folder_name,
    cache_identity,
    cached_snapshot,
)
from models.folder import NEEDED_FILES, check_model_folder, folder_bytes, read_config
from models.hub import check_remote_code, download_model, hub_api, hub_call, probe_hub
from models.signature import ModelSignature, read_marker, read_signature

logger = logging.getLogger(__name__)

class ModelNotCached(ModelError):
    """Nothing on the volume or in the cache, and downloading was not allowed here."""

    def __init__(self, requested: str, looked: list[str]):
        super().__init__(f"base model {requested!r} is not on this worker (looked in: {'; '.join(looked)})")
        self.requested = requested
        self.looked = looked

    def but(self, problem: ModelError) -> ModelError:
        """This miss, followed by why the Hub cannot supply the model either."""
        return ModelError(f"{self.message}, and {problem.message}", retryable=problem.retryable)


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


# --------------------------------------------------------------------------------------------------
# paths and folders


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


def _canonical_id(folder: Path, settings: WorkerSettings) -> str:
    """The repo id a local folder holds (see ``_identity``)."""
    return _identity(folder, settings)[0]


def _identity(folder: Path, settings: WorkerSettings) -> tuple[str, str]:
    """(the repo id a local folder holds, the name its remote code may be trusted under).

    The id comes from where the folder is before what it says about itself: a snapshot in the Hugging
    Face cache is the repo its path names, whatever files it holds. A ``.worker-model.json`` marker
    names the model of a folder the operator put under the models root or at MODEL_PATH (places no job
    can write: ``_refuse_worker_owned``), but never decides trust: remote code runs only for the
    repo id of a cache snapshot, the folder's path under the models root, or its absolute path —
    names that come from the folder's place, which the folder cannot forge.
    """
    cached_id, _ = cache_identity(folder)
    if cached_id is not None:
        return cached_id, cached_id
    root = settings.models_root.resolve()
    located = folder.relative_to(root).as_posix() if is_within(folder, root) and folder != root else str(folder)
    marker = read_marker(folder)
    if marker.get("repo_id"):
        return str(marker["repo_id"]), located
    return (located if located != str(folder) else folder.name), located


def _holds(folder: Path, requested: str, settings: WorkerSettings) -> bool:
    """Whether ``folder`` (MODEL_PATH) is the model ``requested`` names."""
    if requested.startswith("/"):
        return Path(os.path.normpath(requested)) == folder
    if requested == _canonical_id(folder, settings):
        return True
    # snapshot_download(local_dir=".../org/name") or ".../name": the folder's own path says it.
    tail = folder.as_posix().split("/")
    wanted = requested.split("/")
    return wanted == tail[-len(wanted):] and not read_marker(folder)


# --------------------------------------------------------------------------------------------------
# resolution


def _found(folder: Path, source: str, settings: WorkerSettings, revision: str | None, started: float, *,
           model_id: str | None = None, recorded: str | None = None, downloaded: int = 0) -> ResolvedModel:
    problems = check_model_folder(folder, allow_pickle=settings.allow_pickle_weights)
    if problems:
        raise ModelError(f"{folder} is not a complete model folder: {'; '.join(problems[:3])}; re-run prefetch "
                         "or copy the whole model there")
    if recorded is None:  # a folder on the volume: its cache path or its marker says which commit it holds
        recorded = cache_identity(folder)[1] or read_marker(folder).get("revision")
        pinned = bool(revision and (SHA.match(revision) or SHORT_SHA.match(revision)))
        if pinned and recorded and not str(recorded).startswith(revision):
            raise ModelError(
                f"model_revision {revision!r} was asked for, but {folder} holds commit {recorded}; "
                "prefetch that revision or drop model_revision"
            )
    shown_id, trust_id = _identity(folder, settings)
    model_id = model_id or shown_id
    signature = read_signature(folder)
    trust = check_remote_code(read_config(folder),
                              model_id if source in ("hf_cache", "download") else trust_id, settings)
    resolved = ResolvedModel(
        id=model_id,
        revision=str(recorded) if recorded else revision,
        source=source,
        path=folder,
        signature=signature,
        seconds=time.monotonic() - started,
        bytes=folder_bytes(folder),
        downloaded_bytes=downloaded,
        trust_remote_code=trust,
    )
    logger.info("resolved %s@%s from %s (%s) in %.2fs", resolved.id, resolved.revision or "local",
                source, folder, resolved.seconds)
    return resolved


def _refuse_worker_owned(folder: Path, requested: str, settings: WorkerSettings, what: str) -> None:
    """A base model never comes from a folder the worker writes for jobs: what a job fetched or trained
    there (an init adapter's files, an adapter, a checkpoint) would become another job's model."""
    for name, root in settings.worker_owned_roots.items():
        if is_within(folder, root.resolve()):
            raise InputError(f"{what} {requested!r} is inside the worker's own {name} folder ({root}), which "
                             "holds what jobs bring and make; put models under the models root "
                             f"({settings.models_root}), in the Hugging Face cache or at MODEL_PATH")


def _refuse_foreign_cache_folder(folder: Path, requested: str, settings: WorkerSettings) -> None:
    """Inside the Hugging Face cache only a model snapshot (``models--org--name/snapshots/<sha>``) is a
    model: dataset repos and adapters fetched for jobs land in the same cache."""
    cache = settings.hf_cache_root.resolve()
    others = [r.resolve() for r in (settings.models_root, settings.model_path) if r is not None]
    if not is_within(folder, cache) or any(is_within(folder, r) for r in others if not is_within(r, cache)):
        return
    if cache_identity(folder)[0] is None:
        raise InputError(f"base_model path {requested!r} is inside the Hugging Face cache but is not a model "
                         "snapshot (models--org--name/snapshots/<commit>); name the repo id instead")


def _unverifiable(folder: Path, revision: str | None) -> bool:
    """A commit pin cannot be checked against a folder that records no commit: don't use it."""
    return bool(revision and (SHA.match(revision) or SHORT_SHA.match(revision))
                and not read_marker(folder).get("revision"))


def resolve_model(base_model: str | None, revision: str | None, settings: WorkerSettings, *,
                  download: bool = True) -> ResolvedModel:
    started = time.monotonic()
    requested = requested_model(base_model, settings)

    if requested.startswith("/"):
        folder = check_inside(requested, settings.model_roots, "base_model path")
        _refuse_worker_owned(folder, requested, settings, "base_model path")
        _refuse_foreign_cache_folder(folder, requested, settings)
        source = "model_path" if settings.model_path and folder == settings.model_path.resolve() else "volume"
        if not folder.is_dir():
            raise ModelError(f"base_model path {requested} does not exist on this worker's volume")
        return _found(folder, source, settings, revision, started)

    looked = []
    candidate = settings.models_root / requested
    _refuse_worker_owned(check_inside(str(candidate), (settings.models_root,), "base_model"), requested,
                         settings, "base_model")
    if (candidate / "config.json").is_file() and not _unverifiable(candidate, revision):
        return _found(candidate.resolve(), "volume", settings, revision, started)
    looked.append(str(candidate))

    model_path = settings.model_path
    if model_path is not None and model_path.is_dir():
        _refuse_worker_owned(model_path.resolve(), str(model_path), settings, "MODEL_PATH")
        if _holds(model_path, requested, settings) and not _unverifiable(model_path, revision):
            return _found(model_path, "model_path", settings, revision, started)
        logger.info("MODEL_PATH %s holds %s, not the requested %s: not using it",
                    model_path, _canonical_id(model_path, settings), requested)
        looked.append(f"MODEL_PATH {model_path} (holds {_canonical_id(model_path, settings)!r}, "
                      "a different model, so it was not used)")

    cached = cached_snapshot(requested, revision, settings)
    if cached is not None:
        return _found(cached[0], "hf_cache", settings, revision, started, model_id=requested, recorded=cached[1])
    looked.append(f"the Hugging Face cache {settings.hf_cache_root / 'hub'}")

    miss = ModelNotCached(requested, looked)
    if "/" not in requested:
        # A bare name is far more often a mistyped folder than a legacy Hub id.
        raise miss.but(ModelError("it is not a Hugging Face repo id ('org/name'); fix the name or put the "
                                  "model on the volume under that folder"))
    if cache_folder_name(requested) is None:
        raise miss.but(ModelError("it is not a valid Hugging Face repo id (the Hub allows no '--' in one); "
                                  "fix the name or put the model on the volume under that folder"))
    if not download:
        raise miss
    try:
        path, sha, downloaded = download_model(requested, revision, settings)
    except ModelError as exc:
        raise miss.but(exc) from exc
    # Another worker may have finished the download while this one waited for the lock.
    return _found(path, "download" if downloaded else "hf_cache", settings, revision, started,
                  model_id=requested, recorded=sha, downloaded=downloaded)


def probe_missing(miss: ModelNotCached, revision: str | None, settings: WorkerSettings) -> str:
    """For a model not on this worker: check in one call that the Hub can supply it; → commit sha."""
    try:
        return probe_hub(miss.requested, revision, settings)
    except ModelError as exc:
        raise miss.but(exc) from exc


def fetch_metadata(miss: ModelNotCached, revision: str | None, settings: WorkerSettings) -> ResolvedModel:
    """Config, tokenizer and chat template only (kilobytes): what ``validate`` needs, no weights."""
    from huggingface_hub import snapshot_download

    started = time.monotonic()
    repo_id = miss.requested
    try:
        sha = probe_hub(repo_id, revision, settings)
        api = hub_api(settings)
        tree = [f.path for f in hub_call(lambda: list(api.list_repo_tree(repo_id, revision=sha, recursive=True)),
                                          repo_id, revision, settings)]
        wanted = [p for p in tree if NEEDED_FILES.match(p)]
        path = Path(hub_call(lambda: snapshot_download(
            repo_id, revision=sha, cache_dir=str(settings.hf_cache_root / "hub"), endpoint=settings.hf_endpoint,
            token=api.token, allow_patterns=wanted), repo_id, revision, settings))
    except ModelError as exc:
        raise miss.but(exc) from exc
    if not (path / "config.json").is_file():
        raise miss.but(ModelError(f"{repo_id} has no config.json; it is not a transformers model repo"))
    trust = check_remote_code(read_config(path), repo_id, settings)
    return ResolvedModel(id=repo_id, revision=sha, source="hub_metadata", path=path,
                         signature=read_signature(path), seconds=time.monotonic() - started,
                         bytes=folder_bytes(path), downloaded_bytes=folder_bytes(path), trust_remote_code=trust)
