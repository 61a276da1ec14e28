"""Faults injected for real, then the same job delivered again (issue 13): a worker SIGKILLed at each
stage, a stale job lock, two workers on one job_id. Stores and records going down, slow or throttling,
and a full disk are in tests/test_faults_services.py.

Every fault strikes through the worker's own code: a fresh process runs the real ``handler.handler``
and kills itself at an exact point (tests/fault_injection.py), and the re-delivery runs the real
handler again. After it, the checks of ``losses`` (artifact complete and verified, exactly one
artifact and one artifact row, the adapter trained before the fault kept, the newest intact
checkpoint resumed) and the job row's final state must hold, and no secret may appear in any output,
log line, row or file. The figures go to build/reliability.json (``faults``; RELIABILITY.md).
"""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file

import handler
from files import describe_files
from storage.records import SqliteRecords
from tests.conftest import small_job
from tests.fault_injection import (
    artifact_rows,
    job_rows,
    lock_is_free,
    losses,
    module_figures,
    no_training,
    run_child,
    scrubbed_logs,
    start_second_delivery,
    wait_for,
)
from tests.reliability import PLANTED
from training.checkpoints import CHECKPOINT_MARKER

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fault_figures():
    yield from module_figures()


@pytest.fixture
def logs(caplog, monkeypatch):
    yield from scrubbed_logs(caplog, monkeypatch)


def _job_row(volume, job_id: str) -> dict | None:
    return SqliteRecords(volume / "records.sqlite3").get_job(job_id)


def _checkpoints(volume, job_id: str) -> dict[str, bool]:
    root = volume / "checkpoints" / job_id
    return {p.name: (p / CHECKPOINT_MARKER).is_file() for p in sorted(root.glob("checkpoint-*"))}


def _redeliver(job: dict, monkeypatch) -> dict:
    """The same job, delivered again to this (fresh) process. JOB_LOCK_TIMEOUT_S=0: the dead worker's
    lock must not make it wait at all."""
    monkeypatch.setenv("JOB_LOCK_TIMEOUT_S", "0")
    handler.get_settings.cache_clear()
    return handler.handler({"id": "again", "input": job})


def _after_the_kill(volume, child, job_id: str, where: str) -> None:
    """The child died by SIGKILL at the aimed point, left its job running and its lock file behind,
    and the kernel released the lock with the process."""
    assert child.returncode == -9, child.explain()
    assert child.killed_at and child.killed_at.startswith(where), child.explain()
    assert SqliteRecords(volume / "records.sqlite3").get_job(job_id)["status"] == "running"
    lock = volume / "jobs" / f".{job_id}.lock"
    assert lock.is_file() and lock_is_free(lock)


def _job(job_id: str) -> dict:
    """8 steps, a checkpoint every 2: a kill at step 4 has an older complete checkpoint behind it."""
    return small_job(job_id=job_id, hyperparameters={"save_steps": 2, "save_total_limit": 2})


def _small_job(job_id: str) -> dict:
    """2 steps: for faults after training, where only a finished training matters."""
    return small_job(job_id=job_id, dataset={"max_examples": 16}, hyperparameters={"epochs": 1})


# --------------------------------------------------------------------------------------------------
# SIGKILL at each stage


