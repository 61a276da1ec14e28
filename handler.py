"""RunPod serverless entry: validate the job, run its stages, return the output or {"error": …}.

    python handler.py                      # the worker on RunPod
    python handler.py --test_input '{…}'   # one local job, as the runpod SDK gives it
    python handler.py --rp_serve_api       # RunPod's local /run, /runsync, /status API

``main`` builds the settings and configures logging once, then starts the SDK with a handler bound to
those settings. ``import handler; handler.handler({"id": "…", "input": {…}})`` works from the repo
root too: settings are read from the environment on first use, not at import.

RunPod is given ``async_handler``: the job runs in a worker thread while the SDK's event loop stays
free, so a RunPod cancel (the SDK cancels the job's task) reaches us; we set a flag that training
checks at every step, wait for it to stop with a checkpoint, and the job row says ``cancelled``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from functools import lru_cache, partial
from typing import Any

from pydantic import ValidationError

from config.job import TrainingJob, format_validation_error
from config.settings import WorkerSettings, settings_error_group
from errors import InputError, RecordError, ScrubFilter, StorageError, WorkerError, job_secrets, scrub

logger = logging.getLogger("handler")

# A broken group of variables fails the stage that uses it; any other variable is the worker's input.
_SETTINGS_ERRORS: dict[str | None, type[WorkerError]] = {"s3": StorageError, "supabase": RecordError}
_logging_configured = False


@lru_cache(maxsize=1)
def get_settings() -> WorkerSettings:
    """The environment's settings, built on first use (``import handler`` reads nothing) and kept.

    Raises the ``WorkerError`` of the stage a broken variable belongs to (S3: upload, Supabase:
    record, else input), so every job reports it instead of the worker failing to start.
    """
    try:
        return WorkerSettings()
    except ValidationError as exc:
        error = _SETTINGS_ERRORS.get(settings_error_group(exc), InputError)
        raise error(f"worker settings: {format_validation_error(exc)}", retryable=False) from None


@lru_cache(maxsize=1)
def get_base_cache():
    """This worker's warm base model (training/base_cache.py): one per process, kept across its jobs."""
    from training.base_cache import BaseModelCache

    return BaseModelCache()


