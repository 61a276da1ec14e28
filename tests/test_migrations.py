"""supabase/migrations applied to a real PostgreSQL: constraints, row level security, and the
worker's own upserts (as PostgREST runs them) giving one row per job_id.

Supabase provides ``auth.uid()`` and the API roles; a minimal stand-in for them is created here, in
the tests, never in the migration. One difference on purpose: Supabase's ``service_role`` has
BYPASSRLS; the stand-in's has not, so the migration's own policies are what let it write.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import errors as pg

import handler
from storage.records import SCHEMA
from tests.conftest import ROOT, small_job
from tests.postgrest_server import SERVICE_ROLE_KEY, FakePostgrest

MIGRATIONS = sorted((ROOT / "supabase" / "migrations").glob("*.sql"))
OWNER = "6f1c9a4e-2b7d-4c1e-9f3a-0d5e8b7a6c21"
STRANGER = "0b8d2f6a-9c4e-4a7b-8e1f-3d5c7a9b1e20"

SUPABASE_STAND_IN = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
        CREATE ROLE anon NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
        CREATE ROLE authenticated NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
        CREATE ROLE service_role NOLOGIN NOINHERIT;
    END IF;
END
$$;
CREATE SCHEMA auth;
-- As Supabase defines it: the JWT's subject, from the claims PostgREST sets per request.
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        nullif(current_setting('request.jwt.claim.sub', true), ''),
        (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
    )::uuid
$$;
GRANT USAGE ON SCHEMA auth, public TO anon, authenticated, service_role;
-- Supabase grants the API roles everything on new tables in public; the migration narrows it.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
"""


@pytest.fixture
def db(postgres_db):
    assert MIGRATIONS, "no migrations in supabase/migrations"
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        conn.execute(SUPABASE_STAND_IN)
        for migration in MIGRATIONS:
            conn.execute(migration.read_text())
        yield conn


@contextmanager
def acting_as(conn, role: str, sub: str | None = None):
    """A transaction as PostgREST opens one per request: SET LOCAL ROLE and the JWT's claims."""
    with conn.transaction():
        conn.execute(f"SET LOCAL ROLE {role}")
        conn.execute("SELECT set_config('request.jwt.claims', %s, true)",
                     (json.dumps({"role": role, **({"sub": sub} if sub else {})}),))
        yield


def postgrest_upsert(conn, table: str, body: dict | list, on_conflict: str | None) -> list[str]:
    """The statement PostgREST runs for ``POST /<table>?on_conflict=…`` with
    ``Prefer: resolution=merge-duplicates``: rows from json_populate_recordset, the payload's
    columns only, ``ON CONFLICT (…) DO UPDATE SET col = EXCLUDED.col``."""
    rows = body if isinstance(body, list) else [body]
    columns = list(dict.fromkeys(c for row in rows for c in row))
    names = ", ".join(f'"{c}"' for c in columns)
    target = ", ".join(f'"{c.strip()}"' for c in (on_conflict or "id").split(","))
    sets = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in columns)
    sql = (f'INSERT INTO public."{table}" ({names}) SELECT {names} FROM '
           f'json_populate_recordset(NULL::public."{table}", %s::json) '
           f"ON CONFLICT ({target}) DO UPDATE SET {sets} RETURNING id::text")
    return [r[0] for r in conn.execute(sql, (json.dumps(rows),)).fetchall()]


def _columns(conn, table: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' "
        "AND table_name = %s ORDER BY ordinal_position", (table,))]