def test_sigkill_during_training_resumes_from_the_last_complete_checkpoint(volume, logs, monkeypatch, tmp_path,
                                                                          fault_figures):
    job = _job("kill-train")
    child = run_child(job, "train:4", tmp_path / "child.log")
    _after_the_kill(volume, child, "kill-train", "train: checkpoint-4 is complete")
    fault_figures.inject("sigkill-train")
    assert _checkpoints(volume, "kill-train") == {"checkpoint-2": True, "checkpoint-4": True}
    assert SqliteRecords(volume / "records.sqlite3").get_job("kill-train")["current_step"] == 4

    output = _redeliver(job, monkeypatch)
    assert output.get("status") == "succeeded", output
    assert "resuming from checkpoint-4 (step 4)" in logs.text
    assert output["metrics"]["steps"] == 8
    history = json.loads((volume / "artifacts" / "kill-train" / "metrics.json").read_text())["log_history"]
    steps = [e["step"] for e in history if "loss" in e]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 8  # one curve, no step twice
    assert not (volume / "checkpoints" / "kill-train").exists(), "checkpoints outlived the stored adapter"
    assert not (volume / "jobs" / "kill-train").exists()
    row = _job_row(volume, "kill-train")
    fault_figures.check_ended_right(volume, "kill-train", output, job_row=row, resumed_from=4,
                                    texts=dict(output=json.dumps(output), log=logs.text, child=child.text),
                                    secrets=[PLANTED.hf_token])
    assert row["current_step"] == 8

    # Same data order and optimizer state: the resumed adapter is the uninterrupted one.
    straight = handler.handler({"id": "x", "input": {**job, "job_id": "straight-through"}})
    assert straight["metrics"]["resumed_from_step"] == 0
    resumed, reference = (load_file(str(volume / "artifacts" / name / "adapter" / "adapter_model.safetensors"))
                          for name in ("kill-train", "straight-through"))
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-5, atol=1e-6)
    fault_figures.recover("sigkill-train")


def test_sigkill_during_a_checkpoint_save_resumes_from_the_one_before(volume, logs, monkeypatch, tmp_path,
                                                                     fault_figures):
    job = small_job(job_id="kill-save", hyperparameters={"epochs": 1, "save_steps": 2})  # 4 steps
    child = run_child(job, "checkpoint:4", tmp_path / "child.log")
    _after_the_kill(volume, child, "kill-save", "checkpoint: checkpoint-4/adapter_model.safetensors half written")
    fault_figures.inject("sigkill-checkpoint-save")
    assert _checkpoints(volume, "kill-save") == {"checkpoint-2": True, "checkpoint-4": False}

    output = _redeliver(job, monkeypatch)
    assert output.get("status") == "succeeded", output
    assert "checkpoint-4 was never completed" in logs.text
    assert "resuming from checkpoint-2 (step 2)" in logs.text and output["metrics"]["steps"] == 4
    fault_figures.check_ended_right(volume, "kill-save", output, job_row=_job_row(volume, "kill-save"),
                                    resumed_from=2,
                                    texts=dict(output=json.dumps(output), log=logs.text, child=child.text),
                                    secrets=[PLANTED.hf_token])
    fault_figures.recover("sigkill-checkpoint-save")


@pytest.fixture
def s3_store(volume, s3_server, s3_bucket, monkeypatch):
    """The volume's jobs stored in a real S3 bucket (SeaweedFS on loopback); every object it is sent
    is counted (``sent``)."""
    import storage.s3

    for name, value in s3_server.env(s3_bucket).items():
        monkeypatch.setenv(name, value)
    handler.get_settings.cache_clear()
    sent: list[str] = []
    real = storage.s3.make_s3_client

    def make(settings, **kwargs):
        client = real(settings, **kwargs)
        client.meta.events.register("before-parameter-build.s3.PutObject",
                                    lambda params, **_: sent.append(params.get("Key")))
        return client

    monkeypatch.setattr(storage.s3, "make_s3_client", make)
    return s3_bucket, sent


