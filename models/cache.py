"""The Hugging Face cache: where a repo's snapshots live, and which of them are complete."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from config.settings import WorkerSettings
from errors import ModelError
from models.folder import check_model_folder

logger = logging.getLogger(__name__)

SHA = re.compile(r"^[0-9a-f]{40}$")
SHORT_SHA = re.compile(r"^[0-9a-f]{7,39}$")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache of the user's machine, as huggingface_hub finds it.

    For the CLI only (an entry reads the environment; stages are handed the folder): the worker's
    own cache is ``WorkerSettings.hf_cache_root / "hub"``.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home).expanduser() / "hub"


# --------------------------------------------------------------------------------------------------
# The cache's folder names: models--org--name ↔ org/name. The Hub allows neither "--" nor more than
# one "/" in a repo id, which is what makes the name reversible; an id outside that has no folder.

CACHE_SEPARATOR = "--"


def cache_folder_name(repo_id: str, repo_type: str = "model") -> str | None:
    """``models--org--name`` for ``org/name`` (huggingface_hub's rule); None for an id the Hub refuses."""
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(parts) or any(CACHE_SEPARATOR in part for part in parts):
        return None
    return CACHE_SEPARATOR.join([f"{repo_type}s", *parts])


def repo_id_of_cache_folder(name: str, repo_type: str = "model") -> str | None:
    """``org/name`` for a cache folder ``models--org--name``; None if ``name`` is no such folder."""
    prefix = f"{repo_type}s{CACHE_SEPARATOR}"
    if not name.startswith(prefix):
        return None
    parts = name[len(prefix):].split(CACHE_SEPARATOR)
    if len(parts) > 2 or not all(parts):
        return None
    return "/".join(parts)


def cache_identity(folder: Path) -> tuple[str | None, str | None]:
    """(repo id, commit) of a snapshot folder in the cache (``…/models--org--name/snapshots/<sha>``)."""
    parts = folder.parts
    if len(parts) >= 3 and parts[-2] == "snapshots":
        repo_id = repo_id_of_cache_folder(parts[-3])
        if repo_id is not None:
            return repo_id, parts[-1]
    return None, None


def locate_base(ref: str, revision: str | None, cache_dir: Path) -> Path:
    """A base model folder: ``ref`` itself, or the repo id's snapshot in the Hugging Face cache ``cache_dir``.

    Offline by construction (``local_files_only``): checking or applying an adapter never downloads
    a base model.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1:
        raise ModelError(f"base {ref} is not a folder; name a model folder (with config.json) or a "
                         "Hugging Face repo id that is in your local cache")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref, revision=revision, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError, OSError) as exc:
        raise ModelError(
            f"base {ref}{'@' + revision if revision else ''} is neither a folder nor in the Hugging Face "
            f"cache at {cache_dir} ({type(exc).__name__}); download it first (`hf download {ref}`) or "
            "name its folder"
        ) from None


COMPLETE_DIR = "worker-complete"  # in a cache repo folder: <sha>.json, written after a verified download


def repo_folder(settings: WorkerSettings, repo_id: str) -> Path | None:
    """The worker cache's folder of ``repo_id``; None for an id the Hub refuses (it can have none)."""
    name = cache_folder_name(repo_id)
    return settings.hf_cache_root / "hub" / name if name is not None else None


def cached_snapshot(repo_id: str, revision: str | None, settings: WorkerSettings) -> tuple[Path, str] | None:
    """A complete cached snapshot of ``repo_id`` at ``revision``, found without any network call."""
    repo_dir = repo_folder(settings, repo_id)
    if repo_dir is None or not repo_dir.is_dir():
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

