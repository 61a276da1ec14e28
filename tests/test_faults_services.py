"""Faults around the worker (issue 13): the S3 store down, slow or throttling; the records service
down; the disk full while a checkpoint or the job folder is written. Each through ``handler.handler``,
then the same job delivered again once the fault is gone. Worker processes killed at each stage, the
stale lock and two workers on one job_id are in tests/test_faults.py.

The store and the records service are the real SeaweedFS and the PostgREST double behind a loopback
``FaultProxy`` (tests/fault_proxy.py) that the test switches: the worker's own clients, retries
and timeouts meet a refused connection, an answer that never comes, or ``503 SlowDown``. Related,
and not repeated here: the S3 server stopped after the first object of an upload
(tests/test_storage_s3.py::test_s3_down_mid_upload_keeps_the_adapter_and_a_rerun_completes), a 503
answer to the artifact row (::test_record_failure_names_the_s3_location_and_a_rerun_writes_it), and
the local store's copy failing with ENOSPC (tests/test_storage_local.py).
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest

import handler
from files import describe_files
from storage.records import SqliteRecords, SupabaseRecords
from tests.conftest import small_job
from tests.fault_injection import (
    artifact_rows,
    module_figures,
    no_training,
    scrubbed_logs,
    torn_write,
)
from tests.fault_proxy import FaultProxy
from tests.postgrest_server import SERVICE_ROLE_KEY, FakePostgrest
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


def _failures(monkeypatch) -> list:
    """The WorkerErrors the pipeline records as a job's failure (the output carries only their text)."""
    import pipeline

    seen = []
    real = pipeline._record_failure

    def spy(records, job_id, exc, settings):
        seen.append(exc)
        return real(records, job_id, exc, settings)

    monkeypatch.setattr(pipeline, "_record_failure", spy)
    return seen


@contextmanager
def _strikes_when(monkeypatch, owner, name: str, fault):
    """``fault()`` runs as ``owner.name`` is entered (the stage the fault is aimed at begins)."""
    real = getattr(owner, name)

    def entered(*args, **kwargs):
        fault()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, entered)
    yield
    monkeypatch.setattr(owner, name, real)


def _small_job(job_id: str) -> dict:
    return small_job(job_id=job_id, dataset={"max_examples": 16}, hyperparameters={"epochs": 1})


# --------------------------------------------------------------------------------------------------
# the S3 store: down, slow, throttling


@pytest.fixture
def s3_proxy(volume, s3_server, s3_bucket, monkeypatch):
    """The worker's S3 store is the real server behind a FaultProxy. The clients' retries and timeouts
    are shortened (2 attempts, 1 s to connect, 1 s to read; production: 5, 10 s, 120 s) so that a
    fault fails in seconds; everything else is the worker's own client."""
    import storage.s3

    proxy = FaultProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    for name, value in {**s3_server.env(s3_bucket), "S3_ENDPOINT_URL": proxy.url}.items():
        monkeypatch.setenv(name, value)
    handler.get_settings.cache_clear()
    real = storage.s3.make_s3_client
    monkeypatch.setattr(storage.s3, "make_s3_client", lambda settings, **kwargs: real(
        settings, **{**kwargs, "max_attempts": 2, "connect_timeout": 1, "read_timeout": 1}))
    yield proxy
    proxy.stop()


S3_FAULTS = [("down", "refuse", "did not answer after retries (EndpointConnectionError"),
             ("slow", "slow", "did not answer after retries (ReadTimeoutError"),
             ("503", "503", "the store answered SlowDown")]


@pytest.mark.parametrize("fault,mode,reason", S3_FAULTS, ids=[f[0] for f in S3_FAULTS])
def test_s3_fault_keeps_the_adapter_and_the_redelivery_uploads_it(fault, mode, reason, volume, logs, monkeypatch,
                                                                 s3_proxy, s3_server, s3_bucket, fault_figures):
    import storage.artifacts

    job_id = f"s3-{fault}"
    job = {"id": job_id, "input": _small_job(job_id)}
    secrets = [PLANTED.hf_token, s3_server.secret_key, s3_server.access_key]
    failures = _failures(monkeypatch)

    # Down as the job arrives: it fails before any model, data or GPU minute is spent on it.
    s3_proxy.set(mode)
    early = handler.handler(job)
    assert early.get("error", "").startswith(f"upload: could not read s3://{s3_bucket}/{job_id}/"), early
    assert reason in early["error"] and not (volume / "jobs" / job_id).exists()

    # Down as the upload begins, after training.
    s3_proxy.set("pass")
    with _strikes_when(monkeypatch, storage.artifacts.S3ArtifactStore, "put", lambda: s3_proxy.set(mode)):
        failed = handler.handler(job)
    kept = volume / "jobs" / job_id / "adapter"
    assert failed.get("error", "").startswith(f"upload: could not read s3://{s3_bucket}/{job_id}/"), failed
    assert reason in failed["error"], failed  # the fault's own error: it struck
    assert mode == "refuse" or s3_proxy.faulted  # (a refused connection never reaches the proxy to be counted)
    assert failed["error"].endswith(f"the trained adapter is kept at {kept}: re-run the job with the same job_id "
                                    "to store it without training again")
    fault_figures.inject(f"s3-{fault}")
    assert failures[-1].stage == "upload" and failures[-1].retryable
    assert (kept / "adapter_model.safetensors").is_file() and (kept / "manifest.json").is_file()
    row = SqliteRecords(volume / "records.sqlite3").get_job(job_id)
    assert (row["status"], row["error"]) == ("failed", failed["error"])
    trained = [vars(f) for f in describe_files(kept)]

    # The store is back: the same job is stored from the kept folder, without a training step.
    s3_proxy.set("pass")
    steps = no_training(monkeypatch)
    done = handler.handler(job)
    assert done.get("status") == "succeeded", done
    assert steps == [] and done["timings"]["train_s"] == 0.0
    assert not kept.exists()
    client = s3_server.client()
    objects = {o["Key"]: client.get_object(Bucket=s3_bucket, Key=o["Key"])["Body"].read().decode("utf-8", "replace")
               for o in client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])}
    fault_figures.check_ended_right(volume, job_id, done, job_row=_job_row(volume, job_id),
                                    trained=trained, s3=(client, s3_bucket),
                                    texts=dict(outputs=json.dumps([early, failed, done]), log=logs.text, **objects),
                                    secrets=secrets)
    fault_figures.recover(f"s3-{fault}")


