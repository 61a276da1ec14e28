"""Training checkpoints on the volume: complete ones only, resumed without unpickling code.

The Trainer writes ``checkpoint-<step>/`` folders into the job's checkpoint directory; after each
save ``CheckpointKeeper`` drops the pickled TrainingArguments, writes a completion marker last and
atomically, and keeps the newest ``save_total_limit`` complete ones. ``find_resume_checkpoint`` picks
the newest complete checkpoint of the same run (model, data, settings), removes half-written and
foreign ones, and skips any whose files are not plain tensor data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import safe_globals

from files import write_json_atomic
from models.safetensors import safetensors_extent

logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "checkpoint-complete.json"
# The Trainer's own state files: torch pickles, which transformers 5.24 loads with weights_only=True
# (tensors and plain containers only). They are checked the same way before a resume, so that a
# damaged or planted file skips that checkpoint instead of failing the job half-way into loading.
_CHECKPOINT_PICKLES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")
# Anything else in a pickle format is not ours: a resume refuses the checkpoint rather than let some
# loader pick it up (peft would read an adapter_model.bin).
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")


def run_signature(hp, data, base_model_id: str, base_revision: str | None) -> str:
    """What a checkpoint must match to be resumed: same model, data and training settings."""
    settings = hp.model_dump(mode="json", exclude={"logging_steps", "eval_steps", "save_steps",
                                                   "save_total_limit"})
    payload = {"base": [base_model_id, base_revision], "dataset": data.report.sha256,
               "examples": len(data.train), "hyperparameters": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def step_of(path: Path) -> int | None:
    prefix = "checkpoint-"
    if path.is_dir() and path.name.startswith(prefix) and path.name[len(prefix):].isdigit():
        return int(path.name[len(prefix):])
    return None


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path, dict | None]]:
    """(step, folder, marker or None) for every checkpoint folder, oldest first."""
    found = []
    if checkpoint_dir.is_dir():
        for path in checkpoint_dir.iterdir():
            step = step_of(path)
            if step is None:
                continue
            try:
                marker = json.loads((path / CHECKPOINT_MARKER).read_text())
            except (OSError, ValueError):
                marker = None
            found.append((step, path, marker))
    return sorted(found, key=lambda item: item[0])


def _unsafe_reason(path: Path) -> str | None:
    """Why this checkpoint must not be loaded, or None."""
    if not (path / "adapter_model.safetensors").is_file():
        return "it has no adapter_model.safetensors"
    strangers = sorted(p.name for p in path.rglob("*")
                       if p.name.endswith(_PICKLE_SUFFIXES) and p.name not in _CHECKPOINT_PICKLES)
    if strangers:
        return f"it holds pickled files a resume does not expect: {', '.join(strangers)}"
    for name in _CHECKPOINT_PICKLES:
        file = path / name
        if not file.is_file():
            continue
        try:
            with safe_globals():  # numpy arrays in rng_state.pth, as the Trainer itself allows
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any refusal or damage means: do not resume from it
            return f"{name} is not plain tensor data ({type(exc).__name__})"
    return None


def _damage(path: Path, marker: dict) -> str | None:
    """Why a marked checkpoint cannot be resumed from (its files changed since it was marked), or None.

    A completion marker says the save finished, not that the files are still whole: a disk error or a
    copy cut short later leaves a marked folder that would fail the resume (and every retry) half-way.
    """
    for name, size in (marker.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, not the {size} it was saved with"
    for file in sorted(path.rglob("*.safetensors")):
        if safetensors_extent(file) != file.stat().st_size:
            return f"{file.relative_to(path)} is truncated or its header is damaged"
    for file in sorted(path.rglob("*.json")):
        try:
            json.loads(file.read_text())
        except (OSError, ValueError):
            return f"{file.relative_to(path)} is not valid JSON"
    return None


def find_resume_checkpoint(checkpoint_dir: Path, signature: str) -> Path | None:
    """The newest complete, whole, safe checkpoint of this run. Half-written, foreign and damaged ones are
    removed (the next older one is tried, and a retry never meets them again); unsafe ones are skipped."""
    chosen = None
    for step, path, marker in reversed(list_checkpoints(checkpoint_dir)):
        if marker is None:
            logger.warning("checkpoint %s was never completed (a killed process?): removed", path.name)
            shutil.rmtree(path, ignore_errors=True)
            continue
        if marker.get("signature") != signature:
            logger.warning("checkpoint %s belongs to other training settings or data: removed", path.name)
            shutil.rmtree(path, ignore_errors=True)
            continue
        if chosen is not None:
            continue
        damage = _damage(path, marker)
        if damage:
            logger.warning("checkpoint %s is damaged (%s): removed; trying the one before it", path.name, damage)
            shutil.rmtree(path, ignore_errors=True)
            continue
        reason = _unsafe_reason(path)
        if reason:  # kept for a person to look at (it may be planted), never loaded
            logger.warning("checkpoint %s is skipped: %s", path.name, reason)
            continue
        chosen = path
    return chosen


class CheckpointKeeper(TrainerCallback):
    """After the Trainer writes a checkpoint: drop the pickled args, mark it complete, keep the newest.

    The marker is written last, atomically: a folder without it is a save that a kill interrupted.
    Rotation is done here rather than by the Trainer so that the previous complete checkpoint is
    only removed once the new one is marked complete.
    """

    def __init__(self, checkpoint_dir: Path, signature: str, keep: int):
        self.checkpoint_dir = checkpoint_dir
        self.signature = signature
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.mark(state.global_step)

    def mark(self, step: int) -> None:
        path = self.checkpoint_dir / f"checkpoint-{step}"
        # The Trainer's pickled TrainingArguments: never read on resume, so never kept to be read.
        (path / "training_args.bin").unlink(missing_ok=True)
        # Each file's size, so that a resume can tell a checkpoint damaged after it was marked.
        files = {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*"))
                 if p.is_file() and p.name != CHECKPOINT_MARKER}
        write_json_atomic(path / CHECKPOINT_MARKER, {"step": step, "signature": self.signature,
                                                     "completed_at": time.time(), "files": files})
        complete = [p for s, p, m in list_checkpoints(self.checkpoint_dir) if m is not None]
        for old in complete[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s saved", path.name)
