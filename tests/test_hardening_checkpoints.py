"""Issue 13, finding 8: a damaged checkpoint, even one carrying its completion marker, is removed and
the next older one resumed — it never blocks the job."""

from __future__ import annotations

import pytest

import handler
from tests.conftest import small_job
from training.checkpoints import CHECKPOINT_MARKER


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _break_json(path):
    path.write_text(path.read_text()[:-20])


@pytest.mark.parametrize("damage, name", [(_truncate, "adapter_model.safetensors"),
                                          (_break_json, "trainer_state.json")])
def test_a_damaged_newest_checkpoint_is_removed_and_the_older_one_resumed(volume, monkeypatch, damage, name):
    import pipeline

    job = {"id": "rp", "input": small_job(job_id="ckpt", hyperparameters={"save_steps": 2, "save_total_limit": 2})}
    real = pipeline.Tracker.on_train_progress

    def die_at_step_5(self, event):
        if event.step == 5:
            raise RuntimeError("the worker died")
        real(self, event)

    monkeypatch.setattr(pipeline.Tracker, "on_train_progress", die_at_step_5)
    failed = handler.handler(job)
    assert "error" in failed, failed
    root = volume / "checkpoints" / "ckpt"
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    newest = root / "checkpoint-4"
    assert (newest / CHECKPOINT_MARKER).is_file()
    damage(newest / name)

    monkeypatch.setattr(pipeline.Tracker, "on_train_progress", real)
    done = handler.handler(job)
    assert done.get("status") == "succeeded", done
    assert done["metrics"]["resumed_from_step"] == 2
