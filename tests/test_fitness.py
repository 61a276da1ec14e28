"""Start-up fitness checks: a worker that can never succeed exits before it takes a job.

The end-to-end tests start ``python handler.py`` as RunPod does (``RUNPOD_WEBHOOK_GET_JOB`` set, so the
SDK runs its fitness checks and then polls for jobs) against a local job-queue server on loopback that
records every request: a failing check must exit non-zero, name itself, and never ask for a job.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import fitness
from config.settings import WorkerSettings
from tests.conftest import ROOT, worker_env_names

FITNESS_ENV = {"REQUIRE_GPU", "MIN_FREE_DISK_GB", "RUNPOD_GPU_COUNT"}


class JobQueue:
    """RunPod's job-take endpoint on loopback: answers "no job" (204) and records every request."""

    def __init__(self):
        self.requests: list[str] = []
        queue = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                queue.requests.append(self.path)
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/job-take/$ID"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def queue():
    server = JobQueue()
    yield server
    server.close()


def _worker_env(queue: JobQueue, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.upper() not in worker_env_names() | FITNESS_ENV}
    env.update({
        "RUNPOD_WEBHOOK_GET_JOB": queue.url,  # a real worker: the SDK runs fitness checks, then polls
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",  # the SDK's own checks probe the internet
        "RUNPOD_SKIP_GPU_CHECK": "true",
        "LOCAL_STAGE_DIR": str(tmp_path / "stage"),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def _start(env: dict[str, str], tmp_path: Path) -> subprocess.Popen:
    # Run from a copy-free cwd outside the repo: no test_input.json there for the SDK to pick up.
    return subprocess.Popen([sys.executable, str(ROOT / "handler.py")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _failed_line(output: str) -> str:
    lines = [line for line in output.splitlines() if "Fitness check failed" in line]
    assert len(lines) == 1, output
    return lines[0]


@pytest.mark.slow
def test_a_missing_required_volume_stops_the_worker_before_any_job(queue, tmp_path):
    missing = tmp_path / "no-such-volume"
    proc = _start(_worker_env(queue, tmp_path, VOLUME_ROOT=str(missing)), tmp_path)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output
    line = _failed_line(output)
    assert "volume_writable" in line and f"VOLUME_ROOT={missing} does not exist" in line, line
    assert "attach the network volume" in line
    assert queue.requests == [], "the worker asked for a job before its checks passed"
    assert not missing.exists()


@pytest.mark.slow
def test_a_required_gpu_that_torch_cannot_see_stops_the_worker(queue, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check passes here")
    volume = tmp_path / "volume"
    volume.mkdir()
    proc = _start(_worker_env(queue, tmp_path, VOLUME_ROOT=str(volume), REQUIRE_GPU="true"), tmp_path)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output
    line = _failed_line(output)
    assert "cuda_runs" in line and "a GPU is expected (REQUIRE_GPU=true)" in line, line
    assert queue.requests == []


@pytest.mark.slow
def test_a_fit_worker_passes_its_checks_and_asks_for_jobs(queue, tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    proc = _start(_worker_env(queue, tmp_path, VOLUME_ROOT=str(volume), REQUIRE_GPU="false"), tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not queue.requests and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0]
        assert queue.requests, "the worker never asked for a job"
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert "Fitness check failed" not in output
    assert "All fitness checks passed" in output
    assert [p.name for p in volume.iterdir() if p.name.startswith(".fitness")] == []  # the probe is gone


# --- the checks one by one -------------------------------------------------------------------------

def _settings(tmp_path: Path, **kwargs) -> WorkerSettings:
    return WorkerSettings(volume_root=tmp_path / "vol", local_stage_dir=tmp_path / "stage", **kwargs)


GPU_EXPECTED = [
    ("true", None, [], "REQUIRE_GPU=true"),
    ("false", 2, ["/dev/nvidia0"], None),
    ("auto", 1, [], "RUNPOD_GPU_COUNT=1"),
    ("auto", 0, ["/dev/nvidia3"], "/dev/nvidia3 is present"),
    ("auto", None, [], None),
]


@pytest.mark.parametrize("require,count,devices,expected", GPU_EXPECTED)
def test_when_a_gpu_is_expected(require, count, devices, expected):
    settings = fitness.FitnessSettings(require_gpu=require, runpod_gpu_count=count)
    assert fitness.gpu_expected(settings, devices=lambda: devices) == expected


def test_the_checks_on_a_cpu_machine_pass_and_name_themselves(tmp_path, monkeypatch):
    monkeypatch.setattr(fitness, "_nvidia_devices", lambda: [])
    vol = tmp_path / "vol"
    vol.mkdir()
    found = fitness.checks(_settings(tmp_path), fitness.FitnessSettings(volume_root=vol))
    assert [c.__name__ for c in found] == ["volume_writable", "container_disk_free"]
    for check in found:
        check()
    assert list(vol.iterdir()) == []


def test_an_expected_gpu_adds_the_cuda_and_precision_checks(tmp_path):
    found = fitness.checks(_settings(tmp_path), fitness.FitnessSettings(require_gpu="true"))
    assert [c.__name__ for c in found] == ["cuda_runs", "precision_runs", "volume_writable",
                                           "container_disk_free"]


def test_a_read_only_volume_fails(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    vol = tmp_path / "ro"
    vol.mkdir()
    vol.chmod(0o555)
    with pytest.raises(fitness.FitnessError, match="is not writable"):
        fitness.check_volume(vol, explicit=True)


def test_a_volume_that_is_a_file_fails(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(fitness.FitnessError, match="is not a folder"):
        fitness.check_volume(path, explicit=True)


def test_an_unset_volume_root_is_created_like_the_settings_default(tmp_path):
    fitness.check_volume(tmp_path / "local" / ".volume", explicit=False)
    assert (tmp_path / "local" / ".volume").is_dir()


def test_too_little_container_disk_fails_with_the_numbers(tmp_path):
    with pytest.raises(fitness.FitnessError) as info:
        fitness.check_disk(tmp_path / "not" / "yet" / "stage", min_free_gb=1e9)
    message = str(info.value)
    assert "MIN_FREE_DISK_GB=1e+09" in message and "raise the endpoint's container disk size" in message
    assert f"at {tmp_path}" in message  # measured on the nearest folder that exists


def test_invalid_check_settings_fail_as_a_check(tmp_path, monkeypatch):
    monkeypatch.setenv("REQUIRE_GPU", "maybe")
    found = fitness.checks(_settings(tmp_path))
    assert [c.__name__ for c in found] == ["fitness_settings"]
    with pytest.raises(fitness.FitnessError, match="REQUIRE_GPU"):
        found[0]()


def test_the_precision_rule_on_this_machine():
    import torch

    precision = fitness.check_precision()
    if not torch.cuda.is_available():
        assert precision == "fp32"
    else:
        assert precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


@pytest.mark.gpu
def test_the_cuda_check_runs_a_kernel_on_the_gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert fitness.check_cuda("test") == torch.cuda.get_device_name(0)
    assert fitness.check_precision() in ("bf16", "fp16")


def test_library_caches_follow_the_volume_unless_hf_home_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HOME", raising=False)
    settings = _settings(tmp_path)
    fitness.point_caches_at_volume(settings)
    assert os.environ["HF_HOME"] == str(tmp_path / "vol" / "huggingface-cache")
    monkeypatch.setenv("HF_HOME", "/elsewhere")
    fitness.point_caches_at_volume(settings)
    assert os.environ["HF_HOME"] == "/elsewhere"
