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

import json
import logging
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters import ModelSignature, read_signature, write_json_atomic
from config.settings import WorkerSettings
from errors import InputError, ModelError

logger = logging.getLogger(__name__)

MARKER_NAME = ".worker-model.json"  # in a volume folder: its canonical id and commit
COMPLETE_DIR = "worker-complete"  # in a cache repo folder: <sha>.json, written after a verified download
_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHORT_SHA = re.compile(r"^[0-9a-f]{7,39}$")

# Root-level files loading needs besides the weights: configs, tokenizers, chat templates.
NEEDED_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json|"
    r"added_tokens\.json|tokenizer\.model|spiece\.model|sentencepiece[^/]*\.model|[^/]*\.tiktoken|"
    r"vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json)|model\.safetensors\.index\.json|"
    r"pytorch_model\.bin\.index\.json)$"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


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
    """The repo id a local folder holds: its marker, its cache folder name, or its place under the models root."""
    marker = _marker(folder)
    if marker.get("repo_id"):
        return str(marker["repo_id"])
    parts = folder.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/", 1)
    root = settings.models_root.resolve()
    if _is_within(folder, root) and folder != root:
        return folder.relative_to(root).as_posix()
    return folder.name


def _holds(folder: Path, requested: str, settings: WorkerSettings) -> bool:
    """Whether ``folder`` (MODEL_PATH) is the model ``requested`` names."""
    if requested.startswith("/"):
        return Path(os.path.normpath(requested)) == folder
    if requested == _canonical_id(folder, settings):
        return True
    # snapshot_download(local_dir=".../org/name") or ".../name": the folder's own path says it.
    tail = folder.as_posix().split("/")
    wanted = requested.split("/")
    return wanted == tail[-len(wanted):] and not _marker(folder)