# --------------------------------------------------------------------------------------------------
# the records service down


@pytest.fixture
def records_proxy(volume, monkeypatch):
    """Records go to the PostgREST double (tests/postgrest_server.py) behind a FaultProxy; artifacts stay
    on the volume. Backoff between the client's 5 attempts is 0 s, so a fault fails at once."""
    server = FakePostgrest().start()
    proxy = FaultProxy(server._server.server_address[1])
    monkeypatch.setenv("SUPABASE_URL", proxy.url)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)
    monkeypatch.setattr(SupabaseRecords, "BACKOFF_S", 0.0)
    handler.get_settings.cache_clear()
    yield server, proxy
    proxy.stop()
    server.stop()


def test_records_down_keeps_the_adapter_and_the_redelivery_writes_each_row_once(volume, logs, monkeypatch,
                                                                                records_proxy, fault_figures):
    server, proxy = records_proxy
    job = {"id": "rec-down", "input": _small_job("rec-down")}
    failures = _failures(monkeypatch)
    reached = f"Supabase at {proxy.url} could not be reached (ConnectError"

    # Down as the job arrives: nothing is trained for a job whose state cannot be read.
    proxy.set("refuse")
    early = handler.handler(job)
    assert early.get("error", "").startswith("record: could not read the training_jobs row for job rec-down: "
                                             + reached), early
    assert not (volume / "jobs" / "rec-down").exists() and server.rows["training_jobs"] == []

    # Down as the record stage begins, after training and storing.
    proxy.set("pass")
    with _strikes_when(monkeypatch, SupabaseRecords, "upsert_artifact", lambda: proxy.set("refuse")):
        failed = handler.handler(job)
    stored = volume / "artifacts" / "rec-down"
    assert failed.get("error", "").startswith("record: could not write the training_artifacts row for job "
                                              f"rec-down: {reached}"), failed
    assert failed["error"].endswith(f"the adapter is stored at {(stored / 'adapter').as_uri()}/: re-run the job "
                                    "with the same job_id to write the record without training again")
    fault_figures.inject("records-down")
    assert failures[-1].stage == "record" and failures[-1].retryable
    assert server.rows["training_artifacts"] == []
    ((row),) = server.rows["training_jobs"]
    assert row["status"] == "running"  # the failure itself could not be recorded: the row is as it was
    trained = json.loads((stored / "adapter" / "manifest.json").read_text())["files"]

    # Back: the rows are written, once each, without training or storing again.
    proxy.set("pass")
    steps = no_training(monkeypatch)
    snapshot = {p: p.stat().st_mtime_ns for p in stored.rglob("*")}
    done = handler.handler(job)
    assert done.get("status") == "succeeded", done
    assert steps == [] and {p: p.stat().st_mtime_ns for p in stored.rglob("*")} == snapshot
    fault_figures.check_ended_right(volume, "rec-down", done, job_row=server.rows["training_jobs"][0],
                                    artifact_rows=server.rows["training_artifacts"],
                                    job_rows=server.rows["training_jobs"], trained=trained,
                                    texts=dict(outputs=json.dumps([early, failed, done]), log=logs.text,
                                               rows=json.dumps(server.rows, default=str),
                                               requests=json.dumps([r.body for r in server.requests], default=str)),
                                    secrets=[PLANTED.hf_token, SERVICE_ROLE_KEY])
    fault_figures.recover("records-down")


