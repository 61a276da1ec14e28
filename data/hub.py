"""hf://org/name → the data files of one subset and split, from the Hugging Face cache on the volume.

Offline first, like base models: the cache at ``$HF_HOME/hub`` (``settings.hf_cache_root / "hub"``)
is tried with ``local_files_only``; only what is missing is downloaded with ``snapshot_download``
(HF_TOKEN for gated or private datasets, HF_ENDPOINT for another Hub). Only the files of the asked
split are fetched, and their sizes (from the repo's file listing) are checked against
MAX_DATASET_BYTES before any is downloaded.

Which files make a subset and split follows the Hub's conventions:
- the dataset card's ``configs:`` (``config_name``, ``data_files`` per split, ``default: true``);
- else file and folder names: ``train``/``training``, ``validation``/``valid``/``dev``/``val``,
  ``test``/``testing``/``eval``/``evaluation`` as a word in a path (``data/train-00000-of-00002.parquet``,
  ``test.jsonl``, ``train/part-1.csv``); a subset without card configs is a top-level folder;
- else every data file is the ``train`` split.
``hf://org/name/path/in/repo.jsonl`` names one file (or folder) directly.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import re
import time
from pathlib import Path

from config.settings import WorkerSettings
from data.fetched import Fetched, over_cap
from data.formats import is_data_file
from errors import DatasetError
from files import sha256_files
from hub_errors import HubTarget, hub_error

logger = logging.getLogger(__name__)

SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def parse_hf_uri(uri: str) -> tuple[str, str | None, str | None]:
    """hf://[datasets/]org/name[@revision][/path] → (repo_id, revision, path in repo)."""
    rest = uri.split("://", 1)[1].strip("/")
    if rest.startswith("datasets/"):
        rest = rest[len("datasets/"):]
    parts = rest.split("/")
    if len(parts) < 2:
        raise DatasetError(f"{uri} must name a dataset repo: hf://org/name (optionally @revision)")
    org, name, path = parts[0], parts[1], "/".join(parts[2:]) or None
    revision = None
    if "@" in name:
        name, revision = name.split("@", 1)
    repo_id = f"{org}/{name}"
    if not _REPO.match(repo_id) or ".." in repo_id or (revision is not None and not revision):
        raise DatasetError(f"{uri} is not a valid dataset repo id; use hf://org/name")
    if path is not None and any(p in ("", ".", "..") for p in path.split("/")):
        raise DatasetError(f"{uri}: the path inside the repo may not contain '..' or empty parts")
    return repo_id, revision, path


def _split_of(path: str, split: str) -> bool:
    keywords = SPLIT_KEYWORDS.get(split, (split,))
    for component in path.lower().split("/"):
        for keyword in keywords:
            if re.search(rf"(?:^|[-._ 0-9]){re.escape(keyword.lower())}(?:$|[-._ 0-9])", component):
                return True
    return False