def safetensors_extent(path: Path) -> int:
    """The size a .safetensors file must have, from its header alone (8-byte length + JSON)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return -1
        (length,) = struct.unpack("<Q", head)
        if length > 100 * 1024**2:
            return -1
        try:
            header = json.loads(fh.read(length))
        except ValueError:
            return -1
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    return 8 + length + max(ends, default=0)


def check_model_folder(folder: Path, *, allow_pickle: bool = False) -> list[str]:
    """What is missing or broken in a model folder ([] when it is complete enough to load)."""
    problems: list[str] = []
    if not (folder / "config.json").is_file():
        return [f"{folder} has no config.json"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError):
            return [f"{index.name} is not a valid weight index"]
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pth"))
        if pickles and not allow_pickle:
            return [f"{folder} has only pickle weights ({', '.join(pickles[:3])}), which run code when "
                    "loaded; convert them to safetensors or set ALLOW_PICKLE_WEIGHTS=true"]
        if not pickles:
            return [f"{folder} has no weights (model.safetensors or a sharded index)"]
        shards = []
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            problems.append(f"weight shard {shard} is missing")
        elif path.stat().st_size != safetensors_extent(path):
            problems.append(f"weight shard {shard} is truncated or corrupt ({path.stat().st_size} bytes)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return problems


def _size_of(folder: Path) -> int:
    # Cache snapshots are symlinks into blobs/: count what they point at.
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# the Hugging Face cache


def _repo_folder(settings: WorkerSettings, repo_id: str) -> Path:
    return settings.hf_cache_root / "hub" / ("models--" + repo_id.replace("/", "--"))


def _cached_snapshot(repo_id: str, revision: str | None, settings: WorkerSettings) -> tuple[Path, str] | None:
    """A complete cached snapshot of ``repo_id`` at ``revision``, found without any network call."""
    repo_dir = _repo_folder(settings, repo_id)
    if not repo_dir.is_dir():
        return None
    rev = revision or "main"
    sha: str | None = None
    if _SHA.match(rev):
        sha = rev
    elif _SHORT_SHA.match(rev):
        matches = [p.name for p in (repo_dir / "snapshots").glob(f"{rev}*")]
        sha = matches[0] if len(matches) == 1 else None
    if sha is None:
        ref = repo_dir / "refs" / rev
        sha = ref.read_text().strip() if ref.is_file() else None
    if sha is None:
        return None
    snapshot = repo_dir / "snapshots" / sha
    if not snapshot.is_dir():
        return None
    marker = repo_dir / COMPLETE_DIR / f"{sha}.json"
    problems = _verify_against_marker(snapshot, marker) if marker.is_file() else check_model_folder(
        snapshot, allow_pickle=settings.allow_pickle_weights)
    if problems:
        logger.info("cached %s@%s is incomplete (%s): not using it", repo_id, sha[:12], "; ".join(problems[:3]))
        return None
    return snapshot, sha


def _verify_against_marker(snapshot: Path, marker: Path) -> list[str]:
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return [f"completion marker {marker.name} is unreadable"]
    problems = []
    for name, size in files.items():
        path = snapshot / name
        if not path.is_file() or path.stat().st_size != size:
            problems.append(f"{name} is missing or has the wrong size")
    return problems


class RepoLock:
    """A cross-process lock per repo in the cache: one worker downloads, the others wait for it.

    Only saves duplicate work; correctness never depends on it (network filesystems can grant
    flock to everyone). Waiting is bounded and logged.
    """

    def __init__(self, path: Path, what: str, timeout_s: float, log_every_s: float = 30.0):
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(path))
        self.path, self.what, self.timeout_s, self.log_every_s = path, what, timeout_s, log_every_s

    def __enter__(self) -> RepoLock:
        from filelock import Timeout

        started = time.monotonic()
        while True:
            remaining = self.timeout_s - (time.monotonic() - started)
            if remaining <= 0:
                raise ModelError(
                    f"waited {self.timeout_s:.0f}s for another worker to finish downloading {self.what} "
                    f"(lock {self.path}); re-run the job, which will use its download or resume it",
                    retryable=True,
                )
            try:
                self._lock.acquire(timeout=min(self.log_every_s, remaining))
                return self
            except Timeout:
                logger.info("waiting for another worker downloading %s (lock %s) for %.0fs",
                            self.what, self.path, time.monotonic() - started)

    def __exit__(self, *exc) -> None:
        self._lock.release()


def _hub_api(settings: WorkerSettings):
    from huggingface_hub import HfApi

    token = settings.hf_token.get_secret_value() if settings.hf_token else False
    return HfApi(endpoint=settings.hf_endpoint, token=token)


def _hub_error(exc: BaseException, repo_id: str, revision: str | None, settings: WorkerSettings) -> ModelError:
    """The Hub's exceptions, in words a user can act on."""
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, hf_errors.GatedRepoError):
        hint = "HF_TOKEN is not set" if settings.hf_token is None else "the account of HF_TOKEN has no access"
        return ModelError(f"{repo_id} is a gated model and {hint}: accept its license on huggingface.co and "
                          "set HF_TOKEN on the endpoint to a token of that account")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return ModelError(f"{repo_id} was not found on the Hugging Face Hub (a private repo also needs HF_TOKEN); "
                          "check the id, or put the model on the volume under MODELS_DIR")
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return ModelError(f"revision {revision!r} of {repo_id} does not exist on the Hub; use a branch, tag or "
                          "commit of that repo")
    if isinstance(exc, hf_errors.OfflineModeIsEnabled) or (
            isinstance(exc, hf_errors.LocalEntryNotFoundError) and "HF_HUB_OFFLINE" in str(exc)):
        return ModelError(f"HF_HUB_OFFLINE is set, so {repo_id} cannot be downloaded; prefetch it onto the "
                          "volume or unset HF_HUB_OFFLINE")
    return ModelError(
        f"downloading {repo_id} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); "
        "what was downloaded is kept in the cache and a re-run resumes it",
        retryable=True,
    )


