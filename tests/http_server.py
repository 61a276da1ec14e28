"""A real HTTP(S) file server on loopback for the dataset-source tests.

Not a mock: a ``ThreadingHTTPServer`` speaking HTTP/1.1 on 127.0.0.1, optionally behind TLS with a
certificate made here for ``localhost`` and ``127.0.0.1`` (its CA file is handed to the client through
``SSL_CERT_FILE``, the way a private CA is trusted in production). Routes are set per test:

    server.files["/train.jsonl"] = b"..."                 # 200 with Content-Length
    server.redirects["/old"] = "/train.jsonl"             # 302 Location
    server.statuses["/gone"] = 404                        # an error status with a short body
    server.streams["/endless"] = (b"x" * 65536, 4096)     # chunked, no Content-Length
    server.content_types["/page"] = "text/html"
    server.headers["/blob"] = {"Content-Disposition": 'attachment; filename="train.csv"'}

Every request is recorded (method, path with query, headers) and ``sent["/endless"]`` counts the
bytes a stream managed to write before the client hung up.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class FileServer:
    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    streams: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    content_types: dict[str, str] = field(default_factory=dict)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # extra headers per file
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    httpd: ThreadingHTTPServer | None = None
    scheme: str = "http"
    ca_file: Path | None = None

    @property
    def port(self) -> int:
        assert self.httpd is not None
        return self.httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


def _handler(server: FileServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet test output
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            server.requests.append(("GET", self.path, dict(self.headers)))
            path = self.path.split("?", 1)[0]
            if path in server.redirects:
                self._reply(302, b"", {"Location": server.redirects[path]})
            elif path in server.statuses:
                self._reply(server.statuses[path], b"error\n", {"Content-Type": "text/plain"})
            elif path in server.files:
                body = server.files[path]
                self._reply(200, body, {"Content-Type": server.content_types.get(path, "application/octet-stream"),
                                        **server.headers.get(path, {})})
            elif path in server.streams:
                self._stream(path, *server.streams[path])
            else:
                self._reply(404, b"not found\n", {"Content-Type": "text/plain"})

        def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _stream(self, path: str, chunk: bytes, count: int) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/jsonl")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            server.sent[path] = 0
            try:
                for _ in range(count):
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    server.sent[path] += len(chunk)
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                self.close_connection = True

    return Handler


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1: (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up mid-stream or refuses our certificate is what some tests do


def start_file_server(tls_folder: Path | None = None) -> FileServer:
    server = FileServer()
    httpd = _QuietServer(("127.0.0.1", 0), _handler(server))
    httpd.daemon_threads = True
    if tls_folder is not None:
        cert, key = make_certificate(tls_folder)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        server.scheme, server.ca_file = "https", cert
    server.httpd = httpd
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server
