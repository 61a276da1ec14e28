"""Shared by the reliability tests (corpus, fuzzer): the guards every hostile job runs under, the
secrets planted in them and the scan for those secrets, and the figures RELIABILITY.md quotes.

- ``loopback_only``: the network as a job sees it. Names resolve from a fixed table (the way an
  attacker's DNS would answer: a public-looking name for a private or metadata address), unknown
  names do not resolve, and a connection to anything but loopback fails the test. So a hostile URL
  can never reach a real network, and a guard that lets one through is caught, not trusted.
- ``Planted``: known secret values (HF token, AWS keys, Supabase key, a signed-URL token, a password
  in a URL), put in the environment and in payloads; ``scan`` looks for each in every output,
  error, log line, record row and file the job left on the volume.
- ``count``: adds figures to build/reliability.json (read by RELIABILITY.md); ``make test`` writes it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import socket
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "build" / "reliability.json"

# What the attacker's DNS answers: each name looks harmless, each address is not.
FAKE_DNS = {
    "metadata.google.internal": "169.254.169.254",
    "evil.example": "10.0.0.5",
    "intranet.example": "192.168.1.10",
    "rebind.example": "127.0.0.1",
    "cgnat.example": "100.64.0.1",
    "v6.example": "::1",
    "ula.example": "fd00::1",
    "aws-v6.example": "fd00:ec2::254",
    "localhost": "127.0.0.1",
}


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@dataclass
class NetworkGuard:
    blocked: list[str] = field(default_factory=list)  # connections refused: each one fails the test


@pytest.fixture
def loopback_only(monkeypatch) -> NetworkGuard:
    guard = NetworkGuard()
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else str(host)
        try:
            name = name.encode("idna").decode("ascii").lower()  # what a resolver is asked
        except UnicodeError:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
        try:
            ipaddress.ip_address(name.split("%", 1)[0])
            return real_getaddrinfo(name, port, *args, **kwargs)  # a literal address: no DNS
        except ValueError:
            pass
        if name in FAKE_DNS:
            return real_getaddrinfo(FAKE_DNS[name], port, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and not _loopback(host):
            guard.blocked.append(str(host))
            raise ConnectionRefusedError(f"test guard: no network beyond loopback ({host})")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return guard


# --------------------------------------------------------------------------------------------------
# secrets


@dataclass(frozen=True)
class Planted:
    hf_token: str = "hf_PlantedTokenZq8Xv2Lm5Nw3Rt7Yk1Pb"
    aws_key_id: str = "AKIAPLANTED7EXAMPLE9"
    aws_secret: str = "planted/AwsSecretKey+Kq3Vx8Zr2Mn6Tb1Yw4Hs"
    supabase_key: str = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.plantedSupabaseSig123"
    url_token: str = "PlantedSignedUrlToken7c1e9a"
    url_password: str = "PlantedUrlPassw0rd"

    def values(self) -> list[str]:
        return [self.hf_token, self.aws_key_id, self.aws_secret, self.supabase_key, self.url_token,
                self.url_password]

    def s3_config(self, endpoint: str | None = None) -> dict:
        config = {"accessId": self.aws_key_id, "accessSecret": self.aws_secret, "bucketName": "planted-bucket"}
        return {**config, "endpointUrl": endpoint} if endpoint else config


PLANTED = Planted()


def plant_environment(monkeypatch) -> None:
    """The worker's own secrets, as an endpoint holds them (the ones that change no behaviour here)."""
    monkeypatch.setenv("HF_TOKEN", PLANTED.hf_token)


def volume_texts(volume: Path) -> dict[str, str]:
    """Every file the job may have written on the volume (models and datasets put there by the test
    excluded), and every row of the SQLite records, as text."""
    texts: dict[str, str] = {}
    for path in volume.rglob("*"):
        top = path.relative_to(volume).parts[0]
        if not path.is_file() or top in ("models", "datasets"):
            continue
        if path.suffix == ".sqlite3":
            with sqlite3.connect(path) as db:
                for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'"):
                    rows = db.execute(f'SELECT * FROM "{table}"').fetchall()  # noqa: S608 (names from sqlite)
                    texts[f"{path.name}:{table}"] = json.dumps(rows, default=str)
            continue
        texts[str(path.relative_to(volume))] = path.read_bytes().decode("utf-8", "replace")
    return texts


def scan(where: dict[str, str], secrets: list[str] | None = None) -> list[str]:
    """The places (``where`` maps a name to text) that hold a planted secret: empty when none leaked."""
    found = []
    for name, text in where.items():
        for secret in secrets or PLANTED.values():
            if secret in text:
                found.append(f"{secret[:6]}… in {name}")
    return found


# --------------------------------------------------------------------------------------------------
# figures


_fresh = True  # the first figures of this test run replace an earlier run's file


def count(section: str, **figures: int | float) -> None:
    """Add ``figures`` to ``section`` of build/reliability.json (sums; ``max_*`` keys keep the max)."""
    global _fresh
    FIGURES.parent.mkdir(exist_ok=True)
    with open(FIGURES.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(FIGURES.read_text()) if FIGURES.exists() and not _fresh else {}
        _fresh = False
        entry = data.setdefault(section, {})
        for key, value in figures.items():
            entry[key] = max(entry.get(key, value), value) if key.startswith("max_") else entry.get(key, 0) + value
        FIGURES.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