def _hub_call(fn, repo_id: str, revision: str | None, settings: WorkerSettings):
    import httpx2
    from huggingface_hub import errors as hf_errors

    try:
        return fn()
    except (hf_errors.HfHubHTTPError, hf_errors.OfflineModeIsEnabled, hf_errors.LocalEntryNotFoundError,
            httpx2.HTTPError, OSError) as exc:
        raise _hub_error(exc, repo_id, revision, settings) from exc


def probe_hub(repo_id: str, revision: str | None, settings: WorkerSettings) -> str:
    """One cheap call: the repo exists, is readable with our token, and has this revision. → commit sha."""
    api = _hub_api(settings)
    info = _hub_call(lambda: api.repo_info(repo_id, revision=revision or "main"), repo_id, revision, settings)
    return str(info.sha)


def _select_files(tree: dict[str, int], index: dict | None, *, trust_remote_code: bool,
                  allow_pickle: bool, repo_id: str) -> list[str]:
    """The files loading needs: root configs and tokenizers, and exactly one set of weights."""
    chosen = [p for p in tree if NEEDED_FILES.match(p)]
    if trust_remote_code:
        chosen += [p for p in tree if "/" not in p and p.endswith(".py")]
    if index is not None:
        chosen += sorted(set(index.get("weight_map", {}).values()))
    elif "model.safetensors" in tree:
        chosen.append("model.safetensors")
    else:
        pickles = [p for p in tree if "/" not in p and p.endswith((".bin", ".pth")) and "training_args" not in p]
        if not pickles:
            raise ModelError(f"{repo_id} has no safetensors weights at its root (model.safetensors or "
                             "model.safetensors.index.json); it is not a transformers causal LM repo")
        if not allow_pickle:
            raise ModelError(f"{repo_id} has only pickle weights ({', '.join(pickles[:3])}), which run code "
                             "when loaded; use a safetensors revision or set ALLOW_PICKLE_WEIGHTS=true")
        chosen += pickles
    missing = [p for p in chosen if p not in tree]
    if missing:
        raise ModelError(f"{repo_id}'s weight index names files the repo does not have: {missing[:3]}")
    return sorted(set(chosen))


