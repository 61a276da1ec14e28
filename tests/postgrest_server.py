"""A local HTTP server that answers supabase-py as Supabase's REST API (PostgREST behind the API
gateway) documents it, for the tables of supabase/migrations. PostgREST itself cannot be installed
here; this is the test double, and it keeps to the documented behaviour:

- ``/rest/v1/<table>``; the gateway wants an ``apikey`` header (401 "No API key found in request" /
  "Invalid API key"), PostgREST takes the role from ``Authorization: Bearer <key>``; only the
  service role may write these tables (401 42501 for anon, as PostgREST answers a role without grants).
- ``POST`` inserts one object or an array. ``Prefer: resolution=merge-duplicates`` upserts on the
  columns of ``?on_conflict=`` (the primary key ``id`` without it: so an upsert that forgets
  ``on_conflict`` makes a second row here, as it does on Supabase), ``ignore-duplicates`` skips;
  without a resolution a duplicate is 409 23505. ``return=minimal`` answers 201 with no body,
  ``return=representation`` the rows (``?select=`` columns); ``Preference-Applied`` echoes the
  resolution. Unknown column: 400 PGRST204; unknown table: 404 PGRST205; ``on_conflict`` that is
  not a unique key: 400 42P10; bad status: 400 23514; an artifact without its job: 409 23503.
- ``GET`` with ``select=`` and ``col=eq.value`` filters, ``limit``.

Faults for the retry tests: ``fail(status, times)`` answers the next requests with that status (a
JSON PostgREST error, nothing written); ``hang_after_write(times)`` writes, then holds the answer
until ``release()`` (the client times out, as when a response is lost after the commit).
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from storage.records import ARTIFACT_COLUMNS, JOB_COLUMNS, JOB_STATUSES

SERVICE_ROLE_KEY = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIiwiaXNzIjoidGVzdCJ9"
                    ".dGVzdC1zZXJ2aWNlLXJvbGUtc2lnbmF0dXJl")
ANON_KEY = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoiYW5vbiIsImlzcyI6InRlc3QifQ"
            ".dGVzdC1hbm9uLXNpZ25hdHVyZQ")

TABLES = {
    "training_jobs": ("id", "job_id", *JOB_COLUMNS, "created_at", "updated_at"),
    "training_artifacts": ("id", "job_id", *ARTIFACT_COLUMNS, "created_at", "updated_at"),
}
UNIQUE = {"training_jobs": (("id",), ("job_id",)), "training_artifacts": (("id",), ("job_id",))}
DEFAULTS = {"training_jobs": {"status": "queued", "progress": 0}, "training_artifacts": {}}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: object


@dataclass
class _Fault:
    kind: str  # "status" | "hang"
    status: int = 0
    times: int = 1
    table: str | None = None  # only requests for this table; None: any


class _Answer(Exception):
    def __init__(self, status: int, body: dict | None):
        self.status, self.body = status, body


def _error(status: int, code: str | None, message: str, details: str | None = None, hint: str | None = None):
    return _Answer(status, {"code": code, "details": details, "hint": hint, "message": message})


@dataclass
class FakePostgrest:
    service_key: str = SERVICE_ROLE_KEY
    anon_key: str = ANON_KEY
    requests: list[Recorded] = field(default_factory=list)
    rows: dict[str, list[dict]] = field(default_factory=lambda: {t: [] for t in TABLES})
    _faults: list[_Fault] = field(default_factory=list)
    _release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- life cycle ----------------------------------------------------------------------------
    def start(self) -> FakePostgrest:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _serve(self) -> None:
                fake._handle(self)

            do_GET = do_POST = do_PATCH = do_DELETE = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    # --- faults --------------------------------------------------------------------------------
    def fail(self, status: int, times: int = 1, table: str | None = None) -> None:
        self._faults.append(_Fault("status", status, times, table))

    def hang_after_write(self, times: int = 1) -> None:
        self._faults.append(_Fault("hang", times=times))

    def release(self) -> None:
        self._release.set()

    def _next_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.table is None or path == f"/rest/v1/{fault.table}":
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
            return None

    # --- requests ------------------------------------------------------------------------------
    def writes(self, table: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path == f"/rest/v1/{table}"]

    def _handle(self, http: BaseHTTPRequestHandler) -> None:
        url = urlsplit(http.path)
        length = int(http.headers.get("Content-Length") or 0)
        raw = http.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        headers = {k.lower(): v for k, v in http.headers.items()}
        self.requests.append(Recorded(http.command, url.path, parse_qs(url.query), headers, body))
        extra_headers: dict[str, str] = {}
        hang = False
        try:
            fault = self._next_fault(url.path)
            if fault is not None and fault.kind == "status":
                raise _error(fault.status, "PGRST002", "Could not query the database for the schema cache. "
                             "Retrying.")
            hang = fault is not None and fault.kind == "hang"
            status, payload, extra_headers = self._answer(http.command, url.path, parse_qs(url.query),
                                                          headers, body)
        except _Answer as answer:
            status, payload = answer.status, answer.body
        if hang:
            self._release.wait(timeout=30)
        data = b"" if payload is None else json.dumps(payload).encode()
        try:
            http.send_response(status)
            http.send_header("Content-Type", "application/json; charset=utf-8")
            http.send_header("Content-Length", str(len(data)))
            for name, value in extra_headers.items():
                http.send_header(name, value)
            http.end_headers()
            http.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (the timeout test): the write happened anyway

    def _role(self, headers: dict[str, str]) -> str:
        apikey = headers.get("apikey")
        if not apikey:
            raise _error(401, None, "No API key found in request",
                         hint="No `apikey` request header or url param was found.")
        if apikey not in (self.service_key, self.anon_key):
            raise _error(401, None, "Invalid API key",
                         hint="Double check your Supabase `anon` or `service_role` API key.")
        bearer = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if bearer == self.service_key:
            return "service_role"
        if bearer == self.anon_key:
            return "anon"
        raise _error(401, "PGRST301", "JWT could not be decoded" if bearer else "No suitable key or wrong key type")

    def _answer(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body):
        role = self._role(headers)
        if not path.startswith("/rest/v1/"):
            raise _error(404, None, "no Route matched with those values")
        table = path.removeprefix("/rest/v1/")
        if table not in TABLES:
            raise _error(404, "PGRST205", f"Could not find the table 'public.{table}' in the schema cache")
        if role != "service_role":
            raise _error(401, "42501", f"permission denied for table {table}")
        select = query.get("select", ["*"])[0]
        if method == "GET":
            with self._lock:
                rows = [r for r in self.rows[table] if self._matches(r, query)]
            if "limit" in query:
                rows = rows[: int(query["limit"][0])]
            return 200, [self._project(r, select) for r in rows], {"Content-Range": f"0-{len(rows) - 1}/*"}
        if method != "POST":
            raise _error(405, "PGRST117", f"Unsupported HTTP method: {method}")

        prefer = {p.strip().split("=", 1)[0]: p.strip().split("=", 1)[-1]
                  for p in headers.get("prefer", "").split(",") if p.strip()}
        objects = body if isinstance(body, list) else [body]
        if not objects or not all(isinstance(o, dict) for o in objects):
            raise _error(400, "PGRST102", "Empty or invalid json")
        for obj in objects:
            for column in obj:
                if column not in TABLES[table]:
                    raise _error(400, "PGRST204", f"Could not find the '{column}' column of '{table}' "
                                 "in the schema cache")
        resolution = prefer.get("resolution")
        target = tuple(c.strip() for c in query["on_conflict"][0].split(",")) if "on_conflict" in query else ("id",)
        if resolution and target not in UNIQUE[table]:
            raise _error(400, "42P10", "there is no unique or exclusion constraint matching the ON CONFLICT "
                         "specification")
        with self._lock:
            written = [self._write(table, obj, resolution, target) for obj in objects]
        answer_headers = {"Content-Range": "*/*"}
        if resolution:
            answer_headers["Preference-Applied"] = f"resolution={resolution}"
        if prefer.get("return") == "representation":
            return 201, [self._project(r, select) for r in written if r is not None], answer_headers
        return 201, None, answer_headers

    def _write(self, table: str, obj: dict, resolution: str | None, target: tuple[str, ...]) -> dict | None:
        now = datetime.now(timezone.utc).isoformat()
        row = {c: None for c in TABLES[table]}
        row.update(DEFAULTS[table])
        row.update(id=str(uuid.uuid4()), created_at=now, updated_at=now)
        row.update(obj)
        if table == "training_jobs" and row.get("job_id") is None:
            row["job_id"] = row["id"]  # the migration's trigger
        if row.get("job_id") is None:
            raise _error(400, "23502", f'null value in column "job_id" of relation "{table}" violates '
                         "not-null constraint")
        if table == "training_jobs" and row["status"] not in JOB_STATUSES:
            raise _error(400, "23514", f'new row for relation "{table}" violates check constraint '
                         f'"{table}_status_check"')
        if table == "training_artifacts" and not any(j["job_id"] == row["job_id"] for j in self.rows["training_jobs"]):
            raise _error(409, "23503", f'insert or update on table "{table}" violates foreign key constraint '
                         f'"{table}_job_id_fkey"', details=f"Key (job_id)=({row['job_id']}) is not present "
                         'in table "training_jobs".')
        for existing in self.rows[table]:
            for key in UNIQUE[table]:
                if all(existing[c] == row[c] for c in key):
                    if resolution == "merge-duplicates" and key == target:
                        existing.update({k: v for k, v in obj.items() if k != "id"}, updated_at=now)
                        return existing
                    if resolution == "ignore-duplicates" and key == target:
                        return None
                    raise _error(409, "23505", f'duplicate key value violates unique constraint '
                                 f'"{table}_{"_".join(key)}_key"',
                                 details=f"Key ({', '.join(key)})=({', '.join(str(row[c]) for c in key)}) "
                                 "already exists.")
        self.rows[table].append(row)
        return row

    @staticmethod
    def _matches(row: dict, query: dict[str, list[str]]) -> bool:
        for column, values in query.items():
            if column in ("select", "limit", "order", "offset"):
                continue
            for value in values:
                op, _, operand = value.partition(".")
                if op != "eq" or str(row.get(column)) != operand:
                    return False
        return True

    @staticmethod
    def _project(row: dict, select: str) -> dict:
        if select in ("*", ""):
            return dict(row)
        return {c: row.get(c) for c in select.split(",")}