def select_files(files: list[str], card: dict, *, subset: str | None, split: str | None, path: str | None,
                 shown: str, prefer: tuple[str, ...] = ("train",)) -> tuple[list[str], str | None, str]:
    """(data files in order, the subset used, the split used) from the repo's file list and card.

    Without a named split the first of ``prefer`` that exists is used (an eval set prefers
    validation, then test)."""
    data = sorted(f for f in files if is_data_file(f))
    if path is not None:
        chosen = [f for f in data if f == path or f.startswith(path.rstrip("/") + "/")]
        if not chosen:
            raise DatasetError(f"{shown}: no data file at {path!r} in the repo; files there: {_some(data)}")
        return chosen, subset, split or "train"

    configs = [c for c in (card.get("configs") or []) if isinstance(c, dict)]
    if configs:
        names = [str(c.get("config_name", "default")) for c in configs]
        if subset is not None:
            config = next((c for c, n in zip(configs, names) if n == subset), None)
            if config is None:
                raise DatasetError(f"{shown} has no subset {subset!r}; its subsets are: {', '.join(names)}")
        else:
            config = next((c for c in configs if c.get("default")), None)
            config = config or next((c for c, n in zip(configs, names) if n == "default"), None)
            if config is None and len(configs) > 1:
                raise DatasetError(f"{shown} has several subsets ({', '.join(names)}); name one in 'subset'")
            config = config or configs[0]
        subset = str(config.get("config_name", "default"))
        if config.get("data_files") is None and isinstance(config.get("data_dir"), str):
            # A config that only names its folder: splits come from the file names inside it.
            folder = config["data_dir"].strip("/") + "/"
            inside = [f[len(folder):] for f in data if f.startswith(folder)]
            chosen, _, split = select_files(inside, {}, subset=None, split=split, path=None,
                                            shown=f"{shown} subset {subset!r}", prefer=prefer)
            return [folder + f for f in chosen], subset, split
        by_split = _data_files_by_split(config.get("data_files"))
        split = split or _preferred(by_split, prefer, shown)
        if split not in by_split:
            raise DatasetError(f"{shown} subset {subset!r} has no split {split!r}; its splits are: "
                               f"{', '.join(by_split) or 'none'}")
        patterns = by_split[split]
        chosen = [f for f in data if any(fnmatch.fnmatch(f, p) or fnmatch.fnmatch(f, p.rstrip("/") + "/*")
                                         for p in patterns)]
        if not chosen:
            raise DatasetError(f"{shown} subset {subset!r} split {split!r} lists {patterns} but no data file "
                               "matches; the dataset card and files disagree")
        return chosen, subset, split

    if subset is not None:
        data = [f for f in data if f.split("/", 1)[0] == subset]
        if not data:
            raise DatasetError(f"{shown} has no subset {subset!r} (no card configs and no folder of that "
                               f"name); its data files: {_some(sorted(f for f in files if is_data_file(f)))}")
    found = {name: [f for f in data if _split_of(f, name)] for name in SPLIT_KEYWORDS}
    if split is not None and split not in SPLIT_KEYWORDS:
        found[split] = [f for f in data if _split_of(f, split)]
    found = {name: chosen for name, chosen in found.items() if chosen}
    if not found:
        found = {"train": data}  # no split in any name: everything is train
    split = split or _preferred(found, prefer, shown)
    if not found.get(split):
        raise DatasetError(f"{shown} has no split {split!r}; splits found: {', '.join(found) or 'none'}")
    if not found[split]:
        raise DatasetError(f"{shown} holds no data files (.jsonl, .json, .csv, .parquet)")
    return found[split], subset, split


def _preferred(splits: dict[str, list[str]], prefer: tuple[str, ...], shown: str) -> str:
    for name in prefer:
        if name in splits:
            return name
    if prefer == ("train",) and splits:
        return next(iter(splits))
    raise DatasetError(f"{shown} has no {' or '.join(prefer)} split (it has: {', '.join(splits) or 'none'}); "
                       "name the split in the uri's path or use eval_fraction")


def _data_files_by_split(data_files) -> dict[str, list[str]]:
    if data_files is None:
        return {}
    if isinstance(data_files, str):
        return {"train": [data_files]}
    if isinstance(data_files, list) and all(isinstance(p, str) for p in data_files):
        return {"train": list(data_files)}
    out: dict[str, list[str]] = {}
    for item in data_files if isinstance(data_files, list) else []:
        if isinstance(item, dict) and "split" in item:
            paths = item.get("path")
            out[str(item["split"])] = [paths] if isinstance(paths, str) else [str(p) for p in paths or []]
    return out


def _some(files: list[str]) -> str:
    return ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "") if files else "none"


