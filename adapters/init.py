"""init_adapter: an existing adapter to continue training from, fetched and verified before any load."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapters.fetch import check_pair, shown_ref
from adapters.verify import DAMAGED, INCOMPATIBLE
from config.job import Hyperparameters
from config.settings import WorkerSettings
from errors import InputError, ModelError, StorageError
from files import FileEntry, check_inside, describe_files


@dataclass(frozen=True)
class InitAdapter:
    """An adapter a job continues training from, fetched onto the volume and verified."""

    path: Path
    source: str  # scrubbed
    verdict: str
    warnings: tuple[str, ...]
    job_id: str | None  # the job that trained it, from its manifest
    files: tuple[FileEntry, ...]

    def to_manifest(self) -> dict[str, Any]:
        return {"uri": self.source, "verdict": self.verdict, "warnings": list(self.warnings),
                "job_id": self.job_id, "files": [asdict(f) for f in self.files]}


def prepare_init_adapter(ref: str, base_dir: Path, workdir: Path, settings: WorkerSettings,
                         hp: Hyperparameters | None = None) -> InitAdapter:
    """Fetch ``init_adapter`` (s3://, https://, or a path on the volume) and verify it against the
    job's base, from files alone: an adapter that does not fit fails here, before any weight loads.
    URLs go through the guarded client (ALLOW_PRIVATE_URLS, a size cap, a deadline).
    """
    if ref.startswith(("s3://", "https://", "http://")):
        folder_ref = ref
    else:
        raw = ref.removeprefix("file://")
        path = Path(raw) if raw.startswith("/") else settings.volume_root / raw
        folder_ref = str(check_inside(str(path), settings.allowed_roots, "init_adapter"))
    if workdir.exists():
        shutil.rmtree(workdir)  # a remote adapter from an earlier attempt: fetch it fresh
    workdir.mkdir(parents=True)
    source = shown_ref(ref)
    try:
        return _verify(ref, folder_ref, source, base_dir, workdir, settings, hp)
    except BaseException:
        # Whatever was fetched goes with the failure: files a job brought must not outlive it.
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _verify(ref: str, folder_ref: str, source: str, base_dir: Path, workdir: Path, settings: WorkerSettings,
            hp: Hyperparameters | None) -> InitAdapter:
    try:
        verdict, adapter, _ = check_pair(folder_ref, str(base_dir), workdir, settings=settings,
                                         cache_dir=settings.hf_cache_root / "hub")
    except StorageError as exc:
        raise InputError(f"init_adapter could not be fetched: {exc.message}", retryable=exc.retryable) from exc
    except InputError as exc:
        raise InputError(f"init_adapter: {exc.message}") from exc
    if verdict.status == DAMAGED:
        raise InputError(f"init_adapter {source} is damaged: {'; '.join(verdict.mismatches)}; "
                         "upload it again or name another adapter")
    if verdict.status == INCOMPATIBLE:
        raise ModelError(f"init_adapter {source} does not fit the base model: "
                         f"{'; '.join(verdict.mismatches)}. Continue from an adapter trained on this base, "
                         "or drop init_adapter to train a new one")
    if hp is not None:
        for field_name, key in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("use_rslora", "use_rslora")):
            given, saved = getattr(hp, field_name), adapter.config.get(key)
            if field_name in hp.model_fields_set and saved is not None and given != saved:
                raise InputError(f"hyperparameters.{field_name} is {given} but init_adapter {source} has "
                                 f"{key}={saved}; drop {field_name} (continued training keeps the "
                                 "adapter's own) or set it to the adapter's")
    trained = adapter.manifest or {}
    return InitAdapter(adapter.folder, source, verdict.status, tuple(verdict.warnings),
                       trained.get("job_id"), tuple(describe_files(adapter.folder)))