def configure_logging(settings: WorkerSettings) -> None:
    """Once per process: a stderr handler unless one exists, the level, and a scrub filter on every
    handler. A job's own secrets reach the filters through ``errors.job_secrets`` while it runs."""
    global _logging_configured
    if _logging_configured:
        return
    _logging_configured = True
    root = logging.getLogger()
    if not root.handlers:  # the runpod SDK installs one when imported; else ours
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(stream)
    for log_handler in root.handlers:
        if not any(isinstance(f, ScrubFilter) for f in log_handler.filters):
            log_handler.addFilter(ScrubFilter(settings.secret_values()))
    root.setLevel(settings.log_level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _runpod_notify(job: dict[str, Any]):
    """RunPod's progress_update, when there is a RunPod job to report to (not in local test mode)."""
    if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT") or job.get("id") in (None, "local_test"):
        return None
    import runpod

    return lambda update: runpod.serverless.progress_update(job, update)


def handler(job: dict[str, Any], cancel: threading.Event | None = None, *,
            settings: WorkerSettings | None = None) -> dict[str, Any]:
    """One job, synchronously: its output, or ``{"error": "<stage>: …"}`` whatever goes wrong.

    ``settings`` are the worker's, built once in ``main``; an in-process caller leaves them out and
    gets the environment's (``get_settings``). ``cancel``, once set, stops training at its next step.
    """
    secrets: list[str] = []
    stage = "input"  # where an unexpected failure belongs until the job is valid
    try:
        if settings is None:
            settings = get_settings()
            configure_logging(settings)
        settings = _job_settings(job, settings)
        secrets = settings.secret_values()
        with job_secrets(secrets):
            request = TrainingJob.from_payload(job.get("input"), default_job_id=job.get("id"))
            stage = "train"
            return _run(request, settings, job, cancel)
    except WorkerError as exc:
        message = scrub(f"{exc.stage}: {exc.message}", secrets)
    except Exception as exc:  # a bug, not the caller's mistake: say where and what, never a traceback
        detail = " ".join(str(exc).split())[:300]
        message = scrub(f"{stage}: unexpected {type(exc).__name__}" + (f": {detail}" if detail else ""),
                        secrets)
    logger.error("job %s failed: %s", job.get("id") if isinstance(job, dict) else None, message)
    return {"error": message}


def _job_settings(job: dict[str, Any], settings: WorkerSettings) -> WorkerSettings:
    """The settings for this job: RunPod's per-request bucket (``s3Config``) replaces the environment's."""
    if job.get("s3Config") is None:
        return settings
    try:
        job_settings = settings.with_s3_config(job["s3Config"])
    except ValueError as exc:
        raise StorageError(str(exc), retryable=False) from None
    if job_settings.s3_endpoint_url and job_settings.s3_endpoint_url != settings.s3_endpoint_url:
        _check_request_endpoint(job_settings.s3_endpoint_url, settings.allow_private_urls)
    return job_settings


def _check_request_endpoint(url: str, allow_private: bool) -> None:
    """A request's S3 endpoint gets the address policy of every URL the worker opens (data/http.py):
    no loopback or private network unless ALLOW_PRIVATE_URLS, never link-local (cloud metadata).
    The environment's own S3_ENDPOINT_URL is the operator's choice and is not checked."""
    import socket
    from urllib.parse import urlsplit

    from data.http import check_address, display_url

    shown = display_url(url)
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        addresses = list(dict.fromkeys(i[4][0] for i in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))
    except (ValueError, OSError, UnicodeError):
        raise StorageError(f"the request's s3Config.endpointUrl {shown} cannot be resolved; check the URL",
                           retryable=True) from None
    for address in addresses:
        why = check_address(address, allow_private)
        if why is not None:
            raise StorageError(f"the request's s3Config.endpointUrl {shown} points at {address}, {why}. A "
                               "request's S3 endpoint must be a public address (the endpoint's own "
                               "S3_ENDPOINT_URL may be private)", retryable=False)


def _run(request: TrainingJob, settings: WorkerSettings, job: dict[str, Any],
         cancel: threading.Event | None) -> dict[str, Any]:
    logger.info("job %s: %s %s", request.job_id, request.action, request.base_model or "(default model)")
    # heavy imports (torch) only once a job is valid
    if request.action == "selftest":
        import selftest

        output = selftest.run_selftest(settings, _runpod_notify(job))
    else:
        import pipeline

        output = pipeline.run(request, settings, notify=_runpod_notify(job), cancel=cancel,
                              base_cache=get_base_cache())
    logger.info("job %s: %s in %.1fs", request.job_id, output.get("status"),
                output.get("timings", {}).get("total_s", 0.0))
    return output


async def async_handler(job: dict[str, Any], settings: WorkerSettings | None = None) -> dict[str, Any]:
    """RunPod's entry: ``handler`` in a thread, cancellable from the SDK's event loop."""
    cancel = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, partial(handler, job, cancel, settings=settings))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        logger.warning("job %s: cancelled; stopping at the next training step", job.get("id"))
        # The thread cannot be killed; it stops at a step boundary, saves a checkpoint, records
        # the job as cancelled and returns. Waiting for it keeps the checkpoint whole.
        await asyncio.wait({future})
        raise


def main() -> None:
    """The RunPod worker: settings and logging built once, then the SDK's loop with a handler bound
    to those settings."""
    # The SDK logs each raw job payload at DEBUG, its default level: payloads can carry credentials.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    import runpod  # before configure_logging: the SDK installs its log handler when imported

    import fitness

    try:
        settings = get_settings()
    except WorkerError as exc:
        # Start anyway: each job then fails with this reason, which RunPod shows to its caller,
        # where a worker that cannot start shows it only in the endpoint's logs.
        logger.error("worker settings are invalid; every job will fail: %s", exc.message)
        fitness.register(None)
        runpod.serverless.start({"handler": async_handler})
        return
    configure_logging(settings)
    fitness.point_caches_at_volume(settings)
    # Run by the SDK before the first job, on RunPod only: a failing check exits 1 naming itself.
    fitness.register(settings)
    runpod.serverless.start({"handler": partial(async_handler, settings=settings)})


if __name__ == "__main__":
    main()