def test_records_down_during_training_does_not_hold_it_up(volume, logs, monkeypatch, records_proxy, fault_figures):
    """Progress rows are written from the training loop: while the service fails, they cost one request
    per pause, not five attempts with backoff at every step. The result is then recorded on re-delivery."""
    import pipeline

    server, proxy = records_proxy
    job = {"id": "rec-train", "input": _small_job("rec-train")}
    during: list[int] = []
    with _strikes_when(monkeypatch, pipeline, "_train_into", lambda: proxy.set("503")), \
            _strikes_when(monkeypatch, pipeline, "_write_job_folder", lambda: during.append(proxy.faulted)):
        failed = handler.handler(job)
    fault_figures.inject("records-down-during-training")
    assert during == [1], f"{during} requests to the failing service while training (want 1)"
    assert failed.get("error", "").startswith("record: could not write the training_artifacts row for job "
                                              f"rec-train: Supabase at {proxy.url} answered HTTP 503"), failed
    assert "progress record not written (the next try in 60s)" in logs.text
    stored = volume / "artifacts" / "rec-train"
    trained = json.loads((stored / "adapter" / "manifest.json").read_text())["files"]

    proxy.set("pass")
    steps = no_training(monkeypatch)
    done = handler.handler(job)
    assert done.get("status") == "succeeded", done
    assert steps == []
    fault_figures.check_ended_right(volume, "rec-train", done, job_row=server.rows["training_jobs"][0],
                                    artifact_rows=server.rows["training_artifacts"],
                                    job_rows=server.rows["training_jobs"], trained=trained,
                                    texts=dict(outputs=json.dumps([failed, done]), log=logs.text,
                                               rows=json.dumps(server.rows, default=str)),
                                    secrets=[PLANTED.hf_token, SERVICE_ROLE_KEY])
    fault_figures.recover("records-down-during-training")


# --------------------------------------------------------------------------------------------------
# the disk full


def test_disk_full_during_a_checkpoint_save(volume, logs, monkeypatch, fault_figures):
    import peft.peft_model

    real = peft.peft_model.safe_save_file
    struck = []

    def save(tensors, filename, *args, **kwargs):
        if "checkpoint-4" in str(filename) and not struck:
            struck.append(filename)
            from safetensors.torch import save

            torn_write(filename, save(tensors, *args, **kwargs))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save)
    job = {"id": "full-ckpt", "input": small_job(job_id="full-ckpt", hyperparameters={"epochs": 1, "save_steps": 2})}
    failures = _failures(monkeypatch)
    failed = handler.handler(job)
    assert struck, "the fault never struck"
    fault_figures.inject("disk-full-checkpoint")
    assert failed.get("error", "").startswith("train: the disk is full"), failed
    assert failures[-1].retryable
    checkpoints = volume / "checkpoints" / "full-ckpt"
    assert (checkpoints / "checkpoint-2" / CHECKPOINT_MARKER).is_file()
    assert not (checkpoints / "checkpoint-4" / CHECKPOINT_MARKER).exists()  # never taken for a checkpoint
    assert not (volume / "jobs" / "full-ckpt" / "manifest.json").exists()
    assert [p.name for p in (volume / "artifacts" / "full-ckpt").iterdir()] == [".job-owner.json"]
    assert artifact_rows(volume) == []

    monkeypatch.setattr(peft.peft_model, "safe_save_file", real)
    done = handler.handler(job)
    assert done.get("status") == "succeeded", done
    assert "checkpoint-4 was never completed" in logs.text
    fault_figures.check_ended_right(volume, "full-ckpt", done, job_row=_job_row(volume, "full-ckpt"), resumed_from=2,
                                    texts=dict(outputs=json.dumps([failed, done]), log=logs.text),
                                    secrets=[PLANTED.hf_token])
    fault_figures.recover("disk-full-checkpoint")


class _FullDisk:
    """A file whose next write puts half its bytes on disk, then fails with ENOSPC."""

    def __init__(self, fh):
        self.fh = fh

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        import errno
        import os

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.fh, name)


def test_disk_full_while_the_job_folder_is_written(volume, logs, monkeypatch, fault_figures):
    import files
    import pipeline

    real = files.atomic_writer
    full = []

    @contextmanager
    def writer(path, mode="wb"):
        with real(path, mode) as fh:
            yield _FullDisk(fh) if full else fh

    monkeypatch.setattr(files, "atomic_writer", writer)
    job = {"id": "full-folder", "input": _small_job("full-folder")}  # 2 steps, a checkpoint at each
    failures = _failures(monkeypatch)
    with _strikes_when(monkeypatch, pipeline, "_write_job_folder", lambda: full.append(True)):
        failed = handler.handler(job)
    fault_figures.inject("disk-full-job-folder")
    assert failed.get("error", "").startswith("save: the disk is full"), failed
    assert failures[-1].retryable
    folder = volume / "jobs" / "full-folder"
    assert not (folder / "manifest.json").exists() and not list(folder.rglob("*.tmp"))
    assert [p.name for p in (volume / "artifacts" / "full-folder").iterdir()] == [".job-owner.json"]
    assert artifact_rows(volume) == []

    full.clear()
    done = handler.handler(job)
    assert done.get("status") == "succeeded", done
    fault_figures.check_ended_right(volume, "full-folder", done, job_row=_job_row(volume, "full-folder"), resumed_from=2,
                                    texts=dict(outputs=json.dumps([failed, done]), log=logs.text),
                                    secrets=[PLANTED.hf_token])
    fault_figures.recover("disk-full-job-folder")