def fetch_hub_dataset(uri: str, settings: WorkerSettings, *, subset: str | None, split: str | None,
                      for_eval: bool = False) -> Fetched:
    started = time.monotonic()
    repo_id, revision, path = parse_hf_uri(uri)
    shown = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    hub = _Hub(repo_id, revision, settings, shown)
    folder, listing, source = hub.listing()
    card = _card(folder / "README.md") if "README.md" in listing else {}
    files, subset, split = select_files(list(listing), card, subset=subset, split=split, path=path, shown=shown,
                                        prefer=("validation", "test") if for_eval else ("train",))
    size = sum(listing[f] or 0 for f in files)
    if size > settings.max_dataset_bytes:
        raise over_cap(f"{shown} ({subset + ' / ' if subset else ''}{split}, {len(files)} files)", size,
                        settings.max_dataset_bytes)
    folder, downloaded = hub.snapshot([glob.escape(f) for f in files])
    paths = [folder / f for f in files]
    missing = [f for f, p in zip(files, paths) if not p.is_file()]
    if missing:
        raise DatasetError(f"{shown}: {len(missing)} data files did not arrive ({', '.join(missing[:3])}); try "
                           "again", retryable=True)
    total = sum(p.stat().st_size for p in paths)
    if total > settings.max_dataset_bytes:
        raise over_cap(shown, total, settings.max_dataset_bytes)
    commit = folder.name
    logger.info("dataset %s@%s %s/%s: %d files, %d bytes, from %s in %.1fs", repo_id, commit[:12],
                subset or "-", split, len(files), total, "download" if downloaded or source == "download"
                else "hf_cache", time.monotonic() - started)
    label = shown + (f" ({subset}, {split})" if subset else f" ({split})")
    return Fetched(paths, [f"{shown}/{f}" for f in files], label, sha256_files(paths), total)


def _card(readme: Path) -> dict:
    if not readme.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(readme) or {}
    except Exception as exc:  # a broken card is worth a warning, not a failed job: names still work
        logger.warning("dataset card %s is not valid YAML (%s); using file names", readme, type(exc).__name__)
        return {}


class _Hub:
    """snapshot_download into the volume's cache: local files first, then the Hub."""

    def __init__(self, repo_id: str, revision: str | None, settings: WorkerSettings, shown: str):
        self.repo_id, self.revision, self.settings, self.shown = repo_id, revision, settings, shown
        self.cache_dir = settings.hf_cache_root / "hub"

    def _download(self, patterns: list[str], local: bool) -> Path:
        from huggingface_hub import snapshot_download

        token = self.settings.hf_token.get_secret_value() if self.settings.hf_token else None
        return Path(snapshot_download(
            self.repo_id, repo_type="dataset", revision=self.revision, cache_dir=str(self.cache_dir),
            allow_patterns=patterns, local_files_only=local, token=token,
            endpoint=self.settings.hf_endpoint or None,
        ))

    def snapshot(self, patterns: list[str]) -> tuple[Path, bool]:
        """(snapshot folder, whether anything was downloaded)."""
        from huggingface_hub import constants
        from huggingface_hub.errors import (
            IncompleteSnapshotError,
            LocalEntryNotFoundError,
        )

        try:
            return self._download(patterns, local=True), False
        except (LocalEntryNotFoundError, IncompleteSnapshotError):
            pass
        if constants.is_offline_mode():
            raise DatasetError(f"{self.shown} is not in the Hugging Face cache on the volume "
                               f"({self.cache_dir}) and HF_HUB_OFFLINE is set; unset it or prefetch the dataset")
        try:
            return self._download(patterns, local=False), True
        except Exception as exc:  # whatever the client raised, in the words of hub_errors
            raise hub_error(exc, HubTarget("dataset", self.repo_id, self.revision,
                                           has_token=self.settings.hf_token is not None, shown=self.shown)) from None

    def listing(self) -> tuple[Path, dict[str, int | None], str]:
        """(snapshot folder with README.md if the repo has one, {path: size} of every file, source)."""
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError

        folder, downloaded = self.snapshot(["README.md"])
        try:
            tree = get_cached_repo_tree(self.repo_id, repo_type="dataset", revision=folder.name,
                                        cache_dir=str(self.cache_dir))
            listing = {f.path: f.size for f in tree}
        except CachedRepoTreeNotFoundError:
            # A snapshot cached without its tree listing (an older client): what is on disk is all we know.
            listing = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
        return folder, listing, "download" if downloaded else "hf_cache"
