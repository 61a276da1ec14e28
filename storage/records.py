"""Job and artifact records: ``training_jobs`` and ``training_artifacts`` (CONTRACT §4).

The embedded default is SQLite at ``$VOLUME_ROOT/records.sqlite3`` with the same tables and
constraints as the Supabase migration (``supabase/migrations/*_training_tables.sql``: keep the two in
step). With ``SUPABASE_URL`` set, records go to Supabase through supabase-py with the service-role
key. Every write is an upsert keyed on ``job_id``, so a job delivered twice gives one row in each
table, and retrying a write whose answer was lost is safe.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
import uuid
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

from pydantic import BaseModel, ConfigDict, SecretStr

from adapters.manifest import AdapterManifest
from config.job import TrainingJob
from config.settings import WorkerSettings
from errors import InputError, RecordError

logger = logging.getLogger(__name__)

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class _RowUpdate(BaseModel):
    """The columns one upsert writes: those set when it was built, and only those.

    The Edge Function may have created the job row with its owner and metadata, and an upsert
    overwrites every column it names, so an unset field is left out of the write, while a field set
    to None (``error=None`` when a job starts again) clears its column. Names and types are checked
    here; values (a status, a progress in 0..1) are judged by the table's constraints, as they are
    for the app's own writes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    def columns(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


class JobUpdate(_RowUpdate):
    """A write to one ``training_jobs`` row."""

    status: str | None = None  # one of JOB_STATUSES
    progress: float | None = None  # 0..1
    current_step: int | None = None
    total_steps: int | None = None
    last_loss: float | None = None
    stage: str | None = None
    error: str | None = None
    base_model: str | None = None
    user_id: str | None = None
    metadata: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    started_at: str | None = None
    finished_at: str | None = None


class ArtifactRow(_RowUpdate):
    """The ``training_artifacts`` row of one job: the stored adapter and its manifest."""

    uri: str
    bytes: int
    base_model_id: str
    base_model_revision: str | None = None
    base_model_fingerprint: str
    metrics: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None  # the adapter's manifest.json, as stored
    # Presigned GET URLs per adapter file: they carry signatures, so they live in the row alone.
    download_urls: dict[str, str] | None = None
    download_expires_at: str | None = None


