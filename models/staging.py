"""Load base models in a way that suits a network volume.

``from_pretrained`` memory-maps safetensors shards and then touches them in the order tensors are
needed: small random reads, which on a network filesystem (RunPod's network volumes) cost a round
trip each and are known to be many times slower than reading the same bytes sequentially. So when
the model lives on a network filesystem and the container disk has room, the worker first copies
the folder onto local disk with large sequential reads, and loads from there.

MODEL_LOAD_STRATEGY: ``auto`` (stage only from a network filesystem, when local disk has room),
``stage`` (always), ``direct`` (never). The staged copy is reused by later jobs on the same worker
when its sizes still match, and is complete only once its marker is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from files import atomic_writer, write_json_atomic

logger = logging.getLogger(__name__)

BLOCK = 16 * 1024 * 1024  # large sequential reads: what network filesystems are good at
STAGED_MARKER = ".staged.json"
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "9p", "fuse",
                       "beegfs", "gpfs", "weka")


@dataclass(frozen=True)
class LoadPlan:
    path: Path  # what from_pretrained reads
    staged: bool
    reason: str
    seconds: float = 0.0
    bytes: int = 0

    def to_output(self) -> dict:
        return {"load_path": str(self.path), "staged": self.staged, "stage_reason": self.reason,
                "stage_seconds": round(self.seconds, 3), "staged_bytes": self.bytes}


def filesystem_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (from /proc/self/mountinfo); '' if unknown."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    real = str(path.resolve())
    best, best_type = "", ""
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount_point = fields[4].replace("\\040", " ")
        if (real == mount_point or real.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) >= len(best):
            best, best_type = mount_point, right.split()[0]
    return best_type


def is_network_filesystem(path: Path) -> bool:
    fs_type = filesystem_type(path)
    return any(fs_type == name or fs_type.startswith(name + ".") for name in NETWORK_FILESYSTEMS)


def _files(folder: Path) -> dict[str, Path]:
    """Every file of a model folder, symlinks (the HF cache's snapshots → blobs) resolved."""
    return {p.relative_to(folder).as_posix(): p.resolve()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def copy_sequential(src: Path, dst: Path, block: int = BLOCK) -> int:
    """Copy with large sequential reads, into a unique temporary name, renamed when complete."""
    copied = 0
    with open(src, "rb", buffering=0) as fin, atomic_writer(dst) as fout:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fin.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while chunk := fin.read(block):
            fout.write(chunk)
            copied += len(chunk)
    return copied


def stage_folder(folder: Path, stage_root: Path) -> tuple[Path, int]:
    """Copy ``folder`` under ``stage_root`` (reusing a complete earlier copy); → (copy, bytes copied)."""
    files = _files(folder)
    sizes = {name: path.stat().st_size for name, path in files.items()}
    key = hashlib.sha256(json.dumps([str(folder.resolve()), sizes], sort_keys=True).encode()).hexdigest()[:16]
    target = stage_root / f"{folder.name}-{key}"
    marker = target / STAGED_MARKER
    if marker.is_file() and all((target / n).is_file() and (target / n).stat().st_size == s
                                for n, s in sizes.items()):
        return target, 0
    copied = 0
    for name, src in files.items():
        dst = target / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_file() and dst.stat().st_size == sizes[name]:
            continue  # an earlier, interrupted staging got this far
        copied += copy_sequential(src, dst)
    write_json_atomic(marker, {"source": str(folder), "files": sizes})
    return target, copied


def plan_loading(folder: Path, strategy: str, stage_root: Path, margin_bytes: int = 1024**3) -> LoadPlan:
    """Decide where to load ``folder`` from, staging it onto local disk when that pays."""
    if strategy == "direct":
        return LoadPlan(folder, False, "MODEL_LOAD_STRATEGY=direct")
    if strategy == "auto" and not is_network_filesystem(folder):
        return LoadPlan(folder, False, f"local filesystem ({filesystem_type(folder) or 'unknown'})")
    size = sum(p.stat().st_size for p in _files(folder).values())
    stage_root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(stage_root).free
    if size + margin_bytes > free:
        if strategy == "stage":
            logger.warning("cannot stage %s (%.1f GB) into %s (%.1f GB free): loading directly",
                           folder, size / 1e9, stage_root, free / 1e9)
        return LoadPlan(folder, False, f"not enough local disk to stage ({free / 1e9:.1f} GB free, "
                                       f"{size / 1e9:.1f} GB needed)")
    started = time.monotonic()
    target, copied = stage_folder(folder, stage_root)
    seconds = time.monotonic() - started
    logger.info("staged %s → %s: %.2f GB in %.1fs (%.0f MB/s)", folder, target, copied / 1e9, seconds,
                copied / 1e6 / seconds if seconds and copied else 0)
    reason = "MODEL_LOAD_STRATEGY=stage" if strategy == "stage" else f"network filesystem ({filesystem_type(folder)})"
    return LoadPlan(target, True, reason, seconds, copied)
