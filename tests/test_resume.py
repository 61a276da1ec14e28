"""Surviving preemption: timed out or cancelled, the same job resumes from its last checkpoint.

A worker killed with SIGKILL (during training, during a checkpoint save, and at the later stages) is
in the fault suite: tests/test_faults.py."""

from __future__ import annotations

import asyncio
import json
import pickle
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import handler
from storage.records import SqliteRecords
from tests.conftest import small_job
from training.checkpoints import CHECKPOINT_MARKER, find_resume_checkpoint


def _checkpoints(volume: Path, job_id: str) -> dict[str, bool]:
    root = volume / "checkpoints" / job_id
    return {p.name: (p / CHECKPOINT_MARKER).is_file() for p in sorted(root.glob("checkpoint-*"))}


def test_max_train_seconds_stops_with_a_checkpoint_and_the_rerun_resumes(volume, monkeypatch):
    monkeypatch.setenv("MAX_TRAIN_SECONDS", "0.001")
    handler.get_settings.cache_clear()
    job = small_job(job_id="slow-job")
    output = handler.handler({"id": "t", "input": job})
    assert output["error"].startswith(
        "train: training stopped after MAX_TRAIN_SECONDS=0.001s at step 1 of 8 (epoch 0.25); its "
        "checkpoint is kept in "), output
    assert "run the same job (same job_id) again to resume from there" in output["error"]
    assert _checkpoints(volume, "slow-job") == {"checkpoint-1": True}
    row = SqliteRecords(volume / "records.sqlite3").get_job("slow-job")
    assert row["status"] == "failed" and row["error"] == output["error"]

    monkeypatch.delenv("MAX_TRAIN_SECONDS")
    handler.get_settings.cache_clear()
    done = handler.handler({"id": "t", "input": job})
    assert done["status"] == "succeeded" and done["metrics"]["resumed_from_step"] == 1
    assert done["metrics"]["steps"] == 8


def test_a_runpod_cancel_stops_training_at_the_next_step(volume):
    job = small_job(job_id="cancel-me", hyperparameters={"epochs": 50})  # 200 steps: far longer than the wait
    records = SqliteRecords(volume / "records.sqlite3")

    async def run_and_cancel():
        task = asyncio.create_task(handler.async_handler({"id": "c", "input": job}))
        deadline = time.monotonic() + 120
        while True:  # until training has made a few steps
            await asyncio.sleep(0.05)
            row = records.get_job("cancel-me")
            if row and (row.get("current_step") or 0) >= 3:
                break
            assert time.monotonic() < deadline and not task.done(), task.done() and task.result()
        task.cancel()  # what the runpod SDK does on a cancel (JobScaler.stop_job)
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_and_cancel())
    row = records.get_job("cancel-me")
    assert row["status"] == "cancelled", row
    assert row["error"].startswith("train: training was cancelled at step ")
    assert "sending the same job (same job_id) again resumes from there" in row["error"]
    stopped_at = int(row["error"].split("at step ")[1].split()[0])
    assert 3 <= stopped_at < 200
    assert _checkpoints(volume, "cancel-me")[f"checkpoint-{stopped_at}"] is True
    assert records.get_artifact("cancel-me") is None


class _Payload:
    """A pickle that runs code when unpickled: what a planted optimizer.pt could hold."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_resume_skips_half_written_foreign_and_unsafe_checkpoints(tmp_path):
    root = tmp_path / "ckpt"
    sentinel = tmp_path / "code-ran"

    def checkpoint(step: int, *, signature="sig", marker=True, optimizer=None):
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
        torch.save(optimizer if optimizer is not None else {"state": {0: torch.ones(2)}}, folder / "optimizer.pt")
        (folder / "trainer_state.json").write_text("{}")
        if marker:
            (folder / CHECKPOINT_MARKER).write_text(json.dumps({"step": step, "signature": signature}))
        return folder

    good = checkpoint(2)
    checkpoint(4, optimizer=_Payload(sentinel))  # complete, but its optimizer.pt is code
    checkpoint(6, marker=False)  # a save interrupted by a kill
    with open(root / "checkpoint-5.tmp", "wb") as fh:  # not a checkpoint name: ignored
        pickle.dump(_Payload(sentinel), fh)

    assert find_resume_checkpoint(root, "sig") == good
    assert not sentinel.exists(), "a checkpoint's pickle ran code"
    assert not (root / "checkpoint-6").exists()
    assert (root / "checkpoint-4").exists()  # kept for a person to look at, never loaded

    checkpoint(8, signature="other settings")
    assert find_resume_checkpoint(root, "sig") == good
    assert not (root / "checkpoint-8").exists()
    assert find_resume_checkpoint(root, "changed") is None  # different data or settings: start over
