"""A local server that answers the Hugging Face Hub's HTTP API as ``huggingface_hub`` uses it.

Not a mock of the client: the real ``snapshot_download``/``hf_hub_download``/``HfApi`` talk to it over
HTTP (set ``endpoint=`` or HF_ENDPOINT). It serves model and dataset repos from bytes in memory, with
the headers the client needs (X-Repo-Commit, ETag, Content-Length, Range → 206), the error codes it
understands (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound in X-Error-Code), gated repos
that need a token, connections cut mid-file on demand, and a log of every request so tests can
assert "no network" or "one GET per file". See ../shared/FACTS.md for what was measured.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".parquet", ".gguf")


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _commit_sha(files: dict[str, bytes]) -> str:
    digest = hashlib.sha1()
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
    return digest.hexdigest()


@dataclass
class HubRepo:
    """A repo with one or more commits; ``refs`` names some of them (``main`` the newest)."""

    repo_id: str
    repo_type: str = "model"
    gated: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def commit(self, files: dict[str, bytes], ref: str = "main") -> str:
        sha = _commit_sha(files)
        self.commits[sha] = dict(files)
        self.refs[ref] = sha
        return sha

    @property
    def sha(self) -> str:
        return self.refs["main"]

    @property
    def files(self) -> dict[str, bytes]:
        return self.commits[self.sha]

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def etag(self, path: str, data: bytes) -> str:
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else git_blob_sha(data)

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


@dataclass
class Cut:
    """Close the connection after ``after_bytes`` of a GET of ``path``, ``times`` times (-1: always)."""

    path: str
    after_bytes: int
    times: int = -1


class HubServer:
    def __init__(self, token: str | None = "hf_test_token_0123456789abcdef"):
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.token = token
        self.cuts: list[Cut] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes] | str | Path, *, repo_type: str = "model",
                 gated: bool = False) -> HubRepo:
        """Add a repo, or a new commit on ``main`` of an existing one (the older commits stay)."""
        if not isinstance(files, dict):
            root = Path(files)
            files = {p.relative_to(root).as_posix(): p.read_bytes()
                     for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}
        repo = self.repos.get((repo_type, repo_id)) or HubRepo(repo_id, repo_type, gated)
        repo.commit(dict(files))
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def add_dataset(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False) -> HubRepo:
        return self.add_repo(repo_id, files, repo_type="dataset", gated=gated)

    def downloads(self) -> list[str]:
        """The file paths GET-downloaded so far (from /resolve/ URLs)."""
        with self._lock:
            return [p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p in self.requests
                    if m == "GET" and "/resolve/" in p]

    def log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def count(self, method: str | None = None, contains: str = "") -> int:
        with self._lock:
            return sum(1 for m, p in self.requests if (method is None or m == method) and contains in p)

    def take_cut(self, path: str) -> Cut | None:
        with self._lock:
            for cut in self.cuts:
                if cut.path == path and cut.times != 0:
                    if cut.times > 0:
                        cut.times -= 1
                    return cut
        return None


_API = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?$")
_RESOLVE = re.compile(r"^(?:/(datasets))?/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client expects: every reply has a length

        def log_message(self, *args) -> None:  # quiet
            return

        # --- helpers -------------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD" and body:
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self._send(status, body if self.command != "HEAD" else b"",
                       {"X-Error-Code": code, "X-Error-Message": message})

        def _repo(self, repo_type: str, repo_id: str) -> HubRepo | None:
            repo = hub.repos.get((repo_type, repo_id))
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}")
                return None
            if repo.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it.")
                return None
            return repo

        # --- verbs ---------------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self._dispatch()

        def do_GET(self) -> None:
            self._dispatch()

        def _dispatch(self) -> None:
            parsed = urlparse(self.path)
            path = unquote(parsed.path)
            hub.log(self.command, path)
            if match := _API.match(path):
                return self._api(match, parsed.query)
            if match := _RESOLVE.match(path):
                return self._resolve(match)
            self._error(404, "EntryNotFound", f"no route for {path}")

        def _api(self, match: re.Match, query: str) -> None:
            kind, repo_id, sub, revision, tree_path = match.groups()
            repo_type = "model" if kind == "models" else "dataset"
            repo = self._repo(repo_type, repo_id)
            if repo is None:
                return
            sha = repo.resolve(revision or "main")
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            if sub == "tree":
                prefix = (tree_path or "").strip("/")
                entries = []
                for p, data in sorted(repo.commits[sha].items()):
                    if prefix and not p.startswith(prefix + "/"):
                        continue
                    entry = {"type": "file", "path": p, "size": len(data), "oid": git_blob_sha(data)}
                    if repo.is_lfs(p):
                        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                        "pointerSize": 134}
                    entries.append(entry)
                return self._send(200, json.dumps(entries).encode())
            info = {
                "id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])],
            }
            self._send(200, json.dumps(info).encode())

        def _resolve(self, match: re.Match) -> None:
            kind, repo_id, revision, file_path = match.groups()
            repo = self._repo("dataset" if kind else "model", repo_id)
            if repo is None:
                return
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            data = repo.commits[sha].get(file_path)
            if data is None:
                return self._error(404, "EntryNotFound", f"{file_path} does not exist at {revision}")
            headers = {"X-Repo-Commit": sha, "ETag": f'"{repo.etag(file_path, data)}"', "Accept-Ranges": "bytes"}
            start = 0
            if self.command == "GET" and (rng := self.headers.get("Range")):
                found = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                if found:
                    start = int(found.group(1))
            body = data[start:]
            status = 206 if start else 200
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if self.command == "HEAD":
                self.send_response(200)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return
            cut = hub.take_cut(file_path)
            if cut is not None:
                # Promise the whole body, send part of it, and drop the connection.
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: cut.after_bytes])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._send(status, body, headers, content_type="application/octet-stream")

    return Handler
