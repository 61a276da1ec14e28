"""The local default (artifact folder on the volume + SQLite) keeps the same exactly-once,
nothing-lost behaviour as S3 + Supabase."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

import handler
from errors import RecordError
from storage.artifacts import LocalArtifactStore
from storage.records import SqliteRecords
from tests.conftest import small_job
from tests.test_storage_s3 import make_job_dir

OWNER = "6f1c9a4e-2b7d-4c1e-9f3a-0d5e8b7a6c21"


def _no_training(monkeypatch):
    import train_lora

    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(train_lora, "train_lora", refuse)


def _without_timings(output: dict) -> dict:
    return {k: v for k, v in output.items() if k not in ("timings", "cost")}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_find_complete_answers_only_an_intact_folder(tmp_path):
    store = LocalArtifactStore(tmp_path / "artifacts")
    assert store.find_complete("team", "job-1") is None
    stored = store.put(make_job_dir(tmp_path), "team", "job-1")
    folder = tmp_path / "artifacts" / "team" / "job-1"
    assert stored.adapter_uri == (folder / "adapter").as_uri() + "/"
    found = store.find_complete("team", "job-1")
    assert (found.uri, found.files, found.manifest) == (stored.uri, stored.files, stored.manifest)
    (folder / "metrics.json").write_text("{}")  # changed after the manifest
    assert store.find_complete("team", "job-1") is None
    (folder / "manifest.json").unlink()
    assert store.find_complete("team", "job-1") is None


@pytest.mark.slow
def test_a_redelivered_job_returns_the_same_output_without_training(volume, monkeypatch):
    job = {"id": "rp-1", "input": small_job(job_id="twice", output={"prefix": "team-a"})}
    first = handler.handler(job)
    assert first["status"] == "succeeded", first
    folder = volume / "artifacts" / "team-a" / "twice"
    before = _snapshot(folder)

    _no_training(monkeypatch)
    second = handler.handler(job)
    assert _without_timings(second) == _without_timings(first)
    assert set(second["timings"]) == set(first["timings"]) and second["timings"]["train_s"] == 0.0
    assert _snapshot(folder) == before  # no second copy, nothing rewritten
    assert [p.name for p in folder.parent.iterdir()] == ["twice"]
    records = SqliteRecords(volume / "records.sqlite3")
    assert records.get_artifact("twice")["id"] == first["record_id"]
    assert records.get_job("twice")["output"] == second


@pytest.mark.slow
def test_a_failed_copy_keeps_the_adapter_and_a_rerun_stores_it(volume, monkeypatch):
    import storage.artifacts

    real_copy = shutil.copy2

    def disk_full(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.artifacts.shutil, "copy2", disk_full)
    job = {"id": "rp-2", "input": small_job(job_id="nospace")}
    failed = handler.handler(job)
    kept = volume / "jobs" / "nospace" / "adapter"
    assert failed["error"] == (
        f"upload: could not copy the adapter to {volume / 'artifacts' / 'nospace'} (No space left on device); "
        f"the trained adapter is kept at {kept}: re-run the job with the same job_id to store it without "
        "training again")
    assert (kept / "adapter_model.safetensors").is_file()
    # the job's claim on its place, and no partial copy
    assert [p.name for p in (volume / "artifacts" / "nospace").iterdir()] == [".job-owner.json"]
    assert [p.name for p in (volume / "artifacts").iterdir()] == ["nospace"], "a partial copy was left behind"

    monkeypatch.setattr(storage.artifacts.shutil, "copy2", real_copy)
    _no_training(monkeypatch)
    done = handler.handler(job)
    assert done["status"] == "succeeded", done
    assert (volume / "artifacts" / "nospace" / "adapter" / "manifest.json").is_file()
    assert not kept.exists()


@pytest.mark.slow
def test_a_failed_record_names_the_adapter_and_a_rerun_writes_it(volume, monkeypatch):
    real = SqliteRecords.upsert_artifact

    def locked(self, job_id, fields):
        raise RecordError(f"could not write the training_artifacts row for job {job_id}: database is locked")

    monkeypatch.setattr(SqliteRecords, "upsert_artifact", locked)
    job = {"id": "rp-3", "input": small_job(job_id="norecord")}
    failed = handler.handler(job)
    adapter_uri = (volume / "artifacts" / "norecord" / "adapter").as_uri() + "/"
    assert failed["error"] == (
        "record: could not write the training_artifacts row for job norecord: database is locked; "
        f"the adapter is stored at {adapter_uri}: re-run the job with the same job_id to write the record "
        "without training again")
    records = SqliteRecords(volume / "records.sqlite3")
    assert records.get_artifact("norecord") is None
    assert records.get_job("norecord")["status"] == "failed"

    monkeypatch.setattr(SqliteRecords, "upsert_artifact", real)
    _no_training(monkeypatch)
    done = handler.handler(job)
    assert done["status"] == "succeeded" and done["adapter"]["uri"] == adapter_uri
    assert records.get_artifact("norecord")["id"] == done["record_id"]
    assert (records.get_job("norecord")["status"], records.get_job("norecord")["error"]) == ("succeeded", None)


@pytest.mark.slow
def test_a_failed_final_job_row_names_the_adapter_and_keeps_the_original_error(volume, monkeypatch):
    real = SqliteRecords.upsert_job

    def fails_when_done(self, job_id, fields):
        if fields.status in ("succeeded", "failed"):
            raise RecordError(f"could not write the training_jobs row for job {job_id}: disk I/O error")
        return real(self, job_id, fields)

    monkeypatch.setattr(SqliteRecords, "upsert_job", fails_when_done)
    failed = handler.handler({"id": "rp-4", "input": small_job(job_id="lastrow")})
    adapter_uri = (volume / "artifacts" / "lastrow" / "adapter").as_uri() + "/"
    assert failed["error"] == (
        "record: could not write the training_jobs row for job lastrow: disk I/O error; the adapter is "
        f"stored at {adapter_uri} and its artifact record is written: re-run the job with the same job_id "
        "to finish the job record without training again")

    # A job that fails for its own reason reports that reason, even when its failure is not recorded.
    other = handler.handler({"id": "rp-5", "input": small_job(job_id="nomodel", base_model="acme/absent")})
    assert other["error"].startswith("model: base model 'acme/absent' is not on this worker")


def test_the_owner_set_by_the_edge_function_is_kept(volume):
    records = SqliteRecords(volume / "records.sqlite3")
    records.upsert_job("owned", {"status": "queued", "user_id": OWNER, "metadata": {"app": "x"}})
    output = handler.handler({"id": "rp-6", "input": small_job(job_id="owned", base_model="acme/absent")})
    assert output["error"].startswith("model: ")
    row = records.get_job("owned")
    assert (row["status"], row["user_id"], row["metadata"]) == ("failed", OWNER, {"app": "x"})


def test_the_failed_job_row_holds_no_signed_url(volume, monkeypatch):
    import pipeline
    from errors import DatasetError

    signed = "https://x.supabase.co/storage/v1/object/sign/d.jsonl?token=eyJabc.def.ghi"

    def fetch_fails(*args, **kwargs):  # a stage whose error quotes the URL it was given
        raise DatasetError(f"could not download {signed}: 403")

    monkeypatch.setattr(pipeline, "resolve_model", fetch_fails)
    output = handler.handler({"id": "rp-7", "input": small_job(job_id="signed")})
    row = SqliteRecords(volume / "records.sqlite3").get_job("signed")
    assert row["status"] == "failed" and row["error"] == output["error"]
    assert row["error"] == "dataset: could not download https://x.supabase.co/storage/v1/object/sign/d.jsonl" \
                           "?<redacted> 403"


def test_presign_seconds_is_bounded(tmp_path):
    from pydantic import ValidationError

    from config.settings import WorkerSettings

    assert WorkerSettings(volume_root=tmp_path, presign_seconds="").presign_seconds is None
    assert WorkerSettings(volume_root=tmp_path, presign_seconds="3600").presign_seconds == 3600
    with pytest.raises(ValidationError):
        WorkerSettings(volume_root=tmp_path, presign_seconds=8 * 24 * 3600)  # SigV4 allows 7 days