def test_the_migration_matches_the_sqlite_schema(db, tmp_path):
    sqlite = sqlite3.connect(tmp_path / "schema.sqlite3")
    sqlite.executescript(SCHEMA)
    for table in ("training_jobs", "training_artifacts"):
        local = [r[1] for r in sqlite.execute(f"PRAGMA table_info({table})")]
        assert _columns(db, table) == local, f"{table}: supabase/migrations and storage/records.py SCHEMA differ"
    security = dict(db.execute("SELECT relname, relrowsecurity FROM pg_class WHERE relname IN "
                               "('training_jobs', 'training_artifacts')").fetchall())
    assert security == {"training_jobs": True, "training_artifacts": True}
    indexes = {r[0] for r in db.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
    assert {"training_jobs_job_id_key", "training_artifacts_job_id_key",
            "training_jobs_user_id_created_at_idx", "training_jobs_live_status_idx"} <= indexes


def _job(conn, job_id: str, user_id: str | None = OWNER, **fields) -> str:
    body = {"job_id": job_id, "user_id": user_id, "status": "running", **fields}
    return postgrest_upsert(conn, "training_jobs", body, "job_id")[0]


def _artifact(conn, job_id: str, **fields) -> str:
    body = {"job_id": job_id, "uri": f"s3://b/{job_id}/adapter/", "bytes": 10, "base_model_id": "org/m",
            "base_model_fingerprint": "sha256:00", **fields}
    return postgrest_upsert(conn, "training_artifacts", body, "job_id")[0]


CONSTRAINTS = [
    ("duplicate job_id", "INSERT INTO training_jobs (job_id) VALUES ('dup'), ('dup')", pg.UniqueViolation),
    ("bad status", "INSERT INTO training_jobs (job_id, status) VALUES ('s', 'done')", pg.CheckViolation),
    ("progress above 1", "INSERT INTO training_jobs (job_id, progress) VALUES ('p', 1.5)", pg.CheckViolation),
    ("artifact without its job", "INSERT INTO training_artifacts (job_id, uri, bytes, base_model_id, "
     "base_model_fingerprint) VALUES ('nojob', 'u', 1, 'm', 'f')", pg.ForeignKeyViolation),
    ("negative bytes", "INSERT INTO training_jobs (job_id) VALUES ('nb'); INSERT INTO training_artifacts "
     "(job_id, uri, bytes, base_model_id, base_model_fingerprint) VALUES ('nb', 'u', -1, 'm', 'f')",
     pg.CheckViolation),
    ("second artifact row", "INSERT INTO training_jobs (job_id) VALUES ('two'); INSERT INTO training_artifacts "
     "(job_id, uri, bytes, base_model_id, base_model_fingerprint) VALUES ('two', 'u', 1, 'm', 'f'), "
     "('two', 'v', 1, 'm', 'f')", pg.UniqueViolation),
    ("owner not a user id", "INSERT INTO training_jobs (job_id, user_id) VALUES ('u', 'alice')",
     pg.InvalidTextRepresentation),
]


@pytest.mark.parametrize("name,sql,error", CONSTRAINTS, ids=[c[0] for c in CONSTRAINTS])
def test_the_constraints_hold(db, name, sql, error):
    with pytest.raises(error):
        with db.transaction():
            db.execute(sql)


def test_job_id_defaults_to_the_row_id_and_updated_at_follows_writes(db):
    row_id, job_id = db.execute("INSERT INTO training_jobs (user_id) VALUES (%s) RETURNING id::text, job_id",
                                (OWNER,)).fetchone()
    assert job_id == row_id  # what the Edge Function sends to RunPod as job_id
    db.execute("UPDATE training_jobs SET updated_at = '2000-01-01' WHERE id = %s", (row_id,))
    stamp = db.execute("SELECT updated_at FROM training_jobs WHERE id = %s", (row_id,)).fetchone()[0]
    assert stamp.year > 2000  # the trigger stamps every write, whatever the statement said
    created = db.execute("SELECT created_at FROM training_jobs WHERE id = %s", (row_id,)).fetchone()[0]
    # The worker's upsert names neither id nor user_id: it merges into the Edge Function's row.
    postgrest_upsert(db, "training_jobs", {"job_id": job_id, "status": "succeeded"}, "job_id")
    after = db.execute("SELECT created_at, status, user_id::text FROM training_jobs").fetchall()
    assert after == [(created, "succeeded", OWNER)]


def test_row_level_security(db):
    with acting_as(db, "service_role"):
        _job(db, "mine")
        _artifact(db, "mine")
        _job(db, "theirs", user_id=STRANGER)
        _artifact(db, "theirs")

    with acting_as(db, "authenticated", OWNER):
        assert [r[0] for r in db.execute("SELECT job_id FROM training_jobs")] == ["mine"]
        assert [r[0] for r in db.execute("SELECT job_id FROM training_artifacts")] == ["mine"]
    with acting_as(db, "authenticated", STRANGER):
        assert [r[0] for r in db.execute("SELECT job_id FROM training_artifacts")] == ["theirs"]

    for statement in (f"INSERT INTO training_jobs (job_id, user_id) VALUES ('forged', '{OWNER}')",
                      "UPDATE training_jobs SET status = 'cancelled' WHERE job_id = 'mine'",
                      "DELETE FROM training_artifacts WHERE job_id = 'mine'"):
        with pytest.raises(pg.InsufficientPrivilege), acting_as(db, "authenticated", OWNER):
            db.execute(statement)
    with pytest.raises(pg.InsufficientPrivilege), acting_as(db, "anon"):
        db.execute("SELECT job_id FROM training_jobs")
    assert db.execute("SELECT count(*) FROM training_jobs").fetchone()[0] == 2


@pytest.mark.slow
def test_the_workers_upserts_give_one_row_on_repetition(db, volume, monkeypatch):
    """Every write a real training job makes through supabase-py, replayed as PostgREST runs it,
    twice (a re-delivered job): one row per table, the same ids, the final state."""
    fake = FakePostgrest().start()
    try:
        monkeypatch.setenv("SUPABASE_URL", fake.url)
        monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)
        output = handler.handler({"id": "rp-1", "input": small_job(
            job_id="sb-job", metadata={"user_id": OWNER, "source": "edge-function"})})
    finally:
        fake.stop()
    assert output["status"] == "succeeded", output
    writes = [r for r in fake.requests if r.method == "POST"]
    assert {r.path for r in writes} == {"/rest/v1/training_jobs", "/rest/v1/training_artifacts"}
    assert all(r.query.get("on_conflict") == ["job_id"] for r in writes)

    ids = []
    for _ in range(2):
        with acting_as(db, "service_role"):
            ids.append([postgrest_upsert(db, r.path.rsplit("/", 1)[1], r.body, r.query["on_conflict"][0])
                        for r in writes])
    assert ids[0] == ids[1]
    assert db.execute("SELECT count(*) FROM training_jobs").fetchone()[0] == 1
    assert db.execute("SELECT count(*) FROM training_artifacts").fetchone()[0] == 1
    job = db.execute("SELECT status, progress, user_id::text, output, finished_at IS NOT NULL "
                     "FROM training_jobs").fetchone()
    assert job == ("succeeded", 1.0, OWNER, json.loads(json.dumps(output)), True)
    uri, manifest = db.execute("SELECT uri, manifest FROM training_artifacts").fetchone()
    assert uri == output["adapter"]["uri"] and manifest["files"] == output["adapter"]["files"]

    with acting_as(db, "authenticated", OWNER):  # the owner sees the job and the adapter
        assert db.execute("SELECT count(*) FROM training_artifacts").fetchone()[0] == 1


def test_the_edge_function_claims_a_queued_row_once(db):
    """process-training-jobs claims a row with a conditional update: the second claim gets nothing."""
    with acting_as(db, "service_role"):
        db.execute("INSERT INTO public.training_jobs (job_id, status, hyperparameters, dataset) "
                   "VALUES ('queued-1', 'queued', '{\"lora_r\": 8}', '{\"uri\": \"datasets/a.jsonl\"}')")
    claim = ("UPDATE public.training_jobs SET runpod_job_id = %s, submitted_at = now() "
             "WHERE job_id = 'queued-1' AND status = 'queued' AND runpod_job_id IS NULL RETURNING job_id")
    with acting_as(db, "service_role"):
        assert db.execute(claim, ("claim:first",)).fetchall() == [("queued-1",)]
    with acting_as(db, "service_role"):
        assert db.execute(claim, ("claim:second",)).fetchall() == []
    row = db.execute("SELECT runpod_job_id, submit_attempts FROM public.training_jobs "
                     "WHERE job_id = 'queued-1'").fetchone()
    assert row == ("claim:first", 0)
    with pytest.raises(pg.CheckViolation):
        db.execute("UPDATE public.training_jobs SET submit_attempts = -1 WHERE job_id = 'queued-1'")