JOB_COLUMNS = tuple(JobUpdate.model_fields)
ARTIFACT_COLUMNS = tuple(ArtifactRow.model_fields)
JSON_COLUMNS = ("metadata", "output", "metrics", "manifest", "download_urls")

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
    updated_at    TEXT NOT NULL,
    -- the Edge Function's submission state (supabase/migrations/*_job_submission.sql); unused here
    model_revision   TEXT,
    dataset          TEXT,
    hyperparameters  TEXT,
    output_prefix    TEXT,
    runpod_job_id    TEXT,
    submit_attempts  INTEGER NOT NULL DEFAULT 0 CHECK (submit_attempts >= 0),
    submitted_at     TEXT
);
CREATE TABLE IF NOT EXISTS training_artifacts (
    id                      TEXT PRIMARY KEY,
    job_id                  TEXT NOT NULL UNIQUE REFERENCES training_jobs (job_id) ON DELETE CASCADE,
    uri                     TEXT NOT NULL,
    bytes                   INTEGER NOT NULL CHECK (bytes >= 0),
    base_model_id           TEXT NOT NULL,
    base_model_revision     TEXT,
    base_model_fingerprint  TEXT NOT NULL,
    metrics                 TEXT,
    manifest                TEXT,
    download_urls           TEXT,
    download_expires_at     TEXT,
    created_at              TEXT NOT NULL,
    updated_at              TEXT NOT NULL
);
"""
# Columns added after the first release: a records file on an existing volume gets them on open.
ADDED_COLUMNS = {
    "training_artifacts": ("download_urls TEXT", "download_expires_at TEXT"),
    "training_jobs": ("model_revision TEXT", "dataset TEXT", "hyperparameters TEXT", "output_prefix TEXT",
                      "runpod_job_id TEXT", "submit_attempts INTEGER NOT NULL DEFAULT 0", "submitted_at TEXT"),
}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Records(Protocol):
    def upsert_job(self, job_id: str, update: JobUpdate | dict[str, Any]) -> None: ...

    def upsert_progress(self, job_id: str, update: JobUpdate) -> None:
        """A progress write: best effort, tried once (the caller goes on if it fails)."""
        ...

    def upsert_artifact(self, job_id: str, row: ArtifactRow | dict[str, Any]) -> str: ...

    def get_job(self, job_id: str) -> dict[str, Any] | None: ...

    def get_artifact(self, job_id: str) -> dict[str, Any] | None: ...


def _columns(model: type[_RowUpdate], value: _RowUpdate | dict[str, Any]) -> dict[str, Any]:
    """The columns to write; a dict (tools, tests) is read as the model, so its names are checked too."""
    return (value if isinstance(value, model) else model.model_validate(value)).columns()


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
                for table, columns in ADDED_COLUMNS.items():
                    have = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
                    for column in columns:
                        if column.split()[0] not in have:
                            db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        except sqlite3.Error as exc:
            raise RecordError(f"cannot open the records database {path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def _upsert(self, table: str, job_id: str, fields: dict[str, Any]) -> str:
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

    def upsert_job(self, job_id: str, update: JobUpdate | dict[str, Any]) -> None:
        self._upsert("training_jobs", job_id, _columns(JobUpdate, update))

    def upsert_progress(self, job_id: str, update: JobUpdate) -> None:
        self.upsert_job(job_id, update)

    def upsert_artifact(self, job_id: str, row: ArtifactRow | dict[str, Any]) -> str:
        return self._upsert("training_artifacts", job_id, _columns(ArtifactRow, row))

    def _get(self, table: str, job_id: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute(f"SELECT * FROM {table} WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        for key in JSON_COLUMNS:
            if isinstance(out.get(key), str):
                out[key] = json.loads(out[key])
        return out

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self._get("training_jobs", job_id)

    def get_artifact(self, job_id: str) -> dict[str, Any] | None:
        return self._get("training_artifacts", job_id)


# --------------------------------------------------------------------------------------------------
# Supabase


class _ServerError(Exception):
    """A 5xx answer from Supabase (gateway or PostgREST): worth retrying an idempotent write."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


def _raise_on_server_error(response) -> None:
    # supabase-py turns every non-2xx answer into an APIError without its status code; an httpx
    # response hook sees the status first, so 5xx (retry) and 4xx (fix something) stay apart.
    if response.status_code >= 500:
        response.read()
        raise _ServerError(response.status_code, response.text[:300])


