"""A minimal Hugging Face Hub for dataset repos, on loopback, for the hf:// tests.

It answers what ``snapshot_download(repo_type="dataset")`` asks (see /work/shared/FACTS.md):

    GET  /api/datasets/{org}/{name}/revision/{rev}     → {"id", "sha", "siblings"}
    GET  /api/datasets/{org}/{name}/tree/{sha}?recursive=true → [{"type": "file", "path", "size", "oid"}]
    HEAD /datasets/{org}/{name}/resolve/{rev}/{path}   → X-Repo-Commit, ETag, Content-Length
    GET  the same                                      → the bytes (Range: bytes=N- honoured)

Errors carry ``X-Error-Code`` (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound) as the real
Hub's do; HEAD answers carry no body; every answer has a Content-Length (keep-alive). No xet headers.
Every request is recorded, so tests can assert that a warm cache makes none.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class DatasetRepo:
    files: dict[str, bytes]
    sha: str = ""
    gated: bool = False

    def __post_init__(self) -> None:
        if not self.sha:
            digest = hashlib.sha1()
            for path in sorted(self.files):
                digest.update(path.encode() + b"\0" + self.files[path])
            self.sha = digest.hexdigest()


@dataclass
class HubServer:
    repos: dict[str, DatasetRepo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    httpd: ThreadingHTTPServer | None = None
    token: str | None = None  # when set, gated repos need "Authorization: Bearer <token>"

    @property
    def endpoint(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def downloads(self) -> list[str]:
        """Paths of the files GET-downloaded so far."""
        return [unquote(p.split("/resolve/", 1)[1].split("/", 1)[1]) for m, p in self.requests
                if m == "GET" and "/resolve/" in p]

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


_API = re.compile(r"^/api/datasets/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(head=True)

        def do_GET(self) -> None:  # noqa: N802
            self._answer(head=False)

        def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, head: bool) -> None:
            body = json.dumps({"error": message}).encode()
            self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message,
                                      "Content-Type": "application/json"}, head)

        def _repo(self, repo_id: str, revision: str, head: bool) -> DatasetRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found", head)
                return None
            if repo.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._error(401, "GatedRepo", "Access to this dataset is restricted", head)
                return None
            if revision not in ("main", repo.sha):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
                return None
            return repo

        def _answer(self, head: bool) -> None:
            hub.requests.append(("HEAD" if head else "GET", self.path))
            path = unquote(urlsplit(self.path).path)
            match = _API.match(path)
            if match:
                repo_id, kind, revision, _sub = match.groups()
                repo = self._repo(repo_id, revision, head)
                if repo is None:
                    return
                if kind == "revision":
                    body = {"id": repo_id, "sha": repo.sha, "private": False, "gated": repo.gated,
                            "siblings": [{"rfilename": p} for p in sorted(repo.files)]}
                else:
                    body = [{"type": "file", "path": p, "size": len(data),
                             "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
                            for p, data in sorted(repo.files.items())]
                self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
                return
            match = _RESOLVE.match(path)
            if match:
                repo_id, revision, file_path = match.groups()
                repo = self._repo(repo_id, revision, head)
                if repo is None:
                    return
                if file_path not in repo.files:
                    self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha,
                                          "X-Error-Message": "Entry not found"}, head)
                    return
                data = repo.files[file_path]
                headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                           "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
                ranged = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
                if ranged and not head:
                    start = int(ranged.group(1))
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    self._send(206, data[start:], headers, head)
                    return
                if head:
                    self.send_response(200)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return
                self._send(200, data, headers, head)
                return
            self._error(404, "EntryNotFound", "not found", head)

    return Handler


def start_hub_server() -> HubServer:
    hub = HubServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    httpd.daemon_threads = True
    hub.httpd = httpd
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return hub
