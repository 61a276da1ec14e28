"""SupabaseRecords through the real supabase-py client, against tests/postgrest_server.py (a local
server answering as Supabase's REST API documents it): the exact requests, retries, and errors."""

from __future__ import annotations

import json

import pytest
from pydantic import SecretStr

from config.settings import WorkerSettings
from errors import InputError, RecordError
from storage.records import SqliteRecords, SupabaseRecords, open_records
from tests.postgrest_server import ANON_KEY, SERVICE_ROLE_KEY, FakePostgrest

OWNER = "6f1c9a4e-2b7d-4c1e-9f3a-0d5e8b7a6c21"


@pytest.fixture
def postgrest():
    server = FakePostgrest().start()
    yield server
    server.stop()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def records(postgrest, sleeps):
    rec = SupabaseRecords(postgrest.url, SecretStr(SERVICE_ROLE_KEY), sleep=sleeps.append, timeout_s=2.0)
    yield rec
    rec.close()


def _prefer(request) -> set[str]:
    return {p.strip() for p in request.headers["prefer"].split(",")}


def test_job_upsert_sends_exactly_what_postgrest_needs(postgrest, records):
    records.upsert_job("job-1", {"status": "running", "progress": 0.25, "user_id": OWNER,
                                 "metadata": {"user_id": OWNER, "team": "a"}})
    (req,) = postgrest.requests
    assert (req.method, req.path) == ("POST", "/rest/v1/training_jobs")
    assert req.query == {"on_conflict": ["job_id"]}
    assert _prefer(req) == {"return=minimal", "resolution=merge-duplicates"}
    assert req.headers["apikey"] == SERVICE_ROLE_KEY
    assert req.headers["authorization"] == f"Bearer {SERVICE_ROLE_KEY}"
    assert req.headers["content-type"] == "application/json"
    assert req.body == {"job_id": "job-1", "status": "running", "progress": 0.25, "user_id": OWNER,
                        "metadata": {"user_id": OWNER, "team": "a"}}
    (row,) = postgrest.rows["training_jobs"]
    assert (row["job_id"], row["status"], row["progress"], row["user_id"]) == ("job-1", "running", 0.25, OWNER)


def test_artifact_upsert_returns_the_row_id_and_repeats_to_one_row(postgrest, records):
    records.upsert_job("job-2", {"status": "running"})
    fields = {"uri": "s3://b/p/job-2/adapter/", "bytes": 10, "base_model_id": "org/m",
              "base_model_revision": "abc", "base_model_fingerprint": "sha256:00",
              "metrics": {"train_loss": 1.5, "eval_loss": float("nan")}, "manifest": {"files": []},
              "download_urls": None, "download_expires_at": None}
    first = records.upsert_artifact("job-2", fields)
    second = records.upsert_artifact("job-2", {**fields, "bytes": 11})
    assert first == second
    writes = postgrest.writes("training_artifacts")
    assert len(writes) == 2
    for req in writes:
        assert req.query == {"on_conflict": ["job_id"], "select": ["id"]}
        assert _prefer(req) == {"return=representation", "resolution=merge-duplicates"}
    assert writes[0].body["metrics"] == {"train_loss": 1.5, "eval_loss": None}  # NaN is not JSON
    (row,) = postgrest.rows["training_artifacts"]
    assert row["id"] == first and row["bytes"] == 11
    assert records.get_artifact("job-2")["uri"] == "s3://b/p/job-2/adapter/"
    assert records.get_job("job-2")["status"] == "running"
    assert records.get_job("absent") is None


def test_503_then_success_gives_one_row(postgrest, records, sleeps):
    postgrest.fail(503, times=2)
    records.upsert_job("job-3", {"status": "running"})
    assert len(postgrest.writes("training_jobs")) == 3
    assert sleeps == [0.5, 1.0]  # backoff doubles
    assert [r["job_id"] for r in postgrest.rows["training_jobs"]] == ["job-3"]


def test_timeout_after_the_write_then_success_gives_one_row(postgrest, sleeps):
    # The first answer is lost after the row was written (a commit whose response never came):
    # the retried upsert merges into it instead of adding a second row.
    rec = SupabaseRecords(postgrest.url, SecretStr(SERVICE_ROLE_KEY), sleep=sleeps.append, timeout_s=0.5)
    postgrest.hang_after_write()
    try:
        rec.upsert_job("job-4", {"status": "running", "progress": 0.5})
    finally:
        postgrest.release()
        rec.close()
    assert len(postgrest.writes("training_jobs")) == 2 and len(sleeps) == 1
    (row,) = postgrest.rows["training_jobs"]
    assert (row["job_id"], row["progress"]) == ("job-4", 0.5)


