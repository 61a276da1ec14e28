"""Fitness checks: a worker that can never succeed refuses to start, before it takes a job.

``handler.main`` registers these with ``runpod.serverless.register_fitness_check``. The runpod SDK
runs them only as a real worker (``RUNPOD_WEBHOOK_GET_JOB`` set, no ``--test_input``), in order,
before it asks for the first job; the first that raises makes the SDK log one line,
``Fitness check failed: <check> | FitnessError: <why and the fix>``, and exit with status 1.

- ``cuda_runs``: where a GPU is expected (``REQUIRE_GPU=true``, or ``auto`` on a machine with an
  NVIDIA device or ``RUNPOD_GPU_COUNT`` > 0), torch sees CUDA and a tiny kernel gives the right answer.
  A driver too old for the image's CUDA runtime shows up here, not in the first job.
- ``precision_runs``: bf16 when the card has it, else fp16 (the one rule, ``training.runtime``):
  a small matmul in that precision runs and is finite.
- ``volume_writable``: ``VOLUME_ROOT``, when set, exists and takes a write, a rename and a delete;
  unset, the default root (``/runpod-volume`` if mounted, else ``./.volume``) must take them too.
- ``container_disk_free``: the container disk under ``LOCAL_STAGE_DIR`` has at least
  ``MIN_FREE_DISK_GB`` free (staging's 1 GiB margin plus temporary files).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.settings import WorkerSettings

logger = logging.getLogger("fitness")


class FitnessError(RuntimeError):
    """A check failed: the message says what is wrong and what to change."""


class FitnessSettings(BaseSettings):
    """The variables only the start-up checks read (the rest come from ``WorkerSettings``)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", frozen=True)

    require_gpu: Literal["auto", "true", "false"] = "auto"
    min_free_disk_gb: float = Field(default=2.0, ge=0)
    runpod_gpu_count: int | None = None  # RunPod's own variable on GPU workers
    volume_root: Path | None = None  # set: a volume is expected exactly there


def gpu_expected(fitness: FitnessSettings, devices: Callable[[], list[str]] | None = None) -> str | None:
    """Why a GPU is expected here, or None. ``auto``: RunPod says it gave us GPUs, or NVIDIA devices
    are present in the container (a GPU torch cannot use is the failure worth catching)."""
    if fitness.require_gpu == "true":
        return "REQUIRE_GPU=true"
    if fitness.require_gpu == "false":
        return None
    if fitness.runpod_gpu_count:
        return f"RUNPOD_GPU_COUNT={fitness.runpod_gpu_count}"
    found = (devices or _nvidia_devices)()
    return f"{found[0]} is present" if found else None


def _nvidia_devices() -> list[str]:
    return sorted(glob.glob("/dev/nvidia[0-9]*"))


def check_cuda(reason: str) -> str:
    """A tiny kernel on the first GPU; returns the card's name."""
    import torch

    if not torch.cuda.is_available():
        raise FitnessError(
            f"a GPU is expected ({reason}) but torch {torch.__version__} (CUDA {torch.version.cuda}) sees "
            "none: the host's NVIDIA driver may be older than this CUDA runtime; choose GPU types with a "
            "newer driver (endpoint: allowed CUDA versions) or set REQUIRE_GPU=false for a CPU worker")
    values = torch.arange(1024, device="cuda", dtype=torch.float32)
    total = float((values * 2).sum().item())  # .item() waits for the kernel
    if total != 1023 * 1024:
        raise FitnessError(f"a CUDA kernel on {torch.cuda.get_device_name(0)} gave {total}, not "
                           f"{1023 * 1024}: the GPU is faulty; terminate this worker")
    return torch.cuda.get_device_name(0)


def check_precision() -> str:
    """The precision training will use on this GPU, after a small matmul in it ran and stayed finite."""
    import torch

    from training.runtime import choose_precision, this_machine

    cuda, bf16 = this_machine()
    precision = choose_precision(cuda, bf16)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    a = torch.full((64, 64), 0.5, device="cuda" if cuda else "cpu", dtype=dtype)
    product = (a @ a).float()
    if not bool(torch.isfinite(product).all()) or abs(float(product[0, 0]) - 16.0) > 0.1:
        raise FitnessError(f"a {precision} matmul gave {float(product[0, 0])}, not 16.0: the GPU's "
                           f"{precision} path is broken; terminate this worker")
    return precision


