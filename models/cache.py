"""The Hugging Face cache: where a repo's snapshots live, and which of them are complete."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from config.settings import WorkerSettings
from models.folder import check_model_folder

logger = logging.getLogger(__name__)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at huggingface_hub's import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def locate_base(ref: str, revision: str | None = None) -> Path:
    """A base model folder: ``ref`` itself, or the repo id's snapshot in the local Hugging Face cache.

    Offline by construction (``local_files_only``): checking or applying an adapter never downloads
    a base model.
    """
    from errors import ModelError

    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1:
        raise ModelError(f"base {ref} is not a folder; name a model folder (with config.json) or a "
                         "Hugging Face repo id that is in your local cache")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = hf_cache_dir()
    try:
        return Path(snapshot_download(ref, revision=revision, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError, OSError) as exc:
        raise ModelError(
            f"base {ref}{'@' + revision if revision else ''} is neither a folder nor in the Hugging Face "
            f"cache at {cache} ({type(exc).__name__}); download it first (`hf download {ref}`) or "
            "name its folder"
        ) from None


COMPLETE_DIR = "worker-complete"  # in a cache repo folder: <sha>.json, written after a verified download


def repo_folder(settings: WorkerSettings, repo_id: str) -> Path:
    return settings.hf_cache_root / "hub" / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, revision: str | None, settings: WorkerSettings) -> tuple[Path, str] | None:
    """A complete cached snapshot of ``repo_id`` at ``revision``, found without any network call."""
    repo_dir = repo_folder(settings, repo_id)
    if not repo_dir.is_dir():
        return None
    rev = revision or "main"
    sha: str | None = None
    if SHA.match(rev):
        sha = rev
    elif SHORT_SHA.match(rev):
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
    problems = verify_against_marker(snapshot, marker) if marker.is_file() else check_model_folder(
        snapshot, allow_pickle=settings.allow_pickle_weights)
    if problems:
        logger.info("cached %s@%s is incomplete (%s): not using it", repo_id, sha[:12], "; ".join(problems[:3]))
        return None
    return snapshot, sha


def verify_against_marker(snapshot: Path, marker: Path) -> list[str]:
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


SHA = re.compile(r"^[0-9a-f]{40}$")


SHORT_SHA = re.compile(r"^[0-9a-f]{7,39}$")
