"""Files on disk: hashing, atomic writes, folders published whole, paths kept inside their roots.

A leaf: it imports nothing of this project.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from errors import InputError

# The file a complete folder carries, written last: a folder without it is incomplete.
MANIFEST_NAME = "manifest.json"


def sha256_file(path: str | Path, block: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    name: str
    bytes: int
    sha256: str


def describe_files(folder: str | Path, *, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> list[FileEntry]:
    """Every file under ``folder`` (recursively, sorted) with its size and sha256."""
    folder = Path(folder)
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in exclude:
            continue
        entries.append(FileEntry(rel, path.stat().st_size, sha256_file(path)))
    return entries


@contextmanager
def atomic_writer(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A file opened on a unique temporary name beside ``path``, renamed onto it once complete.

    A reader (another worker, a re-run) sees the old file or the whole new one, never a half-written
    one; two writers never share a temporary name. On any error the temporary file is removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_writer(path, "wb") as fh:
        fh.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_writer(path, "w") as fh:
        fh.write(text)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    with atomic_writer(path, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def publish_folder(tmp: str | Path, final: str | Path, *, replace: bool = False) -> None:
    """Rename a finished folder ``tmp`` onto ``final`` (same filesystem): ``final`` appears whole or not at all.

    An empty ``final`` is taken over. A non-empty one is swapped out and removed when ``replace`` is
    set (an earlier, incomplete copy of the same thing), and is otherwise an error: it is not ours.
    """
    tmp, final = Path(tmp), Path(final)
    if final.is_dir() and any(final.iterdir()):
        if not replace:
            raise FileExistsError(f"{final} exists and is not empty")
        stale = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_folder(final.parent)


def _fsync_folder(folder: Path) -> None:
    # The rename itself is durable only once the folder holding it is synced.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (network ones among them) refuse fsync on a folder: the rename stands
    finally:
        os.close(fd)


def verify_files(folder: str | Path, manifest: dict[str, Any]) -> list[str]:
    """The problems (missing or changed files) of ``folder`` against its manifest; [] if intact."""
    folder = Path(folder)
    problems = []
    for entry in manifest.get("files", []):
        path = folder / entry["name"]
        if not path.is_file():
            problems.append(f"{entry['name']} is missing")
        elif path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['name']} does not match its sha256")
    return problems


def check_inside(path: str, roots: tuple[Path, ...], what: str) -> Path:
    """Refuse a path outside ``roots``: first as a string (no filesystem read), then resolved."""
    normal = Path(os.path.normpath(path))
    if ".." in Path(path).parts or not any(is_within(normal, root) for root in roots):
        raise InputError(
            f"{what} {path!r} is outside the allowed folders ({', '.join(map(str, roots))}); "
            "put it on the volume or name it relative to the models root"
        )
    real = normal.resolve()
    if not any(is_within(real, root.resolve()) for root in roots):
        raise InputError(f"{what} {path!r} links outside the allowed folders; copy it onto the volume")
    return real


def is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def sha256_files(paths: list[Path]) -> str:
    """One sha256 over the bytes of several files, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