def download_model(repo_id: str, revision: str | None, settings: WorkerSettings) -> tuple[Path, str, int]:
    """Download into the volume's cache (one worker at a time); → (snapshot, sha, bytes downloaded)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_dir = _repo_folder(settings, repo_id)
    lock_path = settings.hf_cache_root / "hub" / ".locks" / "worker" / f"{repo_dir.name}.lock"
    with RepoLock(lock_path, repo_id, settings.download_lock_timeout_s):
        cached = _cached_snapshot(repo_id, revision, settings)
        if cached is not None:  # another worker finished it while we waited
            return cached[0], cached[1], 0
        started = time.monotonic()
        api = _hub_api(settings)
        sha = probe_hub(repo_id, revision, settings)
        snapshot = repo_dir / "snapshots" / sha
        present = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()} \
            if snapshot.is_dir() else set()  # an earlier, interrupted download of this commit
        common = dict(repo_id=repo_id, revision=sha, cache_dir=str(settings.hf_cache_root / "hub"),
                      endpoint=settings.hf_endpoint, token=api.token)
        config_path = _hub_call(lambda: hf_hub_download(filename="config.json", **common),
                                repo_id, revision, settings)
        trust = _check_remote_code(json.loads(Path(config_path).read_text()), repo_id, settings)
        tree = {f.path: f.size for f in _hub_call(
            lambda: list(api.list_repo_tree(repo_id, revision=sha, recursive=True)), repo_id, revision, settings)
            if getattr(f, "size", None) is not None}
        index = None
        if "model.safetensors.index.json" in tree:
            index_path = _hub_call(lambda: hf_hub_download(filename="model.safetensors.index.json", **common),
                                   repo_id, revision, settings)
            index = json.loads(Path(index_path).read_text())
        files = _select_files(tree, index, trust_remote_code=trust, allow_pickle=settings.allow_pickle_weights,
                              repo_id=repo_id)
        needed = sum(tree[f] for f in files if f not in present)
        _check_free_disk(settings.hf_cache_root, needed, settings.download_free_disk_margin_bytes, repo_id)
        logger.info("downloading %s@%s: %d files, %.2f GB into %s", repo_id, sha[:12], len(files),
                    needed / 1e9, settings.hf_cache_root / "hub")
        path = Path(_hub_call(lambda: snapshot_download(allow_patterns=files, max_workers=8, **common),
                              repo_id, revision, settings))
        problems = check_model_folder(path, allow_pickle=settings.allow_pickle_weights)
        if problems:
            raise ModelError(f"the download of {repo_id}@{sha[:12]} is incomplete ({'; '.join(problems[:3])}); "
                             "re-run to resume it", retryable=True)
        if revision and not _SHA.match(revision):
            # snapshot_download was given the commit: record the branch/tag → commit ref ourselves, as the
            # cache does, so an offline lookup of the same name finds it next time.
            ref = repo_dir / "refs" / revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(sha)
        elif not revision:
            (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
            (repo_dir / "refs" / "main").write_text(sha)
        seconds = time.monotonic() - started
        (repo_dir / COMPLETE_DIR).mkdir(parents=True, exist_ok=True)
        write_json_atomic(repo_dir / COMPLETE_DIR / f"{sha}.json", {  # the completion marker, last
            "repo_id": repo_id, "revision": sha, "requested": revision or "main",
            "files": {f: tree[f] for f in files}, "bytes": sum(tree[f] for f in files),
            "downloaded_bytes": needed, "seconds": round(seconds, 3),
        })
        logger.info("downloaded %s@%s: %.2f GB in %.1fs", repo_id, sha[:12], needed / 1e9, seconds)
        return path, sha, needed


def _check_free_disk(root: Path, needed: int, margin: int, repo_id: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if needed + margin > free:
        raise ModelError(
            f"{repo_id} needs {needed / 1e9:.1f} GB but {root} has {free / 1e9:.1f} GB free "
            f"(keeping {margin / 1e9:.1f} GB spare); enlarge the network volume or free space",
        )


# --------------------------------------------------------------------------------------------------
# resolution


def _check_remote_code(config: dict[str, Any], model_id: str, settings: WorkerSettings) -> bool:
    if not config.get("auto_map"):
        return False
    if model_id in settings.trust_remote_code_models:
        return True
    raise ModelError(
        f"{model_id} needs trust_remote_code (its config.json has auto_map), which runs code from "
        "the model repo; add it to TRUST_REMOTE_CODE_MODELS on the endpoint if you trust it"
    )


def _found(folder: Path, source: str, settings: WorkerSettings, revision: str | None, started: float, *,
           model_id: str | None = None, recorded: str | None = None, downloaded: int = 0) -> ResolvedModel:
    problems = check_model_folder(folder, allow_pickle=settings.allow_pickle_weights)
    if problems:
        raise ModelError(f"{folder} is not a complete model folder: {'; '.join(problems[:3])}; re-run prefetch "
                         "or copy the whole model there")
    if recorded is None:  # a folder on the volume: its marker (if any) says which commit it holds
        recorded = _marker(folder).get("revision")
        pinned = bool(revision and (_SHA.match(revision) or _SHORT_SHA.match(revision)))
        if pinned and recorded and not str(recorded).startswith(revision):
            raise ModelError(
                f"model_revision {revision!r} was asked for, but {folder} holds commit {recorded}; "
                "prefetch that revision or drop model_revision"
            )
    model_id = model_id or _canonical_id(folder, settings)
    signature = read_signature(folder)
    trust = _check_remote_code(json.loads((folder / "config.json").read_text()), model_id, settings)
    resolved = ResolvedModel(
        id=model_id,
        revision=str(recorded) if recorded else revision,
        source=source,
        path=folder,
        signature=signature,
        seconds=time.monotonic() - started,
        bytes=_size_of(folder),
        downloaded_bytes=downloaded,
        trust_remote_code=trust,
    )
    logger.info("resolved %s@%s from %s (%s) in %.2fs", resolved.id, resolved.revision or "local",
                source, folder, resolved.seconds)
    return resolved


def _unverifiable(folder: Path, revision: str | None) -> bool:
    """A commit pin cannot be checked against a folder that records no commit: don't use it."""
    return bool(revision and (_SHA.match(revision) or _SHORT_SHA.match(revision))
                and not _marker(folder).get("revision"))