def test_sigkill_during_the_upload_to_s3_stores_the_kept_adapter_without_training(
        volume, logs, monkeypatch, tmp_path, s3_server, s3_store, fault_figures):
    bucket, sent = s3_store
    job = _small_job("kill-upload")
    child = run_child(job, "upload", tmp_path / "child.log")
    _after_the_kill(volume, child, "kill-upload", "upload: 1 object of the job stored")
    fault_figures.inject("sigkill-upload-s3")
    client = s3_server.client()
    before = {o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}
    # The claim and at least one file (uploads run in parallel: others may have landed as it died), and
    # no manifest: an incomplete upload, which no reader takes for a stored adapter.
    assert "kill-upload/.job-owner.json" in before and len(before) >= 2, before
    assert not {"kill-upload/manifest.json", "kill-upload/adapter/manifest.json"} & before, before
    trained = [vars(f) for f in describe_files(volume / "jobs" / "kill-upload" / "adapter")]

    steps = no_training(monkeypatch)
    output = _redeliver(job, monkeypatch)
    assert output.get("status") == "succeeded", output
    assert steps == []
    assert not set(sent) & before, "an object stored before the kill was sent again"
    assert sent[-2:] == ["kill-upload/adapter/manifest.json", "kill-upload/manifest.json"]  # manifests last
    assert not (volume / "jobs" / "kill-upload").exists()
    objects = {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read().decode("utf-8", "replace")
               for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}
    fault_figures.check_ended_right(volume, "kill-upload", output, job_row=_job_row(volume, "kill-upload"),
                                    trained=trained, s3=(client, bucket),
                                    texts=dict(output=json.dumps(output), log=logs.text, child=child.text, **objects),
                                    secrets=[PLANTED.hf_token, s3_server.secret_key, s3_server.access_key])
    fault_figures.recover("sigkill-upload-s3")


def test_sigkill_during_the_copy_to_the_volume_store_leaves_no_second_copy(volume, logs, monkeypatch, tmp_path,
                                                                          fault_figures):
    job = _small_job("kill-copy")
    child = run_child(job, "upload", tmp_path / "child.log")
    _after_the_kill(volume, child, "kill-copy", "upload: 2 files copied")
    fault_figures.inject("sigkill-upload-volume")
    artifacts = volume / "artifacts"
    assert not (artifacts / "kill-copy" / "manifest.json").exists()  # nothing published,
    assert list(artifacts.glob(".kill-copy.partial-*"))  # a hidden half copy left behind
    trained = [vars(f) for f in describe_files(volume / "jobs" / "kill-copy" / "adapter")]

    steps = no_training(monkeypatch)
    output = _redeliver(job, monkeypatch)
    assert output.get("status") == "succeeded", output
    assert steps == []
    fault_figures.check_ended_right(volume, "kill-copy", output, job_row=_job_row(volume, "kill-copy"),
                                    trained=trained,
                                    texts=dict(output=json.dumps(output), log=logs.text, child=child.text),
                                    secrets=[PLANTED.hf_token])
    fault_figures.recover("sigkill-upload-volume")


def test_sigkill_during_the_record_write_gives_one_row_without_training(volume, logs, monkeypatch, tmp_path,
                                                                        fault_figures):
    job = _small_job("kill-record")
    child = run_child(job, "record", tmp_path / "child.log")
    _after_the_kill(volume, child, "kill-record", "record: the artifact row is written")
    fault_figures.inject("sigkill-record")
    (written,) = artifact_rows(volume)
    stored = volume / "artifacts" / "kill-record"
    snapshot = {p: p.stat().st_mtime_ns for p in stored.rglob("*")}
    trained = json.loads(written["manifest"])["files"]

    steps = no_training(monkeypatch)
    output = _redeliver(job, monkeypatch)
    assert output.get("status") == "succeeded", output
    assert steps == []
    assert output["record_id"] == written["id"]  # the row written before the kill, not a second one
    assert {p: p.stat().st_mtime_ns for p in stored.rglob("*")} == snapshot  # nothing stored again
    fault_figures.check_ended_right(volume, "kill-record", output, job_row=_job_row(volume, "kill-record"),
                                    trained=trained,
                                    texts=dict(output=json.dumps(output), log=logs.text, child=child.text),
                                    secrets=[PLANTED.hf_token])
    fault_figures.recover("sigkill-record")


# --------------------------------------------------------------------------------------------------
# the job lock: a dead worker's, and two live workers on one job_id


