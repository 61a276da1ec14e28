"""Job and artifact records: ``training_jobs`` and ``training_artifacts`` (CONTRACT §4).

The embedded default is SQLite at ``$VOLUME_ROOT/records.sqlite3`` with the same tables and
constraints as the Supabase migration. Every write is an upsert keyed on ``job_id``, so a job
delivered twice gives one row in each table.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from config.settings import WorkerSettings
from errors import RecordError

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_COLUMNS = ("status", "progress", "current_step", "total_steps", "last_loss", "stage", "error",
               "base_model", "user_id", "metadata", "output", "started_at", "finished_at")
ARTIFACT_COLUMNS = ("uri", "bytes", "base_model_id", "base_model_revision", "base_model_fingerprint",
                    "metrics", "manifest")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS training_jobs (
    id            TEXT PRIMARY KEY,
    job_id        TEXT NOT NULL UNIQUE,
    status        TEXT NOT NULL DEFAULT 'queued'
                  CHECK (status IN ({", ".join(repr(s) for s in JOB_STATUSES)})),
    progress      REAL NOT NULL DEFAULT 0 CHECK (progress >= 0 AND progress <= 1),
    current_step  INTEGER,
    total_steps   INTEGER,
    last_loss     REAL,
    stage         TEXT,
    error         TEXT,
    base_model    TEXT,
    user_id       TEXT,
    metadata      TEXT,
    output        TEXT,
    started_at    TEXT,
    finished_at   TEXT,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS training_artifacts (
    id                      TEXT PRIMARY KEY,
    job_id                  TEXT NOT NULL UNIQUE,
    uri                     TEXT NOT NULL,
    bytes                   INTEGER NOT NULL CHECK (bytes >= 0),
    base_model_id           TEXT NOT NULL,
    base_model_revision     TEXT,
    base_model_fingerprint  TEXT NOT NULL,
    metrics                 TEXT,
    manifest                TEXT,
    created_at              TEXT NOT NULL,
    updated_at              TEXT NOT NULL
);
"""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Records(Protocol):
    def upsert_job(self, job_id: str, fields: dict[str, Any]) -> None: ...

    def upsert_artifact(self, job_id: str, fields: dict[str, Any]) -> str: ...

    def get_job(self, job_id: str) -> dict[str, Any] | None: ...

    def get_artifact(self, job_id: str) -> dict[str, Any] | None: ...


def _encode(value: Any) -> Any:
    return json.dumps(value, default=str) if isinstance(value, (dict, list)) else value


class SqliteRecords:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()  # progress callbacks may come from another thread
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise RecordError(f"cannot open the records database {path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def _upsert(self, table: str, allowed: tuple[str, ...], job_id: str, fields: dict[str, Any]) -> str:
        unknown = set(fields) - set(allowed)
        if unknown:
            raise ValueError(f"unknown {table} columns: {sorted(unknown)}")
        stamp = now_iso()
        values = {k: _encode(v) for k, v in fields.items()}
        cols = ["id", "job_id", *values, "created_at", "updated_at"]
        updates = ", ".join(f"{c} = excluded.{c}" for c in [*values, "updated_at"])
        sql = (
            f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
            f"ON CONFLICT(job_id) DO UPDATE SET {updates} RETURNING id"
        )
        params = [uuid.uuid4().hex, job_id, *values.values(), stamp, stamp]
        try:
            with self._lock, self._connect() as db:
                return db.execute(sql, params).fetchone()["id"]
        except sqlite3.Error as exc:
            raise RecordError(f"could not write the {table} row for job {job_id}: {exc}") from exc

    def upsert_job(self, job_id: str, fields: dict[str, Any]) -> None:
        self._upsert("training_jobs", JOB_COLUMNS, job_id, fields)

    def upsert_artifact(self, job_id: str, fields: dict[str, Any]) -> str:
        return self._upsert("training_artifacts", ARTIFACT_COLUMNS, job_id, fields)

    def _get(self, table: str, job_id: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute(f"SELECT * FROM {table} WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        for key in ("metadata", "output", "metrics", "manifest"):
            if isinstance(out.get(key), str):
                out[key] = json.loads(out[key])
        return out

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self._get("training_jobs", job_id)

    def get_artifact(self, job_id: str) -> dict[str, Any] | None:
        return self._get("training_artifacts", job_id)


def open_records(settings: WorkerSettings) -> Records:
    if settings.supabase_url:
        raise RecordError(
            "Supabase records are configured (SUPABASE_URL) but this worker build keeps records in "
            "SQLite only; unset SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY"
        )
    return SqliteRecords(settings.records_path)