def _finite(value: Any) -> Any:
    """JSON without NaN/Infinity (PostgreSQL's jsonb and supabase-py refuse them): they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# What a PostgREST error code means for the person who has to fix it.
_API_HINTS = {
    "PGRST205": "the table does not exist: apply supabase/migrations (supabase db push), or set "
                "SUPABASE_JOBS_TABLE / SUPABASE_ARTIFACTS_TABLE",
    "42P01": "the table does not exist: apply supabase/migrations (supabase db push)",
    "PGRST204": "the table lacks a column this worker writes: apply supabase/migrations",
    "42P10": "the table has no unique job_id constraint: apply supabase/migrations",
    "42501": "the key may not write this table: SUPABASE_SERVICE_ROLE_KEY must be the service-role "
             "key, not the anon key",
    "PGRST301": "the key was refused: check SUPABASE_SERVICE_ROLE_KEY",
    "PGRST302": "the key was refused: check SUPABASE_SERVICE_ROLE_KEY",
}


class SupabaseRecords:
    """Records in Supabase (PostgREST through supabase-py), written with the service-role key.

    supabase-py retries only reads, and never on a timeout. Every write here is an upsert on
    ``job_id`` (``Prefer: resolution=merge-duplicates``), so retrying one whose answer was lost
    cannot make a second row: 5xx answers, timeouts and dropped connections are retried, bounded,
    with exponential backoff. A 4xx answer is a mistake to fix (key, table, column) and fails at once.
    """

    ATTEMPTS = 5
    BACKOFF_S = 0.5  # doubled after each failed attempt, capped at MAX_BACKOFF_S: 0.5+1+2+4 = 7.5 s
    MAX_BACKOFF_S = 8.0
    TIMEOUT_S = 20.0

    def __init__(self, url: str, service_role_key: SecretStr, *, jobs_table: str = "training_jobs",
                 artifacts_table: str = "training_artifacts", attempts: int | None = None,
                 backoff_s: float | None = None, timeout_s: float | None = None,
                 sleep: Callable[[float], None] | None = None):
        import httpx

        from supabase import ClientOptions, SupabaseException, create_client

        self.url = url.rstrip("/")
        self.tables = {"job": jobs_table, "artifact": artifacts_table}
        self.attempts = attempts or self.ATTEMPTS
        self.backoff_s = self.BACKOFF_S if backoff_s is None else backoff_s
        self.sleep = sleep or time.sleep
        timeout_s = timeout_s or self.TIMEOUT_S
        self._lock = threading.Lock()  # progress callbacks may come from another thread
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
                                  event_hooks={"response": [_raise_on_server_error]})
        # One of these per job in a long-lived worker: give its connections back with it.
        weakref.finalize(self, self._http.close)
        options = ClientOptions(httpx_client=self._http, postgrest_client_retry=False,
                                auto_refresh_token=False, persist_session=False)
        try:
            self.client = create_client(self.url, service_role_key.get_secret_value(), options)
        except SupabaseException as exc:
            raise RecordError(f"SUPABASE_URL must be the project's https:// URL; got {self.url!r} ({exc})") from None

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> SupabaseRecords:
        if not settings.supabase_url or settings.supabase_service_role_key is None:
            raise RecordError("Supabase records need both SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY")
        return cls(settings.supabase_url, settings.supabase_service_role_key,
                   jobs_table=settings.supabase_jobs_table, artifacts_table=settings.supabase_artifacts_table)

    def _call(self, action: str, table: str, job_id: str, request: Callable[[], Any],
              attempts: int | None = None) -> list[dict[str, Any]]:
        import httpx
        from postgrest.exceptions import APIError

        reason = "failed"
        attempts = attempts or self.attempts
        for attempt in range(1, attempts + 1):
            try:
                with self._lock:
                    return list(request().execute().data or [])
            except _ServerError as exc:
                reason = f"answered HTTP {exc.status}"
            except httpx.TimeoutException as exc:
                reason = f"did not answer in time ({type(exc).__name__})"
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                reason = f"could not be reached ({type(exc).__name__}: {exc})"
            except APIError as exc:
                hint = _API_HINTS.get(str(exc.code or ""), "")
                detail = "; ".join(str(x) for x in (exc.message, exc.details, exc.hint) if x)
                raise RecordError(
                    f"could not {action} the {table} row for job {job_id}: Supabase refused it "
                    f"({exc.code or 'error'}: {detail or 'no detail'})" + (f"; {hint}" if hint else ""),
                    retryable=False,
                ) from exc
            except httpx.HTTPError as exc:
                raise RecordError(f"could not {action} the {table} row for job {job_id}: "
                                  f"{type(exc).__name__}: {exc}") from exc
            if attempt < attempts:
                delay = min(self.backoff_s * 2 ** (attempt - 1), self.MAX_BACKOFF_S)
                logger.warning("%s %s for job %s: Supabase %s; retry %d of %d in %.1fs", action, table,
                               job_id, reason, attempt, attempts - 1, delay)
                self.sleep(delay)
        raise RecordError(
            f"could not {action} the {table} row for job {job_id}: Supabase at {self.url} {reason} "
            f"({attempts} attempt{'s' if attempts > 1 else ''}); check the project's status, then re-run the job "
            "with the same job_id",
            retryable=True,
        )

    def _row(self, job_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        user_id = fields.get("user_id")
        if user_id is not None:
            try:
                uuid.UUID(str(user_id))
            except ValueError:
                raise InputError(
                    f"metadata.user_id must be the owner's Supabase user id (a UUID) when records go to "
                    f"Supabase; got {str(user_id)[:64]!r}"
                ) from None
        return _finite({"job_id": job_id, **fields})

    def upsert_job(self, job_id: str, update: JobUpdate | dict[str, Any]) -> None:
        self._write_job(job_id, update)

    def upsert_progress(self, job_id: str, update: JobUpdate) -> None:
        """One attempt, no backoff: progress is written from the training loop, where retries with backoff
        (5 attempts, 7.5 s) held every step up while Supabase was down (a 3 s job took 75 s)."""
        self._write_job(job_id, update, attempts=1)

    def _write_job(self, job_id: str, update: JobUpdate | dict[str, Any], attempts: int | None = None) -> None:
        from postgrest.types import ReturnMethod

        table = self.tables["job"]
        row = self._row(job_id, _columns(JobUpdate, update))
        self._call("write", table, job_id, lambda: self.client.table(table).upsert(
            row, on_conflict="job_id", returning=ReturnMethod.minimal), attempts=attempts)

    def upsert_artifact(self, job_id: str, row: ArtifactRow | dict[str, Any]) -> str:
        table = self.tables["artifact"]
        body = self._row(job_id, _columns(ArtifactRow, row))
        rows = self._call("write", table, job_id, lambda: self.client.table(table).upsert(
            body, on_conflict="job_id").select("id"))
        if not rows or "id" not in rows[0]:
            raise RecordError(f"Supabase wrote the {table} row for job {job_id} but did not return its id")
        return str(rows[0]["id"])

    def _get(self, table: str, job_id: str) -> dict[str, Any] | None:
        rows = self._call("read", table, job_id,
                          lambda: self.client.table(table).select("*").eq("job_id", job_id).limit(1))
        return rows[0] if rows else None

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self._get(self.tables["job"], job_id)

    def get_artifact(self, job_id: str) -> dict[str, Any] | None:
        return self._get(self.tables["artifact"], job_id)

    def close(self) -> None:
        self._http.close()


def open_records(settings: WorkerSettings) -> Records:
    """Supabase when SUPABASE_URL is set (settings refuse it without the key), else SQLite on the volume."""
    if settings.supabase_url:
        return SupabaseRecords.from_settings(settings)
    return SqliteRecords(settings.records_path)


# --------------------------------------------------------------------------------------------------
# the request a job_id stands for: job_id is an idempotency key (CONTRACT §1)


def request_fingerprint(job: TrainingJob, settings: WorkerSettings, dataset_sha256: str,
                        eval_sha256: str | None) -> dict[str, Any]:
    """What makes two deliveries of a job_id the same request (stored in the manifest as ``request``)."""
    from adapters.fetch import shown_ref
    from model_resolver import requested_model

    return {"base_model": requested_model(job.base_model, settings), "model_revision": job.model_revision,
            "dataset_sha256": dataset_sha256, "eval_dataset_sha256": eval_sha256,
            "hyperparameters": job.hyperparameters.model_dump(mode="json"),
            "init_adapter": shown_ref(job.init_adapter) if job.init_adapter else None,
            "output_prefix": job.output.prefix}


_SHOWN_KEYS = {"dataset_sha256": "dataset sha256", "eval_dataset_sha256": "eval dataset sha256",
               "output_prefix": "output.prefix"}


def request_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs, in words: ``hyperparameters.lora_r (8 then, 16 now)``. Only what both record."""
    found = []
    for key, old in before.items():
        if key not in now:
            continue
        new = now[key]
        if isinstance(old, dict) and isinstance(new, dict):
            found += [f"{key}.{k} ({old.get(k)!r} then, {new.get(k)!r} now)"
                      for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            shown = [v[:12] + "…" if isinstance(v, str) and key.endswith("sha256") else v for v in (old, new)]
            found.append(f"{_SHOWN_KEYS.get(key, key)} ({shown[0]!r} then, {shown[1]!r} now)")
    return found


def stored_request(manifest: AdapterManifest) -> dict[str, Any]:
    """The request a stored adapter was made for; from its own fields when an older worker wrote it."""
    if manifest.request is not None:
        return manifest.request
    return {"dataset_sha256": manifest.dataset.sha256, "hyperparameters": manifest.hyperparameters}
