"""Surviving preemption: killed, timed out or cancelled, the same job resumes from its last checkpoint."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import handler
from storage.records import SqliteRecords
from tests.conftest import ROOT, small_job
from training.checkpoints import CHECKPOINT_MARKER, find_resume_checkpoint

# The job process, killed with SIGKILL right after its second checkpoint is complete.
KILLED_CHILD = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from transformers import TrainerCallback
import train_lora

class KillAfterSecondSave(TrainerCallback):
    saves = 0
    def on_save(self, args, state, control, **kwargs):
        self.saves += 1
        if self.saves == 2:
            print(f"killing myself at step {state.global_step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

real = train_lora.train_lora
def with_killer(*args, callbacks=None, **kwargs):
    return real(*args, callbacks=[*(callbacks or []), KillAfterSecondSave()], **kwargs)
train_lora.train_lora = with_killer

import handler
print(handler.handler({"id": "child", "input": json.loads(sys.argv[2])}))
"""


def _adapter(output: dict) -> dict[str, torch.Tensor]:
    folder = Path(output["adapter"]["uri"].removeprefix("file://"))
    return load_file(str(folder / "adapter_model.safetensors"))


def _checkpoints(volume: Path, job_id: str) -> dict[str, bool]:
    root = volume / "checkpoints" / job_id
    return {p.name: (p / CHECKPOINT_MARKER).is_file() for p in sorted(root.glob("checkpoint-*"))}


@pytest.mark.slow
def test_sigkilled_job_resumes_from_its_last_complete_checkpoint(volume, caplog):
    job = small_job(job_id="resume-me", hyperparameters={"save_steps": 2, "save_total_limit": 2})
    env = {k: v for k, v in os.environ.items() if k.upper() not in ("MODEL_PATH", "DEFAULT_BASE_MODEL")}
    env.update(VOLUME_ROOT=str(volume), HF_HUB_OFFLINE="1", PROGRESS_INTERVAL_S="0")
    proc = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(ROOT), json.dumps(job)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "killing myself at step 4" in proc.stdout
    assert _checkpoints(volume, "resume-me") == {"checkpoint-2": True, "checkpoint-4": True}
    # A save the kill interrupted: a folder without its completion marker.
    half = volume / "checkpoints" / "resume-me" / "checkpoint-6"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    row = SqliteRecords(volume / "records.sqlite3").get_job("resume-me")
    assert row["status"] == "running" and row["current_step"] == 4  # what a killed worker leaves

    with caplog.at_level(logging.INFO):
        output = handler.handler({"id": "again", "input": job})
    assert output["status"] == "succeeded", output
    assert output["metrics"]["resumed_from_step"] == 4 and output["metrics"]["steps"] == 8
    assert "resuming from checkpoint-4 (step 4)" in caplog.text
    assert "checkpoint-6 was never completed" in caplog.text
    history = json.loads((volume / "artifacts" / "resume-me" / "metrics.json").read_text())["log_history"]
    steps = [e["step"] for e in history if "loss" in e]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 8  # one curve, no step twice
    assert not (volume / "checkpoints" / "resume-me").exists(), "checkpoints outlived the stored adapter"
    assert [p.name for p in (volume / "artifacts").iterdir()] == ["resume-me"]
    row = SqliteRecords(volume / "records.sqlite3").get_job("resume-me")
    assert row["status"] == "succeeded" and row["current_step"] == 8

    # Same data order and optimizer state: the resumed adapter is the uninterrupted one.
    straight = handler.handler({"id": "x", "input": {**job, "job_id": "straight-through"}})
    assert straight["metrics"]["resumed_from_step"] == 0
    resumed, reference = _adapter(output), _adapter(straight)
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-5, atol=1e-6)


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