def test_a_stale_lock_left_by_a_killed_worker_does_not_block_the_job(volume, logs, monkeypatch, tmp_path,
                                                                    fault_figures):
    job = _small_job("stale-lock")
    child = run_child(job, "start", tmp_path / "child.log")
    _after_the_kill(volume, child, "stale-lock", "start: the job lock is held")
    fault_figures.inject("stale-lock")

    output = _redeliver(job, monkeypatch)  # JOB_LOCK_TIMEOUT_S=0: one try at the lock, no wait
    assert output.get("status") == "succeeded", output
    assert "is running in another delivery" not in logs.text
    fault_figures.check_ended_right(volume, "stale-lock", output, job_row=_job_row(volume, "stale-lock"),
                                    texts=dict(output=json.dumps(output), log=logs.text, child=child.text),
                                    secrets=[PLANTED.hf_token])
    fault_figures.recover("stale-lock")

    # The checks behind faults.data_lost do see a loss or a duplicate when there is one.
    stored = volume / "artifacts" / "stale-lock"
    shutil.copytree(stored, volume / "artifacts" / ".stale-lock.partial-0")
    (stored / "adapter" / "adapter_config.json").unlink()
    seen = losses(volume, "stale-lock", output, artifact_rows=artifact_rows(volume) * 2, job_rows=job_rows(volume))
    assert [p.split(" ")[0:3] for p in seen] == [["the", "stored", "artifact"], ["the", "artifacts", "folder"],
                                                 ["2", "artifact", "rows,"]], seen


def _hold_training(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """This process's delivery stops at its first training step until released (bounded)."""
    import pipeline

    started, release = threading.Event(), threading.Event()
    real = pipeline.Tracker.on_train_progress

    def held(self, event):
        if not started.is_set():
            started.set()
            release.wait(180)
        real(self, event)

    monkeypatch.setattr(pipeline.Tracker, "on_train_progress", held)
    return started, release


def _tree(folder) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_two_workers_with_one_job_id(volume, logs, monkeypatch, tmp_path, fault_figures):
    """This process trains the job; a second worker process delivers it meanwhile, first with a short
    lock wait (told it is running), then with a long one (waits, then gets the stored result)."""
    job = _small_job("two-workers")
    started, release = _hold_training(monkeypatch)
    results: dict[str, dict] = {}
    first = threading.Thread(target=lambda: results.__setitem__(
        "first", handler.handler({"id": "first", "input": job})), daemon=True)
    first.start()
    second = None
    try:
        assert started.wait(120), "the first delivery never reached training"
        mine = {name: _tree(volume / name / "two-workers") for name in ("jobs", "checkpoints")}
        second = start_second_delivery(job, tmp_path / "second.log")
        fault_figures.inject("two-workers-one-job-id")
        (refused,) = wait_for(lambda: second.outputs, "the second worker's first answer")
        assert refused["error"].startswith("train: job_id 'two-workers' is already running in another "
                                           "delivery (waited 0s for it)"), refused
        assert {name: _tree(volume / name / "two-workers") for name in ("jobs", "checkpoints")} == mine
        row = SqliteRecords(volume / "records.sqlite3").get_job("two-workers")
        assert (row["status"], row["error"]) == ("running", None)  # the first's row, untouched
        wait_for(lambda: "job two-workers is running in another delivery: waiting up to 120s" in second.text,
                 "the second worker to wait for the lock")
    finally:
        release.set()
        first.join(180)
        if second is not None:
            second.wait(120)
    assert results["first"].get("status") == "succeeded", results
    assert second.returncode == 0 and len(second.outputs) == 2, second.explain()
    waited = second.outputs[1]
    assert waited.get("status") == "succeeded", waited
    assert waited["adapter"] == results["first"]["adapter"] and waited["record_id"] == results["first"]["record_id"]
    # The last delivery to finish wrote the row: exactly its final state.
    fault_figures.check_ended_right(volume, "two-workers", waited, job_row=_job_row(volume, "two-workers"),
                                    texts=dict(outputs=json.dumps(results), log=logs.text, second=second.text),
                                    secrets=[PLANTED.hf_token])
    fault_figures.recover("two-workers-one-job-id")