def test_the_retries_are_bounded_and_the_error_says_what_to_do(postgrest, records, sleeps):
    postgrest.fail(503, times=10)
    with pytest.raises(RecordError) as info:
        records.upsert_job("job-5", {"status": "running"})
    assert len(postgrest.writes("training_jobs")) == SupabaseRecords.ATTEMPTS
    assert sleeps == [0.5, 1.0, 2.0, 4.0]
    message = str(info.value)
    assert message.startswith("could not write the training_jobs row for job job-5: Supabase at "
                              f"{postgrest.url} answered HTTP 503 (5 attempts)")
    assert "re-run the job with the same job_id" in message
    assert info.value.stage == "record" and info.value.retryable
    assert SERVICE_ROLE_KEY not in message


REFUSALS = [
    ("unknown table", {"jobs_table": "training_jobz"}, "PGRST205", "apply supabase/migrations"),
    ("anon key", {"key": ANON_KEY}, "42501", "must be the service-role key, not the anon key"),
    ("wrong key", {"key": "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoieCJ9.bm90LWEta2V5LWF0LWFsbA"}, "Invalid API key",
     "Double check your Supabase"),
]


@pytest.mark.parametrize("name,change,code,hint", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_4xx_fails_at_once_with_the_fix(postgrest, sleeps, name, change, code, hint):
    key = change.get("key", SERVICE_ROLE_KEY)
    rec = SupabaseRecords(postgrest.url, SecretStr(key), jobs_table=change.get("jobs_table", "training_jobs"),
                          sleep=sleeps.append)
    with pytest.raises(RecordError) as info:
        rec.upsert_job("job-6", {"status": "running"})
    rec.close()
    assert len(postgrest.requests) == 1 and sleeps == []  # no retry: retrying cannot fix it
    message = str(info.value)
    assert message.startswith("could not write the ") and "Supabase refused it" in message
    assert code in message and hint in message
    assert key not in message and not info.value.retryable


def test_a_bad_status_is_refused_by_the_table(postgrest, records):
    with pytest.raises(RecordError, match="23514"):
        records.upsert_job("job-7", {"status": "done"})
    assert postgrest.rows["training_jobs"] == []


def test_user_id_must_be_a_supabase_user_id(postgrest, records):
    with pytest.raises(InputError) as info:
        records.upsert_job("job-8", {"status": "running", "user_id": "alice"})
    assert str(info.value).startswith("metadata.user_id must be the owner's Supabase user id (a UUID)")
    assert info.value.stage == "input" and postgrest.requests == []


def test_open_records_picks_supabase_when_configured(tmp_path, postgrest):
    base = {"volume_root": tmp_path}
    assert isinstance(open_records(WorkerSettings(**base)), SqliteRecords)
    chosen = open_records(WorkerSettings(**base, supabase_url=postgrest.url,
                                         supabase_service_role_key=SERVICE_ROLE_KEY,
                                         supabase_jobs_table="jobs_v2"))
    assert isinstance(chosen, SupabaseRecords) and chosen.tables["job"] == "jobs_v2"
    assert SERVICE_ROLE_KEY not in repr(WorkerSettings(**base, supabase_url=postgrest.url,
                                                       supabase_service_role_key=SERVICE_ROLE_KEY))


def test_sqlite_and_supabase_answer_alike(postgrest, records, tmp_path):
    """The local default keeps the same record behaviour: one row per job_id, merged writes."""
    sqlite = SqliteRecords(tmp_path / "records.sqlite3")
    for rec in (sqlite, records):
        rec.upsert_job("same", {"status": "running", "progress": 0.1, "metadata": {"k": [1, 2]}})
        rec.upsert_job("same", {"status": "succeeded", "progress": 1.0})
        first = rec.upsert_artifact("same", {"uri": "u", "bytes": 1, "base_model_id": "m",
                                             "base_model_fingerprint": "f", "download_urls": {"a": "https://x"}})
        assert rec.upsert_artifact("same", {"uri": "u2", "bytes": 2, "base_model_id": "m",
                                            "base_model_fingerprint": "f"}) == first
        job, artifact = rec.get_job("same"), rec.get_artifact("same")
        assert (job["status"], job["progress"], job["metadata"]) == ("succeeded", 1.0, {"k": [1, 2]})
        assert (artifact["uri"], artifact["bytes"], artifact["download_urls"]) == ("u2", 2, {"a": "https://x"})
    assert json.loads(json.dumps(postgrest.rows["training_jobs"]))  # what the fake stored is plain JSON