def check_volume(root: Path, explicit: bool) -> None:
    """``root`` is a folder that takes a write, a rename and a delete (what every job does there)."""
    where = f"VOLUME_ROOT={root}" if explicit else f"the volume root {root}"
    if explicit and not root.exists():
        raise FitnessError(f"{where} does not exist: attach the network volume to the endpoint (it mounts "
                           "at /runpod-volume) or set VOLUME_ROOT to a folder that exists")
    if root.exists() and not root.is_dir():
        raise FitnessError(f"{where} is not a folder: point VOLUME_ROOT at the volume's mount point")
    probe = root / f".fitness-{uuid.uuid4().hex}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.with_suffix(".tmp").write_bytes(b"fitness")
        probe.with_suffix(".tmp").replace(probe)
        if probe.read_bytes() != b"fitness":
            raise FitnessError(f"{where} returned other bytes than were written: the volume is faulty")
        probe.unlink()
    except OSError as exc:
        raise FitnessError(f"{where} is not writable ({type(exc).__name__}: {exc.strerror or exc}): "
                           "attach the volume read-write or point VOLUME_ROOT at a writable folder") from None


def check_disk(stage_dir: Path, min_free_gb: float) -> float:
    """Free GB on the file system that will hold ``stage_dir``; raise if below ``min_free_gb``."""
    existing = stage_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free_gb = shutil.disk_usage(existing).free / 1024**3
    if free_gb < min_free_gb:
        raise FitnessError(
            f"the container disk has {free_gb:.1f} GiB free at {existing} (LOCAL_STAGE_DIR={stage_dir}), "
            f"below MIN_FREE_DISK_GB={min_free_gb:g}: raise the endpoint's container disk size")
    return free_gb


def checks(settings: WorkerSettings | None, fitness: FitnessSettings | None = None) -> list[Callable[[], None]]:
    """The checks for this machine, in the order they run; each function's name is the check's name.

    ``settings`` is None when the worker's settings are invalid (every job then fails with why): the
    checks still run on what the environment says.
    """
    if fitness is None:
        try:
            fitness = FitnessSettings()
        except ValidationError as exc:
            message = "; ".join(f"{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())

            def fitness_settings() -> None:
                raise FitnessError(f"invalid start-up check settings: {message}")

            return [fitness_settings]
    volume = fitness.volume_root.expanduser().resolve() if fitness.volume_root else (
        settings.volume_root if settings is not None else None)
    stage_dir = settings.local_stage_dir if settings is not None else \
        WorkerSettings.model_fields["local_stage_dir"].default
    found: list[Callable[[], None]] = []
    reason = gpu_expected(fitness)
    if reason is not None:
        def cuda_runs() -> None:
            logger.info("fitness: CUDA runs on %s", check_cuda(reason))

        def precision_runs() -> None:
            logger.info("fitness: training precision %s", check_precision())

        found += [cuda_runs, precision_runs]
    if volume is not None:
        def volume_writable() -> None:
            check_volume(volume, explicit=fitness.volume_root is not None)

        found.append(volume_writable)

    def container_disk_free() -> None:
        logger.info("fitness: %.1f GiB free for staging", check_disk(Path(stage_dir), fitness.min_free_disk_gb))

    found.append(container_disk_free)
    return found


def register(settings: WorkerSettings | None) -> list[str]:
    """Register this machine's checks with the runpod SDK; returns their names."""
    import runpod

    registered = checks(settings)
    for check in registered:
        runpod.serverless.register_fitness_check(check)
    return [check.__name__ for check in registered]


def point_caches_at_volume(settings: WorkerSettings) -> None:
    """Libraries that cache by themselves (transformers' remote-code modules, datasets, kernels'
    Hub downloads) follow ``HF_HOME``: on the volume, like the worker's own model cache, unless set."""
    os.environ.setdefault("HF_HOME", str(settings.hf_cache_root))
