"""The Hugging Face Hub: calls with its errors mapped, the download of what loading needs, and a lock per repo."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from config.settings import WorkerSettings
from errors import ModelError
from files import write_json_atomic, write_text_atomic
from hub_errors import HubTarget, hub_error
from models.cache import COMPLETE_DIR, SHA, cached_snapshot, repo_folder
from models.folder import NEEDED_FILES, check_model_folder, read_config

logger = logging.getLogger(__name__)


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


def hub_api(settings: WorkerSettings):
    from huggingface_hub import HfApi

    token = settings.hf_token.get_secret_value() if settings.hf_token else False
    return HfApi(endpoint=settings.hf_endpoint, token=token)


def hub_call(fn, repo_id: str, revision: str | None, settings: WorkerSettings):
    import httpx2
    from huggingface_hub import errors as hf_errors

    try:
        return fn()
    except (hf_errors.HfHubHTTPError, hf_errors.OfflineModeIsEnabled, hf_errors.LocalEntryNotFoundError,
            httpx2.HTTPError, OSError) as exc:
        raise hub_error(exc, HubTarget("model", repo_id, revision, has_token=settings.hf_token is not None)) from exc


def probe_hub(repo_id: str, revision: str | None, settings: WorkerSettings) -> str:
    """One cheap call: the repo exists, is readable with our token, and has this revision. → commit sha."""
    api = hub_api(settings)
    info = hub_call(lambda: api.repo_info(repo_id, revision=revision or "main"), repo_id, revision, settings)
    return str(info.sha)


def select_weight_files(tree: dict[str, int], index: dict | None, *, trust_remote_code: bool,
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

    repo_dir = repo_folder(settings, repo_id)
    if repo_dir is None:
        raise ModelError(f"{repo_id} is not a valid Hugging Face repo id ('org/name', without '--'); fix the id")
    lock_path = settings.hf_cache_root / "hub" / ".locks" / "worker" / f"{repo_dir.name}.lock"
    with RepoLock(lock_path, repo_id, settings.download_lock_timeout_s):
        cached = cached_snapshot(repo_id, revision, settings)
        if cached is not None:  # another worker finished it while we waited
            return cached[0], cached[1], 0
        started = time.monotonic()
        api = hub_api(settings)
        sha = probe_hub(repo_id, revision, settings)
        snapshot = repo_dir / "snapshots" / sha
        present = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()} \
            if snapshot.is_dir() else set()  # an earlier, interrupted download of this commit
        common = dict(repo_id=repo_id, revision=sha, cache_dir=str(settings.hf_cache_root / "hub"),
                      endpoint=settings.hf_endpoint, token=api.token)
        config_path = hub_call(lambda: hf_hub_download(filename="config.json", **common),
                                repo_id, revision, settings)
        trust = check_remote_code(read_config(Path(config_path).parent), repo_id, settings)
        tree = {f.path: f.size for f in hub_call(
            lambda: list(api.list_repo_tree(repo_id, revision=sha, recursive=True)), repo_id, revision, settings)
            if getattr(f, "size", None) is not None}
        index = None
        if "model.safetensors.index.json" in tree:
            index_path = hub_call(lambda: hf_hub_download(filename="model.safetensors.index.json", **common),
                                   repo_id, revision, settings)
            index = json.loads(Path(index_path).read_text())
        files = select_weight_files(tree, index, trust_remote_code=trust, allow_pickle=settings.allow_pickle_weights,
                              repo_id=repo_id)
        needed = sum(tree[f] for f in files if f not in present)
        check_free_disk(settings.hf_cache_root, needed, settings.download_free_disk_margin_bytes, repo_id)
        logger.info("downloading %s@%s: %d files, %.2f GB into %s", repo_id, sha[:12], len(files),
                    needed / 1e9, settings.hf_cache_root / "hub")
        path = Path(hub_call(lambda: snapshot_download(allow_patterns=files, max_workers=8, **common),
                              repo_id, revision, settings))
        problems = check_model_folder(path, allow_pickle=settings.allow_pickle_weights)
        if problems:
            raise ModelError(f"the download of {repo_id}@{sha[:12]} is incomplete ({'; '.join(problems[:3])}); "
                             "re-run to resume it", retryable=True)
        if not revision or not SHA.match(revision):
            # snapshot_download was given the commit: record the branch/tag → commit ref ourselves, as the
            # cache does, so an offline lookup of the same name finds it next time. Other workers read
            # refs without our lock: write them whole.
            ref = repo_dir / "refs" / (revision or "main")
            ref.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(ref, sha)
        seconds = time.monotonic() - started
        (repo_dir / COMPLETE_DIR).mkdir(parents=True, exist_ok=True)
        write_json_atomic(repo_dir / COMPLETE_DIR / f"{sha}.json", {  # the completion marker, last
            "repo_id": repo_id, "revision": sha, "requested": revision or "main",
            "files": {f: tree[f] for f in files}, "bytes": sum(tree[f] for f in files),
            "downloaded_bytes": needed, "seconds": round(seconds, 3),
        })
        logger.info("downloaded %s@%s: %.2f GB in %.1fs", repo_id, sha[:12], needed / 1e9, seconds)
        return path, sha, needed


def check_free_disk(root: Path, needed: int, margin: int, repo_id: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if needed + margin > free:
        raise ModelError(
            f"{repo_id} needs {needed / 1e9:.1f} GB but {root} has {free / 1e9:.1f} GB free "
            f"(keeping {margin / 1e9:.1f} GB spare); enlarge the network volume or free space",
        )


def check_remote_code(config: dict[str, Any], model_id: str, settings: WorkerSettings) -> bool:
    if not config.get("auto_map"):
        return False
    if model_id in settings.trust_remote_code_models:
        return True
    raise ModelError(
        f"{model_id} needs trust_remote_code (its config.json has auto_map), which runs code from "
        "the model repo; add it to TRUST_REMOTE_CODE_MODELS on the endpoint if you trust it"
    )
