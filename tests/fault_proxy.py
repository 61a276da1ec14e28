"""A loopback TCP proxy in front of a real service, whose faults the test switches on and off.

In front of the real S3 server (SeaweedFS) or the PostgREST double: ``pass``, ``refuse`` (nothing
listens: connection refused, a service that is down), ``slow`` (connections accepted, never answered)
and ``503`` (every request answered ``503 SlowDown``, as S3 throttles). Used by tests/test_faults*.py.
"""

from __future__ import annotations

import socket
import threading

SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>")


class FaultProxy:
    """A loopback TCP proxy in front of ``upstream_port``; ``set(mode)`` switches what clients meet.

    ``pass`` forwards bytes both ways. ``refuse`` closes the listening socket (a connect is refused, as
    with a store that is down). ``slow`` accepts and never answers (each connection is held
    ``hold_s``, longer than the client's read timeout). ``503`` reads each request and answers S3's
    ``503 SlowDown``. Changing mode cuts every open connection, so no pooled keep-alive connection
    slips past a fault.
    """

    def __init__(self, upstream_port: int, hold_s: float = 4.0):
        self.upstream = ("127.0.0.1", upstream_port)
        self.hold_s = hold_s
        self.mode = "pass"
        self.faulted = 0  # connections met by a fault
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        self._listen(0)
        self.port = self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: str) -> None:
        assert mode in ("pass", "refuse", "slow", "503"), mode
        with self._lock:
            self.mode = mode
            live, self._open = self._open, set()
        for sock in live:
            _close(sock)
        if mode == "refuse" and self._listener is not None:
            self._listener, listener = None, self._listener
            _close(listener)
        elif mode != "refuse" and self._listener is None:
            self._listen(self.port)

    def stop(self) -> None:
        self._closed.set()
        self.set("refuse")

    # --- internals ---------------------------------------------------------------------------------
    def _listen(self, port: int) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        listener.settimeout(0.1)  # the accept loop notices a closed listener within 0.1 s
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self._lock:
                mode = self.mode
                self._open.add(conn)
                self.faulted += mode != "pass"
            target = {"pass": self._forward, "slow": self._hold, "503": self._throttle}.get(mode, _close)
            threading.Thread(target=target, args=(conn,), daemon=True).start()

    def _forward(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
            upstream.settimeout(None)
        except OSError:
            _close(conn)
            return
        with self._lock:
            self._open.add(upstream)
        threading.Thread(target=_pump, args=(upstream, conn), daemon=True).start()
        _pump(conn, upstream)

    def _hold(self, conn: socket.socket) -> None:
        self._closed.wait(self.hold_s)
        _close(conn)

    def _throttle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            while True:
                head, early = _read_head(conn)
                if head is None:
                    break
                length = int(head.get("content-length", "0") or 0) - early  # part of the body came with the head
                if length > 0 and "100-continue" not in head.get("expect", "").lower():
                    _read_exactly(conn, length)
                conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(SLOW_DOWN), SLOW_DOWN))
                break
        except OSError:
            pass
        _close(conn)


def _read_head(conn: socket.socket) -> tuple[dict[str, str] | None, int]:
    """A request's headers, and how many bytes of its body were read with them."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk or len(data) > 1 << 20:
            return None, 0
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}, len(body)


def _read_exactly(conn: socket.socket, length: int) -> None:
    while length > 0:
        chunk = conn.recv(min(length, 65536))
        if not chunk:
            return
        length -= len(chunk)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    for sock in (src, dst):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