def resolve_model(base_model: str | None, revision: str | None, settings: WorkerSettings, *,
                  download: bool = True) -> ResolvedModel:
    started = time.monotonic()
    requested = requested_model(base_model, settings)

    if requested.startswith("/"):
        folder = check_inside(requested, settings.allowed_roots, "base_model path")
        source = "model_path" if settings.model_path and folder == settings.model_path.resolve() else "volume"
        if not folder.is_dir():
            raise ModelError(f"base_model path {requested} does not exist on this worker's volume")
        return _found(folder, source, settings, revision, started)

    looked = []
    candidate = settings.models_root / requested
    check_inside(str(candidate), (settings.models_root,), "base_model")
    if (candidate / "config.json").is_file() and not _unverifiable(candidate, revision):
        return _found(candidate.resolve(), "volume", settings, revision, started)
    looked.append(str(candidate))

    model_path = settings.model_path
    if model_path is not None and model_path.is_dir():
        if _holds(model_path, requested, settings) and not _unverifiable(model_path, revision):
            return _found(model_path, "model_path", settings, revision, started)
        logger.info("MODEL_PATH %s holds %s, not the requested %s: not using it",
                    model_path, _canonical_id(model_path, settings), requested)
        looked.append(f"MODEL_PATH {model_path} (holds {_canonical_id(model_path, settings)!r}, "
                      "a different model, so it was not used)")

    cached = _cached_snapshot(requested, revision, settings)
    if cached is not None:
        return _found(cached[0], "hf_cache", settings, revision, started, model_id=requested, recorded=cached[1])
    looked.append(f"the Hugging Face cache {settings.hf_cache_root / 'hub'}")

    miss = ModelNotCached(requested, looked)
    if "/" not in requested:
        # A bare name is far more often a mistyped folder than a legacy Hub id.
        raise miss.but(ModelError("it is not a Hugging Face repo id ('org/name'); fix the name or put the "
                                  "model on the volume under that folder"))
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
        api = _hub_api(settings)
        tree = [f.path for f in _hub_call(lambda: list(api.list_repo_tree(repo_id, revision=sha, recursive=True)),
                                          repo_id, revision, settings)]
        wanted = [p for p in tree if NEEDED_FILES.match(p)]
        path = Path(_hub_call(lambda: snapshot_download(
            repo_id, revision=sha, cache_dir=str(settings.hf_cache_root / "hub"), endpoint=settings.hf_endpoint,
            token=api.token, allow_patterns=wanted), repo_id, revision, settings))
    except ModelError as exc:
        raise miss.but(exc) from exc
    if not (path / "config.json").is_file():
        raise miss.but(ModelError(f"{repo_id} has no config.json; it is not a transformers model repo"))
    trust = _check_remote_code(json.loads((path / "config.json").read_text()), repo_id, settings)
    return ResolvedModel(id=repo_id, revision=sha, source="hub_metadata", path=path,
                         signature=read_signature(path), seconds=time.monotonic() - started,
                         bytes=_size_of(path), downloaded_bytes=_size_of(path), trust_remote_code=trust)
